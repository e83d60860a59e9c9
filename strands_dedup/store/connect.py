"""Building a redis-py asyncio client from a URL (``memory://`` is the embedded fakeredis)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ..config import DedupConfig

__all__ = ["client_from_url", "describe_url"]

SCHEMES = ("redis", "rediss", "unix", "memory")


def describe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def client_from_url(url: str, config: DedupConfig, *, client_name: str) -> aredis.Redis:
    """A client whose pool holds at most ``max_connections`` connections.

    Callers queue for a connection in `RedisStore` (a FIFO semaphore of the same size), so the
    pool itself never has to block. Retries are left to strands-dedup (tenacity, on operations
    that are safe to repeat), so the client itself does not retry. The connections have no
    socket timeout of their own: `RedisStore` bounds every operation with ``socket_timeout``
    (redis-py would wrap every write in a task of its own to apply one).
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        return _memory_client(url, config, client_name)
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL {describe_url(url)!r}: use redis://, rediss:// (TLS), "
            "unix:// or memory:// (embedded)"
        )
    options: dict[str, Any] = {
        "max_connections": config.max_connections,
        "socket_connect_timeout": config.connect_timeout,
        "client_name": client_name,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
    }
    if scheme == "unix":
        options.pop("socket_connect_timeout")
    pool = aredis.ConnectionPool.from_url(url, **options)
    return aredis.Redis.from_pool(pool)


def _memory_client(url: str, config: DedupConfig, client_name: str) -> aredis.Redis:
    try:
        import fakeredis
    except ImportError as exc:  # pragma: no cover - fakeredis is a dependency
        raise RuntimeError("memory:// needs fakeredis[lua]: pip install 'fakeredis[lua]'") from exc
    name = url.split("://", 1)[1].strip("/") or "default"
    # fakeredis shares one in-process server between clients that name the same host and port.
    client: aredis.Redis = fakeredis.FakeAsyncRedis(
        host=f"strands-dedup-memory/{name}",
        port=0,
        client_name=client_name,
        max_connections=config.max_connections,
    )
    return client
