"""What one call costs Redis: the commands a replay sends, the keys a completed token leaves
(own servers: these read INFO commandstats and count keys)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from servers import RedisServer

from strands_dedup import Deduplicator, FingerprintMismatch, Role, SyncDeduplicator
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._keys import KeySchema
from strands_dedup._protocol import Claimed, encode_lease
from strands_dedup._store.commands import HeldLeaseRef, Settled

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


async def test_a_completed_token_leaves_one_key(server: RedisServer, client: redis.Redis) -> None:
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        await dedup.execute("tok", lambda: "v")
    keys = KeySchema("ns").for_token("tok")
    assert client.keys("ns:{*") == [keys.result]


async def test_a_zombie_is_refused_once_the_result_deleted_the_fence(
    server: RedisServer, client: redis.Redis
) -> None:
    keys = KeySchema("ns").for_token("tok")
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        store = engine_of(dedup).store
        zombie = await store.claim(keys, "aaaa", b"{}")
        assert isinstance(zombie, Claimed)
        client.delete(keys.lease)  # its lease ran out while it was paused
        taker = await store.claim(keys, "bbbb", b"{}")
        assert isinstance(taker, Claimed) and taker.fence > zombie.fence
        envelope = b"SD1|bbbb|{}\n1"
        assert (await store.settle(keys, "bbbb", taker.fence, envelope, b"x")).ok
        assert client.exists(keys.fence, keys.lease) == 0
        # the takeover's settle, sent twice (a retry whose first copy ran), is accepted again
        assert (await store.settle(keys, "bbbb", taker.fence, envelope, b"x")).ok
        lease = encode_lease("aaaa", zombie.fence, b"{}")
        assert await store.renew([HeldLeaseRef(keys, lease)]) == [False]
        late = await store.settle(keys, "aaaa", zombie.fence, b"SD1|aaaa|{}\n2", b"x")
        assert late == Settled(False, "fence")
        assert not await store.append(keys, "aaaa", zombie.fence, [(b"c", b"x")], 1000, 0)
        assert await store.force_release(keys, "aaaa") is None
    assert client.get(keys.result) == envelope
    assert client.exists(keys.lease) == 0


async def test_a_result_stored_in_the_previous_format_is_replayed(
    server: RedisServer, client: redis.Redis
) -> None:
    keys = KeySchema("ns").for_token("tok")
    header = '{"st":"ok","f":1796200759227312,"fp":"abc","ser":"json","t":1,"tok":"tok","sc":""}'
    client.set(keys.result, f"SD1|8c78843340|{header}\n".encode() + b'{"n":1}', px=60_000)
    async with Deduplicator.from_url(server.url, namespace="ns") as dedup:
        outcome = await dedup.execute("tok", lambda: {"n": 2}, fingerprint="abc")
        assert (outcome.role, outcome.value, outcome.fence) == (
            Role.REPLAY,
            {"n": 1},
            1796200759227312,
        )
        with pytest.raises(FingerprintMismatch):
            await dedup.execute("tok", lambda: {"n": 3}, fingerprint="other")
