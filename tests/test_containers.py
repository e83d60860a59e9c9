"""The contract's core on other servers started with testcontainers (Redis 7.4, Valkey 8).

These need a Docker engine; where none is reachable they skip and say so. The rest of the
suite covers the local redis-server on every run.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator

import pytest

from strands_dedup import Deduplicator, Role

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]


def _docker_available() -> str | None:
    """None when a Docker engine answers /_ping, else the reason to skip."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(3)
            try:
                sock.connect(host[len("unix://") :])
            except OSError:
                sock.close()
                raise
        else:
            address = host.split("://", 1)[-1].rsplit(":", 1)
            sock = socket.create_connection((address[0], int(address[1])), timeout=3)
        with sock:
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            if b" 200 " not in sock.recv(256):
                return f"the Docker engine at {host} did not answer /_ping"
    except (OSError, ValueError, IndexError) as exc:
        return f"no Docker engine reachable at {host} ({exc}): container tests need one"
    return None


@pytest.fixture(scope="module", params=["redis:7.4-alpine", "valkey/valkey:8-alpine"])
def container_url(request: pytest.FixtureRequest) -> Iterator[str]:
    reason = _docker_available()
    if reason:
        pytest.skip(reason)
    from testcontainers.redis import RedisContainer

    with RedisContainer(request.param) as container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


async def test_storm_replay_and_takeover(container_url: str) -> None:
    async with Deduplicator.from_url(container_url, namespace="containers", lease_ttl=1) as dedup:
        release = asyncio.Event()
        runs = 0

        async def call() -> str:
            nonlocal runs
            runs += 1
            await release.wait()
            return "once"

        tasks = [asyncio.create_task(dedup.execute("storm", call)) for _ in range(50)]
        while dedup.activity().listening < 49:
            await asyncio.sleep(0.01)
        release.set()
        outcomes = await asyncio.gather(*tasks)
        assert runs == 1 and {o.value for o in outcomes} == {"once"}
        assert (await dedup.execute("storm", call)).role is Role.REPLAY

        blocked = asyncio.create_task(dedup.execute("crash", asyncio.Event().wait))
        while dedup.activity().in_flight < 1:
            await asyncio.sleep(0.01)
        blocked.cancel()
        assert (await dedup.execute("crash", lambda: "after")).value == "after"
