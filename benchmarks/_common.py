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
def redis_for(url: str | None, progress: bool = False) -> Iterator[str]:
    """``url`` when given, else a throwaway redis-server on a free port (stopped afterwards)."""
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import RedisServer

    server = RedisServer()
    if progress:
        print(f"started redis-server on port {server.port}", file=sys.stderr, flush=True)
    try:
        yield server.url
    finally:
        server.close()
