"""One variant of the core latency run, in a fresh process (``python -m benchmarks`` runs it).

    python -m benchmarks.variant_worker URL N asyncio|uvloop [--no-hiredis]

``--no-hiredis`` hides hiredis before redis-py is imported, so redis-py uses its pure-Python
reply parser. Prints one JSON line: fresh and replay medians/p99 (ms) and the floor.
"""

import sys

if "--no-hiredis" in sys.argv:
    sys.modules["hiredis"] = None  # type: ignore[assignment]

import asyncio
import json
import statistics
import time
import uuid

import redis.asyncio as aredis
from redis.utils import HIREDIS_AVAILABLE

from strands_dedup import Deduplicator


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered) * 1e3,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
    }


async def main(url: str, n: int) -> dict[str, object]:
    ns = f"bench-variant-{uuid.uuid4().hex[:8]}"
    raw = aredis.Redis.from_url(url)
    floor, fresh, replay = [], [], []

    async def call() -> dict[str, bool]:
        return {"ok": True}

    async with Deduplicator.from_url(url, namespace=ns, metrics=False) as dedup:
        await dedup.execute("warm", call)
        for i in range(n):
            t = time.perf_counter()
            await raw.set(f"{ns}:f:{i}", b"v", nx=True, px=30000)
            floor.append(time.perf_counter() - t)
            t = time.perf_counter()
            await dedup.execute(f"t{i}", call)
            fresh.append(time.perf_counter() - t)
            t = time.perf_counter()
            await dedup.execute("warm", call)
            replay.append(time.perf_counter() - t)
    async for key in raw.scan_iter(match=f"{ns}:*"):
        await raw.delete(key)
    await raw.aclose()
    return {
        "hiredis": HIREDIS_AVAILABLE,
        "floor": summary(floor),
        "fresh": summary(fresh),
        "replay": summary(replay),
    }


if __name__ == "__main__":
    url, n, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if loop == "uvloop":
        import uvloop

        result = uvloop.run(main(url, n))
    else:
        result = asyncio.run(main(url, n))
    result["loop"] = loop
    print(json.dumps(result))
