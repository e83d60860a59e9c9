"""What one call costs Redis: the commands a replay and a fresh call send, the keys a completed
token leaves (own servers: these read INFO commandstats and count keys)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from servers import RedisServer

from strands_dedup import Deduplicator, FingerprintMismatch, Role

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

RESULT = b"ns:{:tok}:result"
"""The result key of token ``tok`` in namespace ``ns`` (no scope)."""


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


async def test_while_replays_are_common_a_replay_is_one_plain_get(
    server: RedisServer, client: redis.Redis
) -> None:
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        first = await dedup.execute("tok", lambda: "v")
        for _ in range(8):  # replays become common among this deduplicator's claims
            await dedup.execute("tok", lambda: "other")
        scripts, gets = calls(client, "evalsha") + calls(client, "eval"), calls(client, "get")
        again = await dedup.execute("tok", lambda: "other")
    assert (again.role, again.value, again.fence) == (Role.REPLAY, "v", first.fence)
    assert calls(client, "evalsha") + calls(client, "eval") == scripts
    assert calls(client, "get") == gets + 1


async def test_while_calls_are_fresh_a_claim_sends_no_read_first(
    server: RedisServer, client: redis.Redis
) -> None:
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        for i in range(8):
            await dedup.execute(f"fresh-{i}", lambda: "v")
        scripts, gets = calls(client, "evalsha") + calls(client, "eval"), calls(client, "get")
        await dedup.execute("tok", lambda: "v")  # a fresh call: the claim script first
        fresh_gets = calls(client, "get") - gets
        assert calls(client, "evalsha") + calls(client, "eval") == scripts + 2
        scripts, gets = calls(client, "evalsha") + calls(client, "eval"), calls(client, "get")
        again = await dedup.execute("tok", lambda: "other")  # a rare replay: the script answers
    assert again.role is Role.REPLAY and again.value == "v"
    assert calls(client, "evalsha") + calls(client, "eval") == scripts + 1
    # the fresh call's GETs are the scripts' own (the claim's of the result, the settle's of the
    # fence): a read first would have made it one more
    assert fresh_gets == 2


async def test_a_completed_token_leaves_one_key(server: RedisServer, client: redis.Redis) -> None:
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        await dedup.execute("tok", lambda: "v")
    assert client.keys("ns:{*") == [RESULT]


async def test_a_result_stored_in_the_previous_format_is_replayed(
    server: RedisServer, client: redis.Redis
) -> None:
    header = '{"st":"ok","f":1796200759227312,"fp":"abc","ser":"json","t":1,"tok":"tok","sc":""}'
    client.set(RESULT, f"SD1|8c78843340|{header}\n".encode() + b'{"n":1}', px=60_000)
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        outcome = await dedup.execute("tok", lambda: {"n": 2}, fingerprint="abc")
        assert (outcome.role, outcome.value, outcome.fence) == (
            Role.REPLAY,
            {"n": 1},
            1796200759227312,
        )
        with pytest.raises(FingerprintMismatch):
            await dedup.execute("tok", lambda: {"n": 3}, fingerprint="other")
