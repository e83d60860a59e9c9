"""The fault-injection suite: the history checker on hand-written histories, then a short seeded
run (workers, SIGKILL, SIGSTOP/SIGCONT, Redis restarts, CLIENT KILL) whose history it checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from history import check

ROOT = Path(__file__).resolve().parents[2]


def call(
    w: str, tok: str, t0: float, t1: float, val: Any = None, err: str | None = None
) -> dict[str, Any]:
    return {
        "k": "call",
        "w": w,
        "tok": tok,
        "t0": t0,
        "t1": t1,
        "ok": err is None,
        "val": val,
        "err": err,
        "work": 0.1,
    }


def execution(w: str, tok: str, fence: int, ident: str, t0: float) -> dict[str, Any]:
    return {"k": "exec", "w": w, "tok": tok, "fence": fence, "id": ident, "t0": t0}


def done(w: str, tok: str, fence: int, ident: str, t1: float, accepted: bool) -> dict[str, Any]:
    return {
        "k": "done",
        "w": w,
        "tok": tok,
        "fence": fence,
        "id": ident,
        "t1": t1,
        "accepted": accepted,
    }


def fault(kind: str, t: float, w: str | None = None) -> dict[str, Any]:
    return {"k": "fault", "kind": kind, "w": w, "t": t}


def rules(records: list[dict[str, Any]]) -> list[str]:
    return sorted(v.rule for v in check(records, lease_ttl=1.0, wait_timeout=10.0))


A = {"id": "a", "fence": 1}
B = {"id": "b", "fence": 2}


@pytest.mark.timeout(10)
def test_a_clean_history_has_no_violation() -> None:
    history = [
        execution("w1", "t", 1, "a", 0.0),
        done("w1", "t", 1, "a", 0.3, True),
        call("w1", "t", 0.0, 0.3, A),
        call("w2", "t", 0.1, 0.31, A),
        # a takeover after the first primary's worker was stopped
        execution("w1", "u", 1, "c", 1.0),
        fault("stop", 1.1, "w1"),
        execution("w2", "u", 2, "d", 2.3),
        done("w2", "u", 2, "d", 2.5, True),
        done("w1", "u", 1, "c", 3.0, False),
        call("w2", "u", 1.2, 2.5, {"id": "d", "fence": 2}),
        {"k": "left", "leases": 0},
    ]
    assert rules(history) == []


@pytest.mark.timeout(10)
def test_every_rule_catches_its_violation() -> None:
    assert rules([call("w1", "t", 0, 1, A), call("w2", "t", 0, 1, B)]) == ["same-value"]
    assert rules(
        [
            execution("w1", "t", 1, "a", 0.0),
            done("w1", "t", 1, "a", 0.5, True),
            execution("w2", "t", 2, "b", 0.6),
            done("w2", "t", 2, "b", 0.9, True),
        ]
    ) == ["one-accepted"]
    assert rules(
        [
            execution("w1", "t", 1, "a", 0.0),
            done("w1", "t", 1, "a", 0.5, True),
            call("w1", "t", 0, 1, B),
        ]
    ) == ["one-accepted"]
    assert rules([execution("w1", "t", 1, "a", 0.0), done("w1", "t", 1, "a", 0.5, False)]) == [
        "late-refusal"
    ]
    # the same refusal is fine when the worker was stopped meanwhile
    assert (
        rules(
            [
                execution("w1", "t", 1, "a", 0.0),
                fault("stop", 0.2, "w1"),
                done("w1", "t", 1, "a", 2, False),
            ]
        )
        == []
    )
    overlap = [execution("w1", "t", 1, "a", 0.0), execution("w2", "t", 2, "b", 0.2)]
    assert rules(overlap) == ["overlap"]
    # a failover that began before the earlier execution but lasted into it: allowed
    assert rules([*overlap, {**fault("failover", -0.5), "until": 0.1}]) == []
    assert rules([*overlap, {**fault("failover", -0.5), "until": -0.1}]) == ["overlap"]
    assert rules([*overlap, fault("kill", 0.1, "w1")]) == []
    assert rules([*overlap, fault("stop", 0.1, "w2")]) == ["overlap"]  # not the earlier's worker
    assert rules([call("w1", "t", 0.0, 12.0, A)]) == ["waited-too-long"]
    assert rules([{"k": "left", "leases": 2}]) == ["left-locked"]


def seeded_run(tmp_path: Path, *options: str) -> dict[str, Any]:
    """Run ``python -m benchmarks.faults`` with ``options``; its summary, with no violation."""
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.faults", *options, "--quiet",
            "--history-dir", str(tmp_path / "history"), "--json", str(summary_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )  # fmt: skip
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    assert done.returncode == 0, (summary or {}).get("violations") or done.stderr[-3000:]
    assert summary is not None and summary["violations"] == []
    assert summary["left_locked"] == 0
    return summary


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_seeded_run_under_faults_keeps_every_guarantee(tmp_path: Path) -> None:
    summary = seeded_run(tmp_path, "--seed", "7", "--seconds", "40", "--interval", "1.2")
    assert set(summary["faults"]) == {"kill", "stop", "restart", "clientkill"}, summary["faults"]
    assert summary["executions"] > 100 and summary["roles"].get("waiter", 0) > 100
    assert summary["roles"].get("takeover", 0) >= 1


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_seeded_run_on_a_cluster_with_failovers_keeps_every_guarantee(tmp_path: Path) -> None:
    summary = seeded_run(
        tmp_path, "--cluster", "--seed", "17", "--seconds", "30", "--interval", "1.2"
    )
    assert summary["store"] == "cluster"
    assert set(summary["faults"]) == {"kill", "stop", "failover", "clientkill"}, summary["faults"]
    assert summary["executions"] > 50 and summary["roles"].get("waiter", 0) > 50
