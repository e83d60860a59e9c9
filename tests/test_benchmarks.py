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
