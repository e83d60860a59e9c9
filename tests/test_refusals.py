"""Redis refusals reach the caller as `StoreRefused` (a `StoreUnavailable`), carrying what the
server said. Each test starts its own redis-server: they set maxmemory, ACL users, replicas."""

from __future__ import annotations

import pytest
from servers import node_command

from strands_dedup import Deduplicator, StoreRefused, StoreUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

FAST = {"namespace": "ns", "retry_attempts": 2, "retry_deadline": 1, "metrics": False}


async def refusal(url: str) -> StoreRefused:
    async with Deduplicator.from_url(url, **FAST) as dedup:
        with pytest.raises(StoreRefused) as info:
            await dedup.execute("tok", lambda: "v")
    assert isinstance(info.value, StoreUnavailable)
    return info.value


async def test_out_of_memory_is_a_refusal(redis_server_factory: type) -> None:
    server = redis_server_factory("--maxmemory", "1", "--maxmemory-policy", "noeviction")
    error = await refusal(server.url)
    assert "OOM" in error.server_message and error.server_message in str(error)


async def test_a_missing_permission_is_a_refusal(redis_server_factory: type) -> None:
    server = redis_server_factory()
    node_command(server.port, "ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-evalsha")
    error = await refusal(f"redis://app:pw@127.0.0.1:{server.port}/0")
    assert "NOPERM" in error.server_message or "permission" in error.server_message


async def test_a_replica_is_a_refusal(redis_server_factory: type) -> None:
    primary = redis_server_factory()
    replica = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    error = await refusal(replica.url)
    assert "READONLY" in error.server_message or "read only" in error.server_message


async def test_wrong_credentials_are_a_refusal(redis_server_factory: type) -> None:
    server = redis_server_factory("--requirepass", "right")
    error = await refusal(f"redis://:wrong@127.0.0.1:{server.port}/0")
    assert "credentials" in str(error)
