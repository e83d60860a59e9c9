"""On a real Redis Cluster (three primaries, three replicas): one slot per script, sharded
pub/sub with one subscriber connection per shard, renewals across slots, the CLI over every
primary, WAIT on the slot's primary, and a failover of a token's primary during a storm.

(The contract tests run on the cluster through the ``backend_url`` fixture, and the
multi-process storm, takeover and zombie tests through ``target``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis
import redis.asyncio as aredis
import redis.crc
from failover import Gated, storm_across, until
from servers import ClusterSetup, free_port, node_command

from strands_dedup import Deduplicator, LeaseLost, Outcome, Role, StoreUnavailable
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._keys import KeySchema
from strands_dedup.cli import Inspector

pytestmark = [pytest.mark.redis]


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
    listing = str(node_command(port, "CLIENT", "LIST"))
    names = (field[5:] for line in listing.splitlines() for field in line.split(" "))
    return [name for name in names if name.endswith(":sub")]


def is_primary(port: int) -> bool:
    return bool(node_command(port, "INFO", "replication")["role"] == "master")


def shard_listeners(port: int, channel: bytes) -> int:
    return int(node_command(port, "PUBSUB", "SHARDNUMSUB", channel)[1])


class Holding:
    """``primary`` runs each of ``tokens`` (`slow`) until its gate is set; ``other`` has
    duplicates of them waiting (`holding`)."""

    def __init__(self, primary: Deduplicator, other: Deduplicator) -> None:
        self.primary, self.other = primary, other
        self.slow = Gated("done")
        self.gate = self.slow.gate
        self.held: list[asyncio.Task[Outcome[str]]] = []
        self.waiting: list[asyncio.Task[Outcome[str]]] = []

    async def finish(self) -> list[Outcome[str]]:
        self.gate.set()
        return await asyncio.wait_for(asyncio.gather(*self.held, *self.waiting), 20)

    async def settle(self) -> list[Outcome[str] | BaseException]:
        """Like `finish`, with the errors in the list."""
        self.gate.set()
        every = asyncio.gather(*self.held, *self.waiting, return_exceptions=True)
        return await asyncio.wait_for(every, 20)


@contextlib.asynccontextmanager
async def holding(
    url: str, namespace: str, tokens: list[str], waiting_on: list[str], lease_ttl: float = 10
) -> AsyncIterator[Holding]:
    options = {"namespace": namespace, "lease_ttl": lease_ttl, "metrics": False}
    async with (
        Deduplicator.from_url(url, **options) as primary,
        Deduplicator.from_url(url, **options) as other,
    ):
        state = Holding(primary, other)
        state.held = [asyncio.create_task(primary.execute(t, state.slow)) for t in tokens]
        await until(lambda: primary.activity().in_flight == len(tokens), 10, "every token is held")
        state.waiting = [asyncio.create_task(other.execute(t, state.slow)) for t in waiting_on]
        await until(lambda: other.activity().listening == len(waiting_on), 10, "all wait")
        try:
            yield state
        finally:
            state.gate.set()


def test_bad_cluster_urls_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="unusable cluster node address 'nohost'"):
        Deduplicator.from_url("redis+cluster://nohost/0")
    with pytest.raises(ValueError, match="database 0 only"):
        Deduplicator.from_url("redis+cluster://127.0.0.1:7000/3")


@pytest.mark.timeout(30)
async def test_an_unreachable_cluster_is_store_unavailable() -> None:
    url = f"redis+cluster://127.0.0.1:{free_port()}"
    options = {"retry_attempts": 2, "retry_deadline": 1, "metrics": False}
    async with Deduplicator.from_url(url, **options) as dedup:
        with pytest.raises(StoreUnavailable, match="Redis Cluster cannot be connected"):
            await dedup.execute("t", lambda: 1)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "strands_dedup.cli", "--redis-url", url, "ls",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 3
    assert err.decode().count("\n") == 1 and "is unavailable" in err.decode()


@pytest.mark.timeout(60)
async def test_waiters_share_one_sharded_connection_per_shard(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 2)
    tokens = [t for group in shards.values() for t in group]
    waiting_on = [t for t in tokens for _ in range(5)]
    async with holding(cluster_setup.url, namespace, tokens, waiting_on) as state:
        others = state.other
        assert others.activity().subscriber_shards == 3
        for port in shards:
            # one subscriber connection on each primary, shared by its 10 waiters
            assert len(sub_connections(port)) == 1, port
        keys = KeySchema(namespace)
        for port, group in shards.items():
            channels = [keys.for_token(t).channel for t in group]
            sharded = node_command(port, "PUBSUB", "SHARDNUMSUB", *channels)
            plain = node_command(port, "PUBSUB", "NUMSUB", *channels)
            assert sharded[1::2] == [1, 1]  # SSUBSCRIBE, not SUBSCRIBE
            assert plain[1::2] == [0, 0]

        outcomes = await state.finish()
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
        await until(lambda: a.activity().in_flight == len(tokens), 10, "every token is held")
        second = [asyncio.create_task(b.execute(t, lambda t=t: work(t))) for t in tokens]
        outcomes = await asyncio.wait_for(asyncio.gather(*first, *second), 30)
        assert b.counters.get("takeovers", 0) == 0
    assert sorted(runs) == sorted(tokens)  # each once: no lease expired under its primary
    assert [o.value for o in outcomes] == tokens + tokens
    n = len(tokens)  # no takeover: each token's second call got its first call's fence
    assert [o.fence for o in outcomes[n:]] == [o.fence for o in outcomes[:n]]


@pytest.mark.timeout(60)
async def test_the_cli_lists_the_leases_of_every_primary(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 1)
    tokens = sorted(t for group in shards.values() for t in group)
    async with holding(cluster_setup.url, namespace, tokens, tokens[:1]) as state:
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
        await state.finish()

    async with Inspector.from_url(cluster_setup.url, namespace=namespace) as inspector:
        assert await inspector.leases() == []
        assert (await inspector.stats()).results == 3


@pytest.mark.timeout(60)
async def test_release_wakes_the_waiters_on_the_tokens_shard(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    async with holding(cluster_setup.url, namespace, ["tok"], [], lease_ttl=30) as state:
        waiter = asyncio.create_task(state.other.execute("tok", lambda: "mine"))
        await until(lambda: state.other.activity().listening == 1, 10, "the duplicate waits")
        async with Inspector.from_url(cluster_setup.url, namespace=namespace) as inspector:
            released = await inspector.release("tok")
        assert released is not None and released.listeners == 1
        outcome = await asyncio.wait_for(waiter, 10)  # woken at once, not after 30 s
        # release moved the fence on (fencing the old primary off); the takeover claimed the next
        assert (outcome.role, outcome.value) == (Role.TAKEOVER, "mine")
        assert outcome.fence == released.fence + 2
        state.gate.set()
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(state.held[0], 10)


@pytest.mark.timeout(60)
async def test_min_replicas_waits_on_the_slots_primary(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    for node in cluster_setup.nodes:  # the scripts must be loaded again (NOSCRIPT) on the way
        node_command(node.port, "SCRIPT", "FLUSH")
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
            n.port
            for n in cluster_setup.nodes
            if node_command(n.port, "INFO", "replication").get("master_port") == primary
        )
        client = redis.Redis(port=replica)
        try:
            client.execute_command("READONLY")
            assert client.exists(result) == 1
        finally:
            client.close()


@pytest.mark.timeout(60)
async def test_waiters_follow_their_channel_when_its_slot_migrates(
    namespace: str, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    cluster = fresh_cluster()
    keys = KeySchema(namespace).for_token("tok")

    async def migrate(others: Deduplicator) -> None:
        source = cluster.primary_port_for(keys.lease)
        target = next(n.port for n in cluster.nodes if n.port != source and is_primary(n.port))
        connects = others.activity().subscriber_connects
        cluster.migrate_slot(redis.crc.key_slot(keys.lease), source, target)
        # the source drops the shard channel's subscribers; they move to the new shard
        await until(lambda: others.activity().subscriber_connects > connects, 10, "resubscribed")
        await until(lambda: shard_listeners(target, keys.channel) == 1, 10, "moved")
        assert shard_listeners(source, keys.channel) == 0

    await storm_across(cluster.url, namespace, migrate, waiters=20, lease_ttl=2)


@pytest.mark.timeout(60)
async def test_health_checks_every_primary(
    namespace: str, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    cluster = fresh_cluster()
    async with Deduplicator.from_url(cluster.url, namespace=namespace, metrics=False) as dedup:
        assert (await dedup.health()).ok
        default = engine_of(dedup).store.cluster.get_default_node().port  # type: ignore[union-attr]
        doomed = next(n for n in cluster.nodes if n.port != default and is_primary(n.port))
        assert doomed.proc is not None
        doomed.proc.kill()  # not the node a lone PING would go to
        doomed.proc.wait()
        doomed.proc = None
        health = await dedup.health()
        assert not health.store_reachable and health.error, health
        deadline = time.monotonic() + 30
        while not (health := await dedup.health()).ok:  # its replica takes over
            assert time.monotonic() < deadline, health
            await asyncio.sleep(0.1)
        assert (await dedup.execute("t", lambda: 1)).value == 1


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_dead_shard_does_not_cost_the_leases_on_the_other_shards(
    namespace: str, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    # without full coverage the other shards keep serving while one has no primary; hold three
    # tokens per shard with duplicates waiting, SIGKILL one shard's primary, wait for its replica
    # to take over and 2.5 lease TTLs more, then let the calls finish
    cluster = fresh_cluster("--cluster-require-full-coverage", "no")
    shards = tokens_per_shard(cluster, namespace, 3)
    doomed = sorted(shards)[0]
    tokens = [t for group in shards.values() for t in group]
    async with holding(cluster.url, namespace, tokens, tokens, lease_ttl=1) as state:
        node = cluster.node(doomed)
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait()
        node.proc = None
        await until(lambda: doomed not in cluster.primaries(), 30, "a replica takes over")
        await asyncio.sleep(2.5)  # 2.5 lease TTLs more: only renewals keep leases alive
        outcomes = await state.settle()
        again = await state.primary.execute(shards[doomed][0], lambda: "later")
        assert again.role in (Role.REPLAY, Role.PRIMARY)  # the shard serves again
    seen: dict[str, list[Outcome[str] | BaseException]] = {t: [] for t in tokens}
    for token, outcome in zip(tokens + tokens, outcomes, strict=True):
        seen[token].append(outcome)
    for token, outs in seen.items():  # whoever got a value got the same one
        assert len({o.value for o in outs if isinstance(o, Outcome)}) == 1, (token, outs)
        assert all(isinstance(o, (Outcome, LeaseLost)) for o in outs), (token, outs)
    for port, group in shards.items():
        for token in group if port != doomed else []:  # renewed every period meanwhile
            first = seen[token][0]
            assert isinstance(first, Outcome) and first.role is Role.PRIMARY
            assert all(isinstance(o, Outcome) and o.fence == first.fence for o in seen[token])


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
@pytest.mark.parametrize("min_replicas", [0, 1])
async def test_a_failover_of_the_tokens_primary_during_a_storm_loses_no_waiter(
    namespace: str, min_replicas: int, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    cluster = fresh_cluster()
    keys = KeySchema(namespace).for_token("tok")

    async def fail_over(others: Deduplicator) -> None:
        doomed = cluster.primary_port_for(keys.lease)
        side = redis.Redis(port=doomed)
        # WAIT counts the writes of its own connection: one of ours in the token's slot, after
        # the claim in the replication stream, makes sure the claim is on the replica too
        side.set(keys.lease + b":replicated", b"1", px=60_000)
        assert side.execute_command("WAIT", 1, 2000) == 1
        side.close()
        connects = others.activity().subscriber_connects
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
        await until(
            lambda: others.activity().subscriber_connects > connects, 30, "waiters resubscribe"
        )

    # with min_replicas=1 the completion's WAIT goes to the slot's new primary directly
    await storm_across(
        cluster.url, namespace, fail_over, min_replicas=min_replicas, replica_timeout=2
    )


# -- auto-pipelining per primary ------------------------------------------------------------


def tokens_in_slot(namespace: str, slot: int, count: int, prefix: str) -> list[str]:
    """``count`` tokens (no scope) whose keys live in hash slot ``slot``."""
    keys = KeySchema(namespace)
    found: list[str] = []
    i = 0
    while len(found) < count:
        token = f"{prefix}{i}"
        i += 1
        # the hash tag of a token without a scope is ":<token>"; checked on the real keys below
        if redis.crc.key_slot(b"{:" + token.encode() + b"}") == slot:
            assert redis.crc.key_slot(keys.for_token(token).lease) == slot
            found.append(token)
    return found


class Storm:
    """Callers that each run calls one after the other and check every answer in order;
    ``going`` is set once ``after`` calls were answered."""

    def __init__(self, after: int) -> None:
        self.answered = 0
        self.after = after
        self.going = asyncio.Event()

    def count(self) -> None:
        self.answered += 1
        if self.answered >= self.after:
            self.going.set()


@pytest.mark.timeout(60)
async def test_concurrent_scripts_leave_in_batches_per_primary(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 40)
    async with Deduplicator.from_url(cluster_setup.url, namespace=namespace, metrics=False) as d:
        pipelines = engine_of(d).store.node_pipelines
        assert pipelines is not None and pipelines.pipelines == {}

        async def caller(token: str) -> list[tuple[Role, str]]:
            answers = []
            for attempt in range(3):  # run, then two replays of the stored result
                out = await d.execute(token, lambda attempt=attempt: f"{token}/{attempt}")
                answers.append((out.role, out.value))
            return answers

        tokens = [t for group in shards.values() for t in group]
        async with asyncio.timeout(30):
            answers = await asyncio.gather(*(caller(t) for t in tokens))
        for token, got in zip(tokens, answers, strict=True):
            assert got == [(Role.PRIMARY, f"{token}/0")] + [(Role.REPLAY, f"{token}/0")] * 2
        by_node = pipelines.pipelines
        assert sorted(by_node) == sorted(f"127.0.0.1:{port}" for port in shards)  # one per primary
        for pipeline in by_node.values():
            # 40 tokens: a claim and a completion, then two claims that replay
            assert pipeline.commands >= 160
            assert pipeline.batches * 4 <= pipeline.commands, (pipeline.batches, pipeline.commands)
        assert pipelines.redirected == 0 and pipelines.retired == 0
    assert pipelines.pipelines == {}  # closing the store closed them


@pytest.mark.timeout(90)
async def test_a_slot_migrated_mid_storm_answers_every_caller(
    namespace: str, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    cluster = fresh_cluster()
    keys = KeySchema(namespace)
    slot = redis.crc.key_slot(keys.for_token("anchor").lease)
    found = tokens_in_slot(namespace, slot, 50, "s")
    stored, fresh = found[:10], found[10:]
    source = cluster.primary_port_for(keys.for_token("anchor").lease)
    target = next(port for port in cluster.primaries() if port != source)
    options = {"namespace": namespace, "retry_attempts": 20, "retry_deadline": 30, "metrics": False}
    async with Deduplicator.from_url(cluster.url, **options) as d:
        pipelines = engine_of(d).store.node_pipelines
        assert pipelines is not None
        for token in stored:
            await d.execute(token, lambda token=token: f"v-{token}")
        storm = Storm(after=200)
        migrating, migrated = asyncio.Event(), asyncio.Event()

        async def caller(c: int) -> None:
            rounds = after = 0
            while after < 5:  # on until five calls after the migration
                if migrated.is_set():
                    after += 1
                if rounds % 3 == 0:
                    token = stored[(c + rounds) % len(stored)]  # a replay in the slot
                elif rounds % 3 == 1 and migrating.is_set() and fresh:
                    token = fresh.pop()  # a new call in the slot
                else:
                    token = f"o-{c}-{rounds}"  # anywhere
                out = await d.execute(token, lambda token=token: f"v-{token}")
                assert out.value == f"v-{token}", (token, out)
                storm.count()
                rounds += 1

        callers = [asyncio.create_task(caller(c)) for c in range(30)]
        async with asyncio.timeout(20):
            await storm.going.wait()
        migrating.set()
        await asyncio.to_thread(cluster.migrate_slot, slot, source, target)
        migrated.set()
        async with asyncio.timeout(60):  # nobody hangs; an error (MOVED, ASK) fails the test
            await asyncio.gather(*callers)
        assert len(fresh) < 40  # new calls ran in the slot while it moved
        assert pipelines.redirected >= 1  # the stale slot map met MOVED (or ASK) ...
        on_target = pipelines.pipelines[f"127.0.0.1:{target}"]
        before = on_target.commands
        assert (await d.execute(stored[0], lambda: "x")).value == f"v-{stored[0]}"
        assert on_target.commands == before + 1  # ... and the slot's scripts now go to its target


@pytest.mark.timeout(60)
async def test_a_nodes_connections_killed_mid_storm_fail_that_nodes_batch_only(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 20)
    doomed = next(iter(shards))
    options = {"namespace": namespace, "retry_attempts": 1, "metrics": False}
    async with Deduplicator.from_url(cluster_setup.url, **options) as d:
        storm = Storm(after=60)
        results: dict[str, list[str | BaseException]] = {}

        async def caller(token: str) -> None:
            got = results.setdefault(token, [])
            for r in range(8):
                name = f"{token}-{r}" if r else token  # r > 0: anywhere in the cluster
                try:
                    got.append((await d.execute(name, lambda name=name: name)).value)
                except StoreUnavailable as exc:
                    got.append(exc)
                storm.count()

        tokens = [t for group in shards.values() for t in group]
        callers = [asyncio.create_task(caller(t)) for t in tokens]
        async with asyncio.timeout(20):
            await storm.going.wait()
        # every connection of ours to one primary, mid-storm (no retry: its callers fail)
        killed = await asyncio.to_thread(node_command, doomed, "CLIENT", "KILL", "TYPE", "normal")
        assert killed >= 1
        async with asyncio.timeout(30):  # nobody hangs
            await asyncio.gather(*callers)
        for token, got in results.items():
            for r, value in enumerate(got):
                name = f"{token}-{r}" if r else token
                assert value == name or isinstance(value, StoreUnavailable), (name, value)
        # the first call of each token ran before the kill, on its own primary
        assert all(got[0] == token for token, got in results.items())
        # and the store answers on that primary again
        assert (await d.execute(shards[doomed][0], lambda: "x")).value == shards[doomed][0]
        assert (await d.execute(f"{shards[doomed][0]}-after", lambda: 1)).value == 1


@pytest.mark.timeout(60)
async def test_scripts_survive_a_flush_of_every_primary_mid_stream(
    cluster_setup: ClusterSetup, namespace: str
) -> None:
    shards = tokens_per_shard(cluster_setup, namespace, 20)
    tokens = [t for group in shards.values() for t in group]

    def flush_all() -> None:
        for port in shards:
            node_command(port, "SCRIPT", "FLUSH")

    async with Deduplicator.from_url(cluster_setup.url, namespace=namespace, metrics=False) as d:
        assert (await d.execute("warm", lambda: 0)).value == 0
        flush_all()  # every primary forgets every script: EVALSHA answers NOSCRIPT
        outs = await asyncio.gather(*(d.execute(t, lambda t=t: t) for t in tokens))
        assert [o.value for o in outs] == tokens

        storm = Storm(after=100)

        async def caller(token: str) -> list[str]:
            got = []
            for r in range(10):
                got.append((await d.execute(f"{token}-{r}", lambda r=r: f"{token}-{r}")).value)
                storm.count()
            return got

        callers = [asyncio.create_task(caller(t)) for t in tokens]
        async with asyncio.timeout(20):
            await storm.going.wait()
        await asyncio.to_thread(flush_all)  # and again mid-storm
        async with asyncio.timeout(30):
            answers = await asyncio.gather(*callers)
        assert answers == [[f"{t}-{r}" for r in range(10)] for t in tokens]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_the_pipeline_of_a_failed_primary_is_closed(
    namespace: str, fresh_cluster: Callable[..., ClusterSetup]
) -> None:
    cluster = fresh_cluster()
    shards = tokens_per_shard(cluster, namespace, 2)
    doomed = next(iter(shards))
    options = {"namespace": namespace, "retry_attempts": 20, "retry_deadline": 40}
    async with Deduplicator.from_url(cluster.url, metrics=False, **options) as d:
        pipelines = engine_of(d).store.node_pipelines
        assert pipelines is not None
        for group in shards.values():
            for token in group:
                assert (await d.execute(token, lambda token=token: token)).value == token
        assert f"127.0.0.1:{doomed}" in pipelines.pipelines
        node = cluster.node(doomed)
        assert node.proc is not None
        node.proc.kill()  # the primary dies: the cluster promotes its replica
        node.proc.wait()
        node.proc = None
        token = shards[doomed][0]
        # retried until the replica serves the slot; then the old primary's pipeline is gone
        assert (await d.execute(token, lambda: token)).value == token  # replayed or run again
        assert (await d.execute(f"{token}-new", lambda: 1)).value == 1
        assert f"127.0.0.1:{doomed}" not in pipelines.pipelines
        assert pipelines.retired >= 1
