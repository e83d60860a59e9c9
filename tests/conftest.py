"""Shared fixtures.

Real-Redis tests use, in order: ``STRANDS_DEDUP_TEST_REDIS_URL``; a Redis on 127.0.0.1:6379; a
redis-server started from the PATH on a free port. ``STRANDS_DEDUP_TEST_SERVER=/path/to/server``
(e.g. a Valkey build) starts every test server, Sentinel and cluster node from that binary instead,
and uses neither of the first two. When none is found they skip, unless
``STRANDS_DEDUP_REQUIRE_REDIS=1`` (set by .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from children import WORKER, Child
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import (
    REDIS_CLI,
    REDIS_SERVER,
    SERVER_OVERRIDE,
    ClusterSetup,
    RedisServer,
    SentinelSetup,
    reachable,
)

REQUIRE_REDIS = os.environ.get("STRANDS_DEDUP_REQUIRE_REDIS") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n``, ``--dist loadgroup``), a module whose tests share a
    module-scoped fixture (a gateway, an upstream, an S3 server) runs on one worker, so the
    fixture starts once; other tests go to whichever worker is free. Session-scoped servers
    (the Redis Cluster, the Sentinels) are started once per worker, so no test sees another
    worker's failovers, flushed scripts or connections."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(
            fixture.scope == "module"
            for fixtures in info.name2fixturedefs.values()
            for fixture in fixtures
        ):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis for this test session."""
    url = os.environ.get("STRANDS_DEDUP_TEST_REDIS_URL")
    if SERVER_OVERRIDE:
        # STRANDS_DEDUP_TEST_SERVER names the server binary under test: start it, use nothing else
        server = RedisServer()
        try:
            yield server.url
        finally:
            server.close()
        return
    if url:
        if not reachable(url):
            pytest.fail(f"STRANDS_DEDUP_TEST_REDIS_URL={url} is not reachable")
        yield url
        return
    if reachable("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    if REDIS_SERVER is not None:
        server = RedisServer()
        try:
            yield server.url
        finally:
            server.close()
        return
    message = "no Redis found (no STRANDS_DEDUP_TEST_REDIS_URL, nothing on :6379, no redis-server)"
    if REQUIRE_REDIS:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of this test's own; its keys are deleted afterwards on the real Redis."""
    ns = f"t-{uuid.uuid4().hex[:10]}"
    yield ns
    if "redis_url" in request.fixturenames:
        url = request.getfixturevalue("redis_url")
        # retried once: a test elsewhere on this Redis may kill every client connection
        client = redis.Redis.from_url(
            url, retry=Retry(NoBackoff(), 2), retry_on_error=[redis.ConnectionError]
        )
        try:
            keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        finally:
            client.close()


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each contract test runs on the embedded memory:// store, on a real Redis and on a real
    Redis Cluster."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex[:8]}"
    if request.param == "cluster":
        cluster: ClusterSetup = request.getfixturevalue("cluster_setup")
        return cluster.url
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
async def dedup(backend_url: str, namespace: str) -> AsyncIterator[object]:
    from strands_dedup import Deduplicator

    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as d:
        yield d


@pytest.fixture
def redis_server_factory() -> Iterator[type[RedisServer]]:
    """Start extra redis-server processes (stopped at teardown); skips if there is none."""
    if REDIS_SERVER is None:
        if REQUIRE_REDIS:
            pytest.fail("redis-server is not on the PATH")
        pytest.skip("redis-server is not on the PATH")
    started: list[RedisServer] = []

    class Factory(RedisServer):
        def __init__(self, *args: str, port: int | None = None) -> None:
            super().__init__(*args, port=port)
            started.append(self)

    yield Factory
    for server in started:
        server.close()


def need_binaries(*found: str | None) -> None:
    """Skip (fail when Redis is required) unless redis-server (and redis-cli) are installed."""
    if None in found:
        message = "redis-server and redis-cli must be on the PATH"
        if REQUIRE_REDIS:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A primary, a replica and three Sentinels for the session (started on first use)."""
    need_binaries(REDIS_SERVER)
    setup = SentinelSetup()
    yield setup
    setup.close()


@pytest.fixture(scope="session")
def cluster_setup() -> Iterator[ClusterSetup]:
    """Three primaries and three replicas in a Redis Cluster for the session (on first use)."""
    need_binaries(REDIS_SERVER, REDIS_CLI)
    setup = ClusterSetup()
    yield setup
    setup.close()


@pytest.fixture
def fresh_cluster() -> Iterator[Callable[..., ClusterSetup]]:
    """``fresh_cluster(*redis_server_args)``: a throwaway cluster of this test's own (to kill
    nodes in or migrate slots of), stopped at teardown."""
    need_binaries(REDIS_SERVER, REDIS_CLI)
    started: list[ClusterSetup] = []

    def start(*args: str) -> ClusterSetup:
        started.append(ClusterSetup(*args))
        return started[-1]

    yield start
    for cluster in started:
        cluster.close()


class Target:
    """Where a multi-process test runs: ``url`` for the deduplicators, ``side_url`` for
    inspecting and synchronizing (a plain ``redis://`` URL of the current primary, or
    ``redis+cluster://`` for a cluster: open it with `side_client`)."""

    def __init__(self, url: str, side_url: str) -> None:
        self.url = url
        self.side_url = side_url


def side_client(url: str, **options: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking client of ``url`` (``redis+cluster://host:port`` opens a cluster client)."""
    if url.startswith("redis+cluster://"):
        first = url.split("://", 1)[1].split(",", 1)[0].split("/", 1)[0]
        return redis.RedisCluster.from_url(f"redis://{first}", **options)
    return redis.Redis.from_url(url, **options)


@pytest.fixture(params=["redis", "sentinel", "cluster"])
def target(request: pytest.FixtureRequest) -> Target:
    """A single Redis, a primary behind three Sentinels (``redis+sentinel://``), or a Redis
    Cluster (``redis+cluster://``)."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return Target(url, url)
    if request.param == "cluster":
        cluster: ClusterSetup = request.getfixturevalue("cluster_setup")
        return Target(cluster.url, cluster.url)
    setup: SentinelSetup = request.getfixturevalue("sentinel_setup")
    port = setup.primary_port()
    assert port is not None, "the Sentinels know no primary"
    return Target(setup.url, f"redis://127.0.0.1:{port}/0")


@pytest.fixture
def make(backend_url: str, namespace: str) -> Callable[..., Any]:
    """``async with make(**options) as dedup``: a deduplicator on this test's backend."""
    from strands_dedup import Deduplicator

    @asynccontextmanager
    async def factory(**options: Any) -> AsyncIterator[Deduplicator]:
        options.setdefault("lease_ttl", 2)
        async with Deduplicator.from_url(backend_url, namespace=namespace, **options) as d:
            yield d

    return factory


@pytest.fixture
async def children() -> AsyncIterator[Callable[..., Awaitable[Child]]]:
    """Start worker children (tests/proc_worker.py unless ``worker=``); every one is killed
    and reaped at teardown."""
    started: list[Child] = []

    async def spawn(*args: str, worker: str = WORKER) -> Child:
        child = await Child.start(*args, worker=worker)
        started.append(child)
        return child

    yield spawn
    for child in started:
        await child.stop()


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A command run in-process (the gateway's CLI configures logging before it serves) leaves
    the library's and uvicorn's loggers as it found them."""
    import logging

    loggers = [logging.getLogger(name) for name in ("strands_dedup", "uvicorn")]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for lg, (handlers, level, propagate, disabled) in zip(loggers, saved, strict=True):
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled
