"""What the benchmark scripts share: quantiles, a Redis to run on, and a plain client of it."""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def describe_url(url: str) -> str:
    """``url`` without credentials or query, for reports."""
    scheme, _, rest = url.partition("://")
    hosts, _, path = rest.rpartition("@")[2].partition("/")
    return f"{scheme}://{hosts}/{path.split('?', 1)[0]}" if path else f"{scheme}://{hosts}"


def floor_client(url: str, max_connections: int, client_name: str) -> Any:
    """A plain redis-py asyncio client with the options the library gives its own: the pool
    bound, the connect timeout, RESP2, no retries of its own, no socket timeout (hiredis parses
    replies when it is installed). ``redis+cluster://host:port[,...]`` opens a cluster client;
    ``memory://name`` the embedded server of that name. The floor of a benchmark: commands go
    to it directly, with none of the library's code in between."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from strands_dedup import DedupConfig

    options: dict[str, Any] = {
        "max_connections": max_connections,
        "socket_connect_timeout": DedupConfig().connect_timeout,
        "client_name": client_name,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
    }
    scheme, _, rest = url.partition("://")
    if scheme in ("redis+cluster", "rediss+cluster"):
        hosts = rest.rpartition("@")[2].split("/", 1)[0]
        credentials = rest.rpartition("@")[0]
        base = "rediss" if scheme.startswith("rediss") else "redis"
        first = hosts.split(",", 1)[0]
        login = f"{credentials}@" if credentials else ""
        return aredis.RedisCluster.from_url(f"{base}://{login}{first}", **options)
    if scheme == "memory":
        import fakeredis

        name = rest.strip("/") or "default"  # the deduplicators' embedded server of that name
        options.pop("socket_connect_timeout")
        options.pop("retry")
        return fakeredis.FakeAsyncRedis(host=f"strands-dedup-memory/{name}", port=0, **options)
    if scheme == "unix":
        options.pop("socket_connect_timeout")
    return aredis.Redis.from_url(url, **options)
