"""A token's fences strictly increase, even after Redis lost its data (own servers: these
flush and restart them)."""

from __future__ import annotations

import pytest
import redis

from strands_dedup import Deduplicator, Role

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


async def fence_of(url: str) -> int:
    async with Deduplicator.from_url(url, namespace="ns", retry_deadline=5) as dedup:
        outcome = await dedup.execute("tok", lambda: "v")
        assert outcome.role is Role.PRIMARY
        return outcome.fence


async def test_fences_increase_across_a_flushall(redis_server_factory: type) -> None:
    server = redis_server_factory()
    first = await fence_of(server.url)
    client = redis.Redis.from_url(server.url)
    try:
        client.flushall()
    finally:
        client.close()
    assert await fence_of(server.url) > first


async def test_fences_increase_across_a_restart_without_persistence(
    redis_server_factory: type,
) -> None:
    server = redis_server_factory()  # --save "" --appendonly no: a restart forgets everything
    first = await fence_of(server.url)
    server.stop()
    server.start()
    assert await fence_of(server.url) > first
