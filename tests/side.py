"""A client of our own for the Redis behind a deduplicator's URL: to look at its keys, or to
tamper with them, the way another program on the same Redis would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aredis

Side = Any
"""A ``redis.asyncio`` client (``Redis`` or ``RedisCluster``: their commands are the same)."""


def open_side(url: str, **options: Any) -> Side:
    """An asyncio client of ``url``: ``redis://``, ``unix://``, ``redis+cluster://host:port,...``
    (a cluster client), ``redis+sentinel://host:port,.../service[/db]`` (the service's primary) or
    ``memory://name`` (the embedded fakeredis server a deduplicator of that URL uses). ``options``
    go to the client (``client_name=...``)."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "memory":
        import fakeredis

        # memory://<name>: the deduplicators of one name share one in-process fakeredis server
        name = rest.strip("/") or "default"
        return fakeredis.FakeAsyncRedis(host=f"strands-dedup-memory/{name}", port=0, **options)
    if scheme in ("redis+cluster", "rediss+cluster"):
        first = rest.rpartition("@")[2].split(",", 1)[0].split("/", 1)[0]
        tls = "rediss" if scheme.startswith("rediss") else "redis"
        return aredis.RedisCluster.from_url(f"{tls}://{first}", **options)
    if scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        hosts, _, path = rest.rpartition("@")[2].partition("/")
        service, _, db = path.partition("/")
        addresses = [(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts.split(",")]
        return Sentinel(addresses).master_for(service, db=int(db or 0), **options)  # type: ignore[no-untyped-call]
    return aredis.Redis.from_url(url, **options)


@asynccontextmanager
async def side_of(url: str) -> AsyncIterator[Side]:
    """`open_side` as a context: the client is closed at the end."""
    client = open_side(url)
    try:
        yield client
    finally:
        await client.aclose()
