"""What the benchmark scripts share: quantiles, and a Redis to run on."""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def median_p99(values: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile (nearest rank) of a non-empty sample."""
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@contextlib.contextmanager
def redis_for(url: str | None, progress: bool = False, cluster: bool = False) -> Iterator[str]:
    """``url`` when given, else a throwaway redis-server on a free port (with ``cluster``: a
    throwaway Redis Cluster of three primaries and three replicas), stopped afterwards."""
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import ClusterSetup, RedisServer

    server: RedisServer | ClusterSetup = ClusterSetup() if cluster else RedisServer()
    if progress:
        what = "a Redis Cluster" if cluster else "redis-server"
        print(f"started {what} at {server.url}", file=sys.stderr, flush=True)
    try:
        yield server.url
    finally:
        server.close()
