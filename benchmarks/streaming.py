"""How far behind its primary a follower of a streamed call runs.

Run from the repository root::

    python -m benchmarks.streaming                  # throwaway redis-server on a free port
    python -m benchmarks.streaming --redis-url redis://127.0.0.1:6379/0

Two deduplicators in one process (each with its own connection pool and subscriber, as two
replicas would have) on one Redis. The primary streams CHUNKS chunks, one every INTERVAL
seconds (and, in the burst run, as fast as it can); each chunk carries the moment it was made.

first chunk, primary
    From ``dedup.stream(...)`` being called to the primary's caller holding its first chunk
    (the claim), against the raw ``SET NX PX`` round trip measured in the same run.
first chunk, follower
    A follower joins once the primary has made JOIN chunks: from its call to its first chunk
    (subscribe, claim, read the stream from the start).
lag
    For every chunk the follower receives live: receive time minus the time it was made.

Writes ``benchmarks/results/streaming-latest.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from benchmarks._common import describe_url, floor_client, median_p99, redis_for
from strands_dedup import DedupConfig, Deduplicator

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "streaming-latest.json"


def summarize(values: list[float]) -> dict[str, float]:
    median, p99 = median_p99(values)
    return {"median_ms": median * 1e3, "p99_ms": p99 * 1e3, "n": len(values)}


async def one_run(
    primary: Deduplicator, follower: Deduplicator, chunks: int, interval: float, join: int
) -> dict[str, Any]:
    token = uuid.uuid4().hex
    joined = asyncio.Event()

    async def make() -> AsyncIterator[dict[str, Any]]:
        for i in range(chunks):
            if i == join:
                joined.set()
            yield {"i": i, "t": time.perf_counter()}
            if interval:
                await asyncio.sleep(interval)
            elif i % 50 == 0:
                await asyncio.sleep(0)

    async def lead() -> float:
        started = time.perf_counter()
        first = None
        async for _ in primary.stream(token, make):
            if first is None:
                first = time.perf_counter() - started
        assert first is not None
        return first

    async def follow() -> tuple[float, list[float]]:
        await joined.wait()
        started = time.perf_counter()
        first = None
        lags = []
        count = 0
        async for chunk in follower.stream(token, make):
            now = time.perf_counter()
            count += 1
            if first is None:
                first = now - started
            if chunk["i"] > join:
                lags.append(now - chunk["t"])
        assert count == chunks and first is not None, count
        return first, lags

    first_primary, (first_follower, lags) = await asyncio.gather(lead(), follow())
    return {"first_primary": first_primary, "first_follower": first_follower, "lags": lags}


async def bench(url: str, runs: int, chunks: int, interval: float, join: int) -> dict[str, Any]:
    namespace = f"bench-stream-{uuid.uuid4().hex[:8]}"
    raw = floor_client(url, DedupConfig().max_connections, "bench-floor")
    floor = []
    for i in range(500):
        started = time.perf_counter()
        await raw.set(f"{namespace}:floor:{i}", b"v", nx=True, px=30000)
        floor.append(time.perf_counter() - started)
    report: dict[str, Any] = {"redis": describe_url(url), "floor_set_nx_px": summarize(floor)}
    async with (
        Deduplicator.from_url(url, namespace=namespace, metrics=False) as a,
        Deduplicator.from_url(url, namespace=namespace, metrics=False) as b,
    ):
        for name, pace in (("paced", interval), ("burst", 0.0)):
            firsts_p, firsts_f, lags = [], [], []
            for _ in range(runs):
                result = await one_run(a, b, chunks, pace, join)
                firsts_p.append(result["first_primary"])
                firsts_f.append(result["first_follower"])
                lags += result["lags"]
            report[name] = {
                "interval_ms": pace * 1e3,
                "chunks": chunks,
                "runs": runs,
                "first_chunk_primary": summarize(firsts_p),
                "first_chunk_follower": summarize(firsts_f),
                "lag": summarize(lags),
            }
    async for key in raw.scan_iter(match=f"{namespace}:*", count=1000):
        await raw.delete(key)
    await raw.aclose()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__)
    parser.add_argument("--redis-url", help="a real Redis (default: a throwaway redis-server)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--interval", type=float, default=0.002, help="seconds between chunks")
    parser.add_argument("--join", type=int, default=50, help="chunks made before a follower joins")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if not 0 <= args.join < args.chunks:
        parser.error("--join must be below --chunks")
    with redis_for(args.redis_url) as url:
        report = asyncio.run(bench(url, args.runs, args.chunks, args.interval, args.join))
    print(f"floor SET NX PX: {report['floor_set_nx_px']['median_ms']:.3f} ms median")
    print(f"{'':34}{'median':>10}{'p99':>10}")
    for name in ("paced", "burst"):
        run = report[name]
        title = f"every {run['interval_ms']:g} ms" if run["interval_ms"] else "as fast as made"
        print(f"{run['chunks']} chunks, {title}:")
        for label, key in (
            ("  first chunk, primary", "first_chunk_primary"),
            ("  first chunk, follower", "first_chunk_follower"),
            ("  follower lag per live chunk", "lag"),
        ):
            row = run[key]
            print(f"{label:34}{row['median_ms']:>8.2f}ms{row['p99_ms']:>8.2f}ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
