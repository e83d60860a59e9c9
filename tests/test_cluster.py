"""On a real Redis Cluster (three primaries, three replicas): one slot per script, sharded
pub/sub with one subscriber connection per shard, renewals across slots, the CLI over every
primary, WAIT on the slot's primary, and a failover of a token's primary during a storm.

(The contract tests run on the cluster through the ``backend_url`` fixture, and the
multi-process storm, takeover and zombie tests through ``target``.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import redis
import redis.asyncio as aredis
import redis.crc
from servers import REDIS_CLI, REDIS_SERVER, ClusterSetup

from strands_dedup import Deduplicator, LeaseLost, Role
from strands_dedup.admin import Inspector
from strands_dedup.keys import KeySchema

pytestmark = [pytest.mark.redis]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await asyncio.sleep(0.01)


def tokens_per_shard(cluster: ClusterSetup, namespace: str, each: int) -> dict[int, list[str]]:
    """``each`` tokens whose slot lives on each primary, by the primary's port."""
    keys = KeySchema(namespace)
    found: dict[int, list[str]] = {}
    i = 0
    while len(found) < 3 or any(len(v) < each for v in found.values()):
        token = f"tok-{i}"
        port = cluster.primary_port_for(keys.for_token(token).lease)
        if len(found.setdefault(port, [])) < each:
            found[port].append(token)
        i += 1
    return found


def sub_connections(port: int) -> list[str]:
    """Names of the subscriber connections on one node (CLIENT LIST, ``...:sub``)."""
    client = redis.Redis(port=port)
    try:
        return [c["name"] for c in client.client_list() if c.get("name", "").endswith(":sub")]
    finally:
        client.close()


def test_bad_cluster_urls_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="unusable cluster node address 'nohost'"):
        Deduplicator.from_url("redis+cluster://nohost/0")
    with pytest.raises(ValueError, match="database 0 only"):
        Deduplicator.from_url("redis+cluster://127.0.0.1:7000/3")


@pytest.mark.timeout(60)
async def test_waiters_share_one_sharded_connection_per_shard(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 2)
    tokens = [t for group in shards.values() for t in group]
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "done"

    options = {"namespace": namespace, "lease_ttl": 5, "metrics": False}
    async with (
        Deduplicator.from_url(cluster_setup.url, **options) as primary,
        Deduplicator.from_url(cluster_setup.url, **options) as others,
    ):
        held = [asyncio.create_task(primary.execute(t, slow)) for t in tokens]
        await until(lambda: primary._renewer.held == len(tokens), 10, "every token is held")
        waiting = [asyncio.create_task(others.execute(t, slow)) for t in tokens for _ in range(5)]
        await until(lambda: others._subscriber.listening == len(waiting), 10, "all wait")

        assert others._subscriber.shards == 3
        for port in shards:
            # one subscriber connection on each primary, shared by its 10 waiters
            assert len(sub_connections(port)) == 1, port
        keys = KeySchema(namespace)
        cluster = aredis.RedisCluster.from_url(f"redis://127.0.0.1:{next(iter(shards))}")
        try:
            await cluster.initialize()
            for port, group in shards.items():
                node = cluster.get_node(host="127.0.0.1", port=port)
                channels = [keys.for_token(t).channel for t in group]
                sharded = await cluster.execute_command(
                    "PUBSUB SHARDNUMSUB", *channels, target_nodes=node
                )
                plain = await cluster.execute_command("PUBSUB NUMSUB", *channels, target_nodes=node)
                assert [int(n) for _, n in sharded] == [1, 1]  # SSUBSCRIBE, not SUBSCRIBE
                assert [int(n) for _, n in plain] == [0, 0]
        finally:
            await cluster.aclose()

        gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*held, *waiting), 20)
    assert all(o.value == "done" for o in outcomes)
    assert [o.role for o in outcomes[: len(tokens)]] == [Role.PRIMARY] * len(tokens)
    assert {o.role for o in outcomes[len(tokens) :]} == {Role.WAITER}


