"""What a session hold costs, against the raw Redis round trip.

Run from the repository root::

    python -m benchmarks.sessions                   # throwaway redis-server on a free port
    python -m benchmarks.sessions --redis-url redis://127.0.0.1:6379/0

In one run, on one Redis and one event loop:

floor
    A raw redis-py asyncio ``SET key val NX PX 30000`` on a fresh key (the library's client).
hold
    ``async with guard.hold(name): pass`` on a session nobody else uses: one admission script
    and one release script (two round trips), measured in blocks interleaved with the floor.
hand-off
    WAITERS callers queue on one session; each holds it for no time. Measured: from the moment a
    holder starts leaving its block to the moment the next caller is inside (the release script
    admits it and publishes its grant; the shared subscriber wakes it).

Writes ``benchmarks/results/sessions-latest.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks._common import describe_url, floor_client, median_p99, redis_for
from strands_dedup import DedupConfig, Deduplicator, SessionGuard

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "sessions-latest.json"


def summarize(values: list[float]) -> dict[str, float]:
    median, p99 = median_p99(values)
    return {"median_us": median * 1e6, "p99_us": p99 * 1e6, "n": len(values)}


async def bench(url: str, samples: int, waiters: int) -> dict[str, Any]:
    namespace = f"bench-sessions-{uuid.uuid4().hex[:8]}"
    raw = floor_client(url, DedupConfig().max_connections, "bench-floor")
    floor: list[float] = []
    hold: list[float] = []
    async with Deduplicator.from_url(url, namespace=namespace, metrics=False) as dedup:
        guard = SessionGuard(dedup)
        for i in range(200):  # warm up both paths
            await raw.set(f"{namespace}:warm:{i}", b"v", nx=True, px=30000)
            async with guard.hold(f"warm-{i}"):
                pass
        for block in range(samples // 10):
            for i in range(10):
                started = time.perf_counter()
                await raw.set(f"{namespace}:floor:{block}:{i}", b"v", nx=True, px=30000)
                floor.append(time.perf_counter() - started)
            for i in range(10):
                started = time.perf_counter()
                async with guard.hold(f"s-{block}-{i}"):
                    pass
                hold.append(time.perf_counter() - started)

        handoffs: list[float] = []
        leaving = [0.0]
        ready = asyncio.Event()

        async def caller() -> None:
            async with guard.hold("handoff"):
                if leaving[0]:
                    handoffs.append(time.perf_counter() - leaving[0])
                await ready.wait()
                leaving[0] = time.perf_counter()

        tasks = [asyncio.create_task(caller()) for _ in range(waiters + 1)]
        while (await dedup.health()).sessions_waiting < waiters:
            await asyncio.sleep(0.01)
        ready.set()
        await asyncio.gather(*tasks)
        async for key in raw.scan_iter(match=f"{namespace}:*", count=1000):
            await raw.delete(key)
    await raw.aclose()
    floor_s, hold_s = summarize(floor), summarize(hold)
    return {
        "redis": describe_url(url),
        "floor_set_nx_px": floor_s,
        "hold_enter_exit": {**hold_s, "ratio_to_floor": hold_s["median_us"] / floor_s["median_us"]},
        "handoff": {**summarize(handoffs), "waiters": waiters},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sessions", description=__doc__)
    parser.add_argument("--redis-url", help="a real Redis (default: a throwaway redis-server)")
    parser.add_argument("--samples", type=int, default=2000, help="holds and floor round trips")
    parser.add_argument("--waiters", type=int, default=200, help="callers queued for hand-offs")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    with redis_for(args.redis_url) as url:
        report = asyncio.run(bench(url, max(10, args.samples), max(1, args.waiters)))
    floor, hold, handoff = report["floor_set_nx_px"], report["hold_enter_exit"], report["handoff"]
    print(f"{'':28}{'median':>12}{'p99':>12}{'x floor':>10}")
    print(
        f"{'floor (SET NX PX)':28}{floor['median_us']:>10.0f}us{floor['p99_us']:>10.0f}us{1:>10.2f}"
    )
    print(
        f"{'hold (enter + exit)':28}{hold['median_us']:>10.0f}us{hold['p99_us']:>10.0f}us"
        f"{hold['ratio_to_floor']:>10.2f}"
    )
    print(
        f"{'hand-off to next in line':28}{handoff['median_us']:>10.0f}us"
        f"{handoff['p99_us']:>10.0f}us{handoff['median_us'] / floor['median_us']:>10.2f}"
        f"   ({handoff['waiters']} queued)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
