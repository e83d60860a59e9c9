"""An evicting maxmemory-policy is reported: logged once per process, in health(), in
`strands-dedup stats`; ``require_noeviction=True`` refuses it. Own servers (policies, ACLs)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from servers import node_command

from strands_dedup import Deduplicator, StoreRefused, SyncDeduplicator

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


async def test_an_evicting_policy_is_warned_once_and_shown_in_health(
    redis_server_factory: type, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory("--maxmemory-policy", "volatile-lru")
    with caplog.at_level(logging.WARNING, logger="strands_dedup"):
        for _ in range(2):
            async with Deduplicator.from_url(server.url, namespace="ns", metrics=False) as dedup:
                assert (await dedup.execute("tok", lambda: 1)).value == 1
                health = await dedup.health()
    warned = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warned) == 1 and "volatile-lru" in warned[0] and "noeviction" in warned[0]
    assert health.eviction_policy == "volatile-lru"
    assert health.ok and "volatile-lru" in health.warnings[0]
    assert health.to_json()["eviction_policy"] == "volatile-lru"  # what /readyz shows


async def test_noeviction_is_not_warned(redis_server_factory: type) -> None:
    server = redis_server_factory("--maxmemory-policy", "noeviction")
    async with Deduplicator.from_url(
        server.url, namespace="ns", require_noeviction=True, metrics=False
    ) as dedup:
        health = await dedup.health()
    assert (health.eviction_policy, health.warnings) == ("noeviction", [])


async def test_require_noeviction_refuses_to_start(redis_server_factory: type) -> None:
    server = redis_server_factory("--maxmemory-policy", "allkeys-lru")
    dedup = Deduplicator.from_url(server.url, namespace="ns", require_noeviction=True)
    with pytest.raises(StoreRefused, match="allkeys-lru") as info:
        await dedup.execute("tok", lambda: 1)
    assert info.value.server_message == "maxmemory-policy allkeys-lru"
    with pytest.raises(StoreRefused):
        async with dedup:
            pass
    await dedup.aclose()
    with pytest.raises(StoreRefused, match="allkeys-lru"):  # noqa: SIM117
        with SyncDeduplicator.from_url(server.url, namespace="ns", require_noeviction=True):
            pass


async def test_a_policy_config_cannot_read_is_unknown(redis_server_factory: type) -> None:
    server = redis_server_factory()
    node_command(server.port, "ACL", "SETUSER", "app", "on", ">pw", "~*", "&*", "+@all", "-config")
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    async with Deduplicator.from_url(url, namespace="ns", metrics=False) as dedup:
        assert (await dedup.execute("tok", lambda: 1)).value == 1
        health = await dedup.health()
    assert health.eviction_policy == "unknown" and "cannot be read" in health.warnings[0]
    with pytest.raises(StoreRefused, match="cannot be read"):
        async with Deduplicator.from_url(url, namespace="ns", require_noeviction=True):
            pass


def test_stats_shows_the_policy(redis_server_factory: type) -> None:
    server = redis_server_factory("--maxmemory-policy", "allkeys-random")
    command = [sys.executable, "-m", "strands_dedup.cli", "--redis-url", server.url, "stats"]
    shown = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    stats = json.loads(shown.stdout)
    assert stats["eviction_policy"] == "allkeys-random" and "noeviction" in stats["warnings"][0]
    table = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert "allkeys-random" in table.stdout and "Warning:" in table.stderr
