"""What one call costs Redis: the commands a replay sends, the keys a completed token leaves
(own servers: these read INFO commandstats and count keys)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from servers import RedisServer
from strands_dedup import Deduplicator, Role, SyncDeduplicator

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def server(redis_server_factory: type[RedisServer]) -> RedisServer:
    return redis_server_factory()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


def calls(client: redis.Redis, command: str) -> int:
    """How many times the server ran ``command`` (INFO commandstats)."""
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


async def test_a_replay_is_one_plain_get(server: RedisServer, client: redis.Redis) -> None:
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        first = await dedup.execute("tok", lambda: "v")
        scripts, gets = calls(client, "evalsha") + calls(client, "eval"), calls(client, "get")
        again = await dedup.execute("tok", lambda: "other")
    assert (again.role, again.value, again.fence) == (Role.REPLAY, "v", first.fence)
    assert calls(client, "evalsha") + calls(client, "eval") == scripts
    assert calls(client, "get") == gets + 1


def test_a_blocking_replay_is_one_plain_get(server: RedisServer, client: redis.Redis) -> None:
    with SyncDeduplicator.from_url(server.url, namespace="ns") as dedup:
        first = dedup.execute("tok", lambda: "v")
        scripts, gets = calls(client, "evalsha") + calls(client, "eval"), calls(client, "get")
        again = dedup.execute("tok", lambda: "other")
    assert (again.role, again.value, again.fence) == (Role.REPLAY, "v", first.fence)
    assert calls(client, "evalsha") + calls(client, "eval") == scripts
    assert calls(client, "get") == gets + 1
