"""Building a redis-py asyncio client from a URL (``memory://`` is the embedded fakeredis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.retry import Retry as BlockingRetry

from .._config import DedupConfig

__all__ = ["SentinelClient", "blocking_client_from_url", "client_from_url", "describe_url"]

SCHEMES = ("redis", "rediss", "unix", "memory", "redis+sentinel", "redis+cluster", "rediss+cluster")


def describe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis+sentinel", "redis+cluster", "rediss+cluster"):
        rest = url.split("://", 1)[1]
        hosts, _, path = rest.rpartition("@")[2].partition("/")
        return f"{scheme}://{hosts}/{path.split('?', 1)[0]}"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def client_from_url(
    url: str, config: DedupConfig, *, client_name: str
) -> aredis.Redis | aredis.RedisCluster:
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
    if scheme == "redis+sentinel":
        return _sentinel_client(url, config, client_name)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster_client(url, config, client_name)
    if scheme not in SCHEMES:
        raise ValueError(
            f"unsupported Redis URL {describe_url(url)!r}: use redis://, rediss:// (TLS), "
            "unix://, redis+sentinel://host:port[,host:port...]/service, "
            "redis+cluster://host:port[,host:port...] or memory:// (embedded)"
        )
    options = _options(config, client_name)
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
        protocol=2,  # as every client built here: RESP2 works with either reply parser
    )
    return client


def _options(config: DedupConfig, client_name: str) -> dict[str, Any]:
    """What every client built here shares: the pool bound, the connect timeout, RESP2, no
    retries of its own (strands-dedup retries what is safe to repeat)."""
    return {
        "max_connections": config.max_connections,
        "socket_connect_timeout": config.connect_timeout,
        "client_name": client_name,
        "protocol": 2,
        "retry": Retry(NoBackoff(), 0),
    }


class _MultiHost(NamedTuple):
    """``scheme://[user:password@]host:port[,host:port...][/path]``, the path without query."""

    addresses: list[tuple[str, int]]
    path: str
    username: str | None
    password: str | None


def _multi_host(url: str, what: str) -> _MultiHost:
    rest = url.split("://", 1)[1]
    credentials, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    addresses: list[tuple[str, int]] = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name or not port.isdigit():
            raise ValueError(
                f"unusable {what} address {host!r} in {describe_url(url)!r}: use host:port"
            )
        addresses.append((name.strip("[]"), int(port)))
    username, _, password = credentials.partition(":")
    return _MultiHost(
        addresses, path.split("?", 1)[0], unquote(username) or None, unquote(password) or None
    )


def _cluster_client(url: str, config: DedupConfig, client_name: str) -> aredis.RedisCluster:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0]`` (``rediss+cluster`` for
    TLS): any reachable nodes; the rest of the cluster is discovered from them.

    The client follows MOVED/ASK redirections and refreshes its slot map after a connection
    error; retrying is left to strands-dedup as for a single Redis.
    """
    from redis.asyncio.cluster import ClusterNode

    parts = _multi_host(url, "cluster node")
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise ValueError(
            f"{describe_url(url)!r} names database {path!r}: a Redis Cluster has database 0 only"
        )
    return aredis.RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parts.addresses],
        socket_timeout=None,
        username=parts.username,
        password=parts.password,
        ssl=url.lower().startswith("rediss+cluster://"),
        **_options(config, client_name),
    )


def _sentinel_client(url: str, config: DedupConfig, client_name: str) -> aredis.Redis:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service_name[/db]``.

    The Sentinels are asked for the service's primary whenever a connection is made, so a
    failover is followed by reconnecting. Credentials are the Redis primary's.
    """
    from redis.asyncio.sentinel import Sentinel

    parts = _multi_host(url, "Sentinel")
    service, _, db = parts.path.partition("/")
    if not service:
        raise ValueError(
            f"{describe_url(url)!r} names no service: redis+sentinel://host:port/service_name"
        )
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} in {describe_url(url)!r} is not a number")
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parts.addresses,
        socket_connect_timeout=config.connect_timeout,
        socket_timeout=config.connect_timeout,
    )
    client: SentinelClient = sentinel.master_for(
        service,
        redis_class=SentinelClient,
        username=parts.username,
        password=parts.password,
        db=int(db or 0),
        **_options(config, client_name),
    )
    client.sentinel = sentinel
    return client


class SentinelClient(aredis.Redis):
    """A client of a Sentinel-managed primary that owns its Sentinel connections: closing the
    client closes them too."""

    sentinel: Any = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        sentinel, self.sentinel = self.sentinel, None
        if sentinel is not None:
            for node in sentinel.sentinels:
                await node.aclose()


def blocking_client_from_url(
    url: str, config: DedupConfig, *, client_name: str
) -> tuple[redis.Redis | redis.RedisCluster, Callable[[], None] | None]:
    """The blocking twin of `client_from_url` (the blocking shell's), and what closes what it
    opened besides the client (a Sentinel's connections), if anything. Its connections time out
    after ``socket_timeout``: a blocking call has no other bound. ``memory://`` shares the
    embedded server of the asyncio client with the same URL."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    options: dict[str, Any] = {
        "max_connections": config.max_connections,
        "socket_connect_timeout": config.connect_timeout,
        "socket_timeout": config.socket_timeout,
        "client_name": client_name,
        "protocol": 2,
        "retry": BlockingRetry(NoBackoff(), 0),
    }
    if scheme == "memory":
        import fakeredis

        name = url.split("://", 1)[1].strip("/") or "default"
        fake = fakeredis.FakeRedis(
            host=f"strands-dedup-memory/{name}",
            port=0,
            client_name=client_name,
            max_connections=config.max_connections,
            protocol=2,
        )
        return fake, None
    if scheme == "redis+sentinel":
        from redis.sentinel import Sentinel

        parts = _multi_host(url, "Sentinel")
        service, _, db = parts.path.partition("/")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            parts.addresses,
            socket_connect_timeout=config.connect_timeout,
            socket_timeout=config.connect_timeout,
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call]
            service,
            username=parts.username,
            password=parts.password,
            db=int(db or 0),
            **options,
        )

        def close_sentinels() -> None:
            for node in sentinel.sentinels:
                node.close()

        return client, close_sentinels
    if scheme in ("redis+cluster", "rediss+cluster"):
        from redis.cluster import ClusterNode

        parts = _multi_host(url, "cluster node")
        options.pop("max_connections")
        cluster = redis.RedisCluster(
            startup_nodes=[
                ClusterNode(host, port)  # type: ignore[no-untyped-call]
                for host, port in parts.addresses
            ],
            username=parts.username,
            password=parts.password,
            ssl=scheme == "rediss+cluster",
            max_connections=config.max_connections,
            **options,
        )
        return cluster, None
    if scheme == "unix":
        options.pop("socket_connect_timeout")
    # Threads beyond max_connections wait for a connection (up to pool_timeout), as the
    # asyncio shell's callers queue for one.
    pool = redis.BlockingConnectionPool.from_url(url, timeout=config.pool_timeout, **options)
    return redis.Redis.from_pool(pool), None