@pytest.mark.timeout(60)
async def test_leases_on_every_shard_are_renewed(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    tokens = [t for group in tokens_per_shard(cluster_setup, namespace, 5).values() for t in group]
    runs: list[str] = []

    async def work(token: str) -> str:
        runs.append(token)
        await asyncio.sleep(2.5)  # 2.5 lease TTLs: only renewals keep the leases alive
        return token

    options = {"namespace": namespace, "lease_ttl": 1, "metrics": False}
    async with (
        Deduplicator.from_url(cluster_setup.url, **options) as a,
        Deduplicator.from_url(cluster_setup.url, **options) as b,
    ):
        first = [asyncio.create_task(a.execute(t, lambda t=t: work(t))) for t in tokens]
        await until(lambda: a._renewer.held == len(tokens), 10, "every token is held")
        second = [asyncio.create_task(b.execute(t, lambda t=t: work(t))) for t in tokens]
        outcomes = await asyncio.wait_for(asyncio.gather(*first, *second), 30)
        assert b.counters.get("takeovers", 0) == 0
    assert sorted(runs) == sorted(tokens)  # each once: no lease expired under its primary
    assert [o.value for o in outcomes] == tokens + tokens
    assert {o.fence for o in outcomes} == {1}


@pytest.mark.timeout(60)
async def test_the_cli_lists_the_leases_of_every_primary(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 1)
    tokens = sorted(t for group in shards.values() for t in group)
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "done"

    options = {"namespace": namespace, "lease_ttl": 10, "metrics": False}
    async with (
        Deduplicator.from_url(cluster_setup.url, **options) as primary,
        Deduplicator.from_url(cluster_setup.url, **options) as other,
    ):
        held = [asyncio.create_task(primary.execute(t, slow)) for t in tokens]
        await until(lambda: primary._renewer.held == 3, 10, "every token is held")
        waiter = asyncio.create_task(other.execute(tokens[0], slow))
        await until(lambda: other._subscriber.listening == 1, 10, "one duplicate waits")

        async with Inspector.from_url(cluster_setup.url, namespace=namespace) as inspector:
            views = {v.token: v for v in await inspector.leases()}
        assert sorted(views) == tokens
        assert [views[t].listeners for t in tokens] == [1, 0, 0]
        assert {views[t].pid for t in tokens} == {os.getpid()}

        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "strands_dedup.cli",
            "--redis-url",
            cluster_setup.url,
            "--namespace",
            namespace,
            "ls",
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        listed = json.loads(out)
        assert sorted(x["token"] for x in listed) == tokens
        gate.set()
        await asyncio.wait_for(asyncio.gather(*held, waiter), 10)

    async with Inspector.from_url(cluster_setup.url, namespace=namespace) as inspector:
        assert await inspector.leases() == []
        assert (await inspector.stats()).results == 3


@pytest.mark.timeout(60)
async def test_release_wakes_the_waiters_on_the_tokens_shard(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    gate = asyncio.Event()

    async def slow() -> str:
        await gate.wait()
        return "late"

    options = {"namespace": namespace, "lease_ttl": 30, "metrics": False}
    async with (
        Deduplicator.from_url(cluster_setup.url, **options) as primary,
        Deduplicator.from_url(cluster_setup.url, **options) as other,
    ):
        held = asyncio.create_task(primary.execute("tok", slow))
        await until(lambda: primary._renewer.held == 1, 10, "the token is held")
        waiter = asyncio.create_task(other.execute("tok", lambda: "mine"))
        await until(lambda: other._subscriber.listening == 1, 10, "the duplicate waits")
        async with Inspector.from_url(cluster_setup.url, namespace=namespace) as inspector:
            released = await inspector.release("tok")
        assert released is not None and released.listeners == 1
        outcome = await asyncio.wait_for(waiter, 10)  # woken at once, not after 30 s
        # release moved the fence to 2 (fencing the old primary off); the takeover claimed 3
        assert (outcome.role, outcome.value, outcome.fence) == (Role.TAKEOVER, "mine", 3)
        gate.set()
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(held, 10)


@pytest.mark.timeout(60)
async def test_min_replicas_waits_on_the_slots_primary(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    for node in cluster_setup.nodes:  # the scripts must be loaded again (NOSCRIPT) on the way
        client = redis.Redis(port=node.port)
        try:
            client.script_flush()
        finally:
            client.close()
    options = {"namespace": namespace, "min_replicas": 1, "replica_timeout": 5, "metrics": False}
    async with Deduplicator.from_url(cluster_setup.url, **options) as dedup:
        tokens = [
            t for group in tokens_per_shard(cluster_setup, namespace, 1).values() for t in group
        ]
        outcomes = [await dedup.execute(t, lambda t=t: {"t": t}) for t in tokens]
        assert [o.role for o in outcomes] == [Role.PRIMARY] * 3
        again = [await dedup.execute(t, lambda: {"t": "other"}) for t in tokens]
        assert [o.value for o in again] == [{"t": t} for t in tokens]
    # every result reached the replica of its shard before the call returned
    keys = KeySchema(namespace)
    for token in tokens:
        result = keys.for_token(token).result
        primary = cluster_setup.primary_port_for(result)
        replica = next(
            n
            for n in cluster_setup.nodes
            if n.port != primary
            and redis.Redis(port=n.port).info("replication").get("master_port") == primary
        )
        client = redis.Redis(port=replica.port)
        try:
            client.execute_command("READONLY")
            assert client.exists(result) == 1
        finally:
            client.close()


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are needed"
)
async def test_waiters_follow_their_channel_when_its_slot_migrates(namespace: str) -> None:
    cluster = ClusterSetup()
    try:
        keys = KeySchema(namespace).for_token("tok")
        options = {"namespace": namespace, "lease_ttl": 2, "wait_timeout": 30, "metrics": False}
        async with (
            Deduplicator.from_url(cluster.url, **options) as primary,
            Deduplicator.from_url(cluster.url, **options) as others,
        ):
            gate = asyncio.Event()
            runs = 0

            async def call() -> str:
                nonlocal runs
                runs += 1
                await gate.wait()
                return "done"

            first = asyncio.create_task(primary.execute("tok", call))
            await until(lambda: runs == 1, 10, "the primary runs")
            waiters = [asyncio.create_task(others.execute("tok", call)) for _ in range(20)]
            await until(lambda: others._subscriber.listening == 20, 10, "20 duplicates wait")
            source = cluster.primary_port_for(keys.lease)
            target = next(
                p for p in (n.port for n in cluster.nodes) if p != source and is_primary(p)
            )
            connects = others._subscriber.connects
            cluster.migrate_slot(redis.crc.key_slot(keys.lease), source, target)
            # the source drops the shard channel's subscribers; they move to the new shard
            await until(lambda: others._subscriber.connects > connects, 10, "resubscribed")
            await until(lambda: shard_listeners(target, keys.channel) == 1, 10, "moved")
            assert shard_listeners(source, keys.channel) == 0
            gate.set()
            outcomes = await asyncio.wait_for(asyncio.gather(first, *waiters), 30)
        assert runs == 1
        assert [o.value for o in outcomes] == ["done"] * 21
        assert {o.role for o in outcomes[1:]} == {Role.WAITER}
    finally:
        cluster.close()


def is_primary(port: int) -> bool:
    client = redis.Redis(port=port)
    try:
        return client.info("replication").get("role") == "master"
    finally:
        client.close()


def shard_listeners(port: int, channel: bytes) -> int:
    client = redis.Redis(port=port)
    try:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        return int(reply[1])
    finally:
        client.close()


async def test_an_explicit_cluster_client_is_accepted(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    client = aredis.RedisCluster.from_url(f"redis://127.0.0.1:{cluster_setup.nodes[0].port}")
    try:
        async with Deduplicator(client, namespace=namespace, metrics=False) as dedup:
            first = await dedup.execute("t", lambda: 1)
            second = await dedup.execute("t", lambda: 2)
        assert (first.role, second.role, second.value) == (Role.PRIMARY, Role.REPLAY, 1)
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    REDIS_SERVER is None or REDIS_CLI is None, reason="redis-server and redis-cli are needed"
)
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_a_failover_of_the_tokens_primary_during_a_storm_loses_no_waiter(
    namespace: str, min_replicas: int
) -> None:
    cluster = ClusterSetup()
    try:
        options = {
            "min_replicas": min_replicas,  # 1: the completion goes to the slot's new primary
            "replica_timeout": 2,
            "namespace": namespace,
            "lease_ttl": 5,
            "wait_timeout": 60,
            "retry_attempts": 20,
            "retry_deadline": 40,
            "metrics": False,
        }
        keys = KeySchema(namespace).for_token("tok")
        async with (
            Deduplicator.from_url(cluster.url, **options) as primary,
            Deduplicator.from_url(cluster.url, **options) as others,
        ):
            gate = asyncio.Event()
            runs = 0

            async def call() -> dict[str, str]:
                nonlocal runs
                runs += 1
                await gate.wait()
                return {"by": "primary"}

            first = asyncio.create_task(primary.execute("tok", call))
            await until(lambda: runs == 1, 10, "the primary runs")
            waiters = [asyncio.create_task(others.execute("tok", call)) for _ in range(50)]
            await until(lambda: others._subscriber.listening == 50, 10, "50 duplicates wait")
            doomed = cluster.primary_port_for(keys.lease)
            side = redis.Redis(port=doomed)
            assert side.execute_command("WAIT", 1, 2000) == 1  # the claim is on the replica
            side.close()
            connects = others._subscriber.connects

            node = cluster.node(doomed)
            assert node.proc is not None
            node.proc.kill()  # the token's primary dies: the cluster promotes its replica
            node.proc.wait()
            node.proc = None

            def promoted() -> bool:
                try:
                    return cluster.primary_port_for(keys.lease) != doomed
                except LookupError:
                    return False

            await until(promoted, 30, "a replica takes over the slot")
            await until(lambda: others._subscriber.connects > connects, 30, "waiters resubscribe")
            gate.set()
            outcomes = await asyncio.wait_for(asyncio.gather(first, *waiters), 60)
        assert runs == 1
        assert outcomes[0].role is Role.PRIMARY
        assert all(o.value == {"by": "primary"} for o in outcomes)
        assert {o.role for o in outcomes[1:]} == {Role.WAITER}
    finally:
        cluster.close()
