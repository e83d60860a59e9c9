"""The history of a fault-injection run, and the checker of DESIGN.md's guarantees over it.

Workers and the fault driver append JSON lines (one record each) to history files:

``call``   a caller's call returned: ``w`` worker, ``tok`` token, ``t0``/``t1`` wall-clock start and
           end, ``ok``, ``val`` (the value) or ``err`` (the exception's class name), ``role``
``exec``   an execution began: ``w``, ``tok``, ``fence``, ``id`` (unique), ``t0``
``done``   an execution's completion was ``accepted`` (stored) or refused (``LeaseLost``): ``w``,
           ``tok``, ``fence``, ``id``, ``t1``
``fault``  the driver injected a fault: ``kind`` (kill, stop, cont, restart, failover,
           clientkill), ``w`` (the worker, for kill/stop/cont), ``t``, and for a failover
           ``until`` (when every node served again: the fault lasts from ``t`` to then)
``left``   after the run, one lease TTL after the faults stopped: ``leases`` still held

Every execution returns ``{"id": <its id>, "fence": <its fence>}``, so a caller's value names the
execution that produced it. `check` is a plain function of the records: it returns one
`Violation` per broken rule instance (an empty list means the run kept every guarantee).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Violation", "check", "load"]

GLOBAL_FAULTS = ("restart", "failover", "clientkill")


@dataclass(frozen=True)
class Violation:
    rule: str
    token: str | None
    detail: str


def load(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Records from history files (a torn last line, from a SIGKILLed writer, is skipped)."""
    records = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _faults_on(faults: list[dict[str, Any]], worker: Any, start: float, end: float) -> bool:
    """A fault that could have cost ``worker`` its lease happened between ``start`` and ``end``
    (a fault with an ``until`` lasts from ``t`` to then: a failover, until the cluster serves)."""
    return any(
        f["t"] <= end
        and f.get("until", f["t"]) >= start
        and (f["kind"] in GLOBAL_FAULTS or (f["kind"] in ("kill", "stop") and f.get("w") == worker))
        for f in faults
    )


def check(
    records: list[dict[str, Any]], *, lease_ttl: float, wait_timeout: float, slack: float = 1.0
) -> list[Violation]:
    """Every violation of the guarantees in ``records`` (see the module docstring for the rules).

    1. ``same-value``: every caller of a token that got a value got the same value.
    2. ``one-accepted``: at most one accepted completion per token; callers' values come from it.
    3. ``late-refusal``: a completion is refused (``LeaseLost``) only if a fault could have cost
       its execution the lease (its worker killed or stopped, Redis restarted, connections
       killed) while it ran.
    4. ``overlap``: an execution begins while an earlier one of the token still runs only after
       a fault that could have cost the earlier one its lease.
    5. ``waited-too-long``: no call took longer than ``wait_timeout`` (plus its own work and
       ``slack``).
    6. ``left-locked``: no lease is left one lease TTL after the faults stopped.
    """
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_kind[record["k"]].append(record)
    faults = sorted(by_kind["fault"], key=lambda f: f["t"])
    out: list[Violation] = []
    calls: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for call in by_kind["call"]:
        calls[call["tok"]].append(call)
    execs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ex in by_kind["exec"]:
        execs[ex["tok"]].append(ex)
    done = {d["id"]: d for d in by_kind["done"]}

    for token, token_calls in calls.items():
        values = {json.dumps(c["val"], sort_keys=True) for c in token_calls if c["ok"]}
        if len(values) > 1:
            out.append(
                Violation("same-value", token, f"callers got {len(values)} values: {values}")
            )
        for c in token_calls:
            if c["t1"] - c["t0"] > wait_timeout + slack + c.get("work", 0.0):
                out.append(
                    Violation(
                        "waited-too-long",
                        token,
                        f"a call of worker {c['w']} took {c['t1'] - c['t0']:.2f}s",
                    )
                )

    for token, token_execs in execs.items():
        accepted = [e for e in token_execs if done.get(e["id"], {}).get("accepted")]
        if len(accepted) > 1:
            out.append(
                Violation(
                    "one-accepted",
                    token,
                    f"{len(accepted)} accepted completions (fences "
                    f"{[e['fence'] for e in accepted]})",
                )
            )
        if accepted:
            ids = {c["val"]["id"] for c in calls.get(token, []) if c["ok"] and c["val"]}
            stray = ids - {e["id"] for e in accepted}
            if stray:
                out.append(
                    Violation(
                        "one-accepted",
                        token,
                        f"callers got values of {len(stray)} "
                        "executions that were not the accepted one",
                    )
                )
        for e in token_execs:
            d = done.get(e["id"])
            if (
                d is not None
                and not d["accepted"]
                and not _faults_on(faults, e["w"], e["t0"], d["t1"])
            ):
                out.append(
                    Violation(
                        "late-refusal",
                        token,
                        f"fence {e['fence']} of worker {e['w']} was refused with no fault "
                        "that could have cost it its lease",
                    )
                )
        ordered = sorted(token_execs, key=lambda e: e["fence"])
        for earlier, later in itertools.pairwise(ordered):
            finished = done.get(earlier["id"])
            still_running = finished is None or finished["t1"] > later["t0"]
            if still_running and not _faults_on(faults, earlier["w"], earlier["t0"], later["t0"]):
                out.append(
                    Violation(
                        "overlap",
                        token,
                        f"fence {later['fence']} began while fence {earlier['fence']} ran, "
                        "with no fault that could have cost it its lease",
                    )
                )

    for left in by_kind["left"]:
        if left["leases"]:
            out.append(
                Violation(
                    "left-locked",
                    None,
                    f"{left['leases']} lease(s) still held {lease_ttl:g}s after the faults stopped",
                )
            )
    return out
