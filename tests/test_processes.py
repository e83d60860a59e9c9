"""Real processes on a real Redis: many replicas, a killed primary, a paused one, a killed
pub/sub connection, a storm of duplicates in one process, and the blocking facade under threads.

The children are tests/proc_worker.py; they report on stdout (JSON lines) and the tests wait for
those reports, or poll Redis, always against a deadline: nothing here synchronizes by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from children import Child
from conftest import Target, side_client
from failover import until
from timing import SLACK

from strands_dedup import Deduplicator, Role, SyncDeduplicator

OUR_NAME = f"strands-dedup:{socket.gethostname()}:{os.getpid()}"
"""CLIENT SETNAME of this process's deduplicator connections (the subscriber adds ``:sub``)."""

pytestmark = [pytest.mark.redis, pytest.mark.slow]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def rt(target: Target) -> Iterator[redis.Redis]:
    """A plain client of the target's primary (for the tests that run on every topology)."""
    client = side_client(target.side_url, client_name="proc-test-inspector")
    yield client
    client.close()


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client for inspecting Redis (not named like the deduplicator's connections)."""
    client = redis.Redis.from_url(redis_url, client_name="proc-test-inspector")
    yield client
    client.close()


def token_key(namespace: str, token: str, part: str) -> str:
    return f"{namespace}:{{:{token}}}:{part}"


def executions(r: redis.Redis, namespace: str) -> int:
    return int(r.get(f"{namespace}:executions") or 0)


def our_connections(r: redis.Redis) -> list[dict[str, Any]]:
    """This process's deduplicator connections (pool and subscriber) as Redis lists them."""
    return [
        c
        for c in r.client_list()
        if c.get("name") == OUR_NAME or c.get("name", "").startswith(OUR_NAME + ":")
    ]


# -- 1. many processes, one token --------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_four_processes_share_one_execution(
    target: Target, namespace: str, rt: redis.Redis, children: Callable[..., Awaitable[Child]]
) -> None:
    r = rt
    procs = [
        await children(
            "storm",
            target.url,
            namespace,
            "tok",
            "--calls",
            "25",
            "--seconds",
            "0.5",
            "--lease-ttl",
            "2",
            "--side-url",
            target.side_url,
        )
        for _ in range(4)
    ]
    for child in procs:
        await child.expect("ready", 20)
    r.rpush(f"{namespace}:barrier", *["go"] * len(procs))  # every child is connected: release
    for child in procs:
        await child.expect("finished", 20)

    results = [e for child in procs for e in child.of("result")]
    errors = [e for child in procs for e in child.of("error")]
    assert errors == []
    assert len(results) == 100
    assert executions(r, namespace) == 1
    assert len({json.dumps(e["value"], sort_keys=True) for e in results}) == 1
    assert [e["role"] for e in results].count(Role.PRIMARY.value) == 1
    primary = next(e for e in results if e["role"] == Role.PRIMARY.value)
    assert results[0]["value"] == {"pid": primary["pid"], "execution": 1}
    # the calls overlapped: the other processes waited for the primary instead of replaying
    assert any(e["role"] == Role.WAITER.value and e["pid"] != primary["pid"] for e in results)
    assert len({e["fence"] for e in results}) == 1
    assert r.exists(token_key(namespace, "tok", "lease")) == 0

    # and each process then closes its deduplicator (waiters' subscribers included) and exits
    for child in procs:
        await child.expect("closed", 10)
        assert await asyncio.wait_for(child.proc.wait(), 10) == 0


# -- 2. the primary is killed -----------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_sigkilled_primary_is_taken_over_within_one_lease(
    target: Target, namespace: str, rt: redis.Redis, children: Callable[..., Awaitable[Child]]
) -> None:
    r, redis_url = rt, target.url
    lease_ttl = 2.0
    a = await children(
        "hold",
        redis_url,
        namespace,
        "tok",
        "--lease-ttl",
        str(lease_ttl),
        "--side-url",
        target.side_url,
    )
    await a.expect("started", 20)
    lease = token_key(namespace, "tok", "lease")
    assert r.exists(lease) == 1
    held = int(r.get(token_key(namespace, "tok", "fence")))

    runs = 0

    async def mine() -> dict[str, str]:
        nonlocal runs
        runs += 1
        return {"by": "test"}

    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=lease_ttl) as dedup:
        b = asyncio.create_task(dedup.execute("tok", mine))
        await until(lambda: dedup.activity().listening == 1, 5, "the test's call waits")
        assert runs == 0

        killed_at = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(a.proc.wait(), 5) == -signal.SIGKILL

        bound = lease_ttl + lease_ttl / 3 + 0.5 + SLACK
        outcome = await asyncio.wait_for(b, bound + 5)
        took = time.monotonic() - killed_at

    assert outcome.role is Role.TAKEOVER
    assert outcome.value == {"by": "test"}
    assert outcome.fence == held + 1
    assert took <= bound, f"takeover took {took:.2f}s after the kill (bound {bound:.2f}s)"
    assert runs == 1
    assert executions(r, namespace) == 1  # the child's one execution; the test's is `runs`
    assert r.exists(lease) == 0
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=lease_ttl) as dedup:
        stored = await dedup.execute("tok", lambda: {"by": "nobody"})
    assert (stored.role, stored.value, stored.fence) == (Role.REPLAY, {"by": "test"}, held + 1)


# -- 3. the primary is paused past its lease (a zombie) ----------------------------------------


@pytest.mark.timeout(30)
async def test_paused_primary_past_its_lease_gets_lease_lost(
    target: Target, namespace: str, rt: redis.Redis, children: Callable[..., Awaitable[Child]]
) -> None:
    r, redis_url = rt, target.url
    a = await children(
        "hold", redis_url, namespace, "tok", "--lease-ttl", "1", "--side-url", target.side_url
    )
    await a.expect("started", 20)
    lease = token_key(namespace, "tok", "lease")
    assert r.exists(lease) == 1
    held = int(r.get(token_key(namespace, "tok", "fence")))

    a.proc.send_signal(signal.SIGSTOP)
    try:
        # it cannot renew any more: its lease expires within one lease_ttl
        await until(lambda: r.exists(lease) == 0, 5, "the paused primary's lease expires")
        async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=1) as dedup:
            ours = await dedup.execute("tok", lambda: {"by": "test"})
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert ours.role in (Role.PRIMARY, Role.TAKEOVER)
    assert ours.fence == held + 1

    await a.send("finish")  # the zombie's call returns now, long after its lease expired
    error = await a.expect("error", 10)
    assert error["type"] == "LeaseLost", error
    await a.expect("closed", 10)
    assert await asyncio.wait_for(a.proc.wait(), 10) == 0
    assert a.of("result") == []

    assert r.exists(token_key(namespace, "tok", "result")) == 1
    assert r.exists(lease) == 0
    # the stored result is ours (its fence, its value): replayed as it is
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=1) as dedup:
        again = await dedup.execute("tok", lambda: {"by": "nobody"})
    assert (again.role, again.value, again.fence) == (Role.REPLAY, {"by": "test"}, ours.fence)


# -- 4. the shared subscriber's connection is killed -------------------------------------------


@pytest.mark.timeout(30)
async def test_waiters_survive_a_killed_subscriber_connection(
    redis_url: str, namespace: str, r: redis.Redis, children: Callable[..., Awaitable[Child]]
) -> None:
    a = await children("hold", redis_url, namespace, "tok", "--lease-ttl", "2")
    await a.expect("started", 20)
    channel = token_key(namespace, "tok", "chan")
    held = int(r.get(token_key(namespace, "tok", "fence")))

    async def never() -> Any:
        raise AssertionError("a waiter ran the call")

    async with Deduplicator.from_url(
        redis_url, namespace=namespace, lease_ttl=2, max_connections=8
    ) as dedup:
        waiters = [asyncio.create_task(dedup.execute("tok", never)) for _ in range(100)]
        await until(lambda: dedup.activity().listening == 100, 10, "100 waiters listen")
        await until(
            lambda: dict(r.pubsub_numsub(channel)).get(channel.encode(), 0) == 1,
            10,
            "the shared subscriber is subscribed",
        )
        assert dedup.activity().subscriber_connects == 1
        subs = [c for c in our_connections(r) if c["name"] == OUR_NAME + ":sub"]
        assert len(subs) == 1, subs
        assert r.execute_command("CLIENT", "KILL", "ID", subs[0]["id"]) == 1

        # complete the primary at once: its message is published while nobody is subscribed
        await a.send("finish")
        finished = await a.expect("result", 10)
        assert finished["role"] == Role.PRIMARY.value

        outcomes = await asyncio.wait_for(asyncio.gather(*waiters), 15)
        await until(
            lambda: dedup.activity().subscriber_connects >= 2, 10, "the subscriber reconnects"
        )
        assert dedup.activity().subscriber_connects >= 2

    assert len(outcomes) == 100
    assert {o.role for o in outcomes} == {Role.WAITER}
    assert all(o.value == finished["value"] for o in outcomes)
    assert {o.fence for o in outcomes} == {held}
    assert executions(r, namespace) == 1


# -- 5. a storm of duplicates in one process ---------------------------------------------------


class Sampler(threading.Thread):
    """Samples, until stopped, this process's Redis connections and its thread count."""

    def __init__(self, redis_url: str, exclude: set[int]) -> None:
        super().__init__(name="proc-test-sampler", daemon=True)
        self.client = redis.Redis.from_url(redis_url, client_name="proc-test-sampler")
        self.exclude = exclude
        self.stopping = threading.Event()
        self.max_connections = 0
        self.max_threads = 0
        self.samples = 0
        self.busy_samples = 0

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                ours = [c for c in our_connections(self.client) if int(c["id"]) not in self.exclude]
                self.max_connections = max(self.max_connections, len(ours))
                self.max_threads = max(self.max_threads, threading.active_count())
                self.samples += 1
                self.busy_samples += bool(ours)
                self.stopping.wait(0.01)  # pacing only: the storm itself is not waited for here
        finally:
            self.client.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        assert not self.is_alive()


async def _warm_resolver(redis_url: str) -> None:
    """Start the default executor's threads now if the URL names a host (not an address):
    the pool's first connections resolve it there, which is not what this test measures."""
    parts = urlsplit(redis_url)
    host = parts.hostname or "127.0.0.1"
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(loop.getaddrinfo(host, parts.port or 6379) for _ in range(32)))


@pytest.mark.timeout(45)
async def test_5000_duplicates_in_one_process_stay_within_the_pool(
    redis_url: str, namespace: str, r: redis.Redis
) -> None:
    await _warm_resolver(redis_url)
    await until(lambda: not our_connections(r), 5, "earlier connections of this process close")
    sampler = Sampler(redis_url, exclude={int(c["id"]) for c in our_connections(r)})
    sampler.start()
    threads_before = threading.active_count()

    runs = 0

    async def call() -> dict[str, Any]:
        nonlocal runs
        runs += 1
        await asyncio.sleep(1.0)
        return {"answer": 42, "items": list(range(10))}

    try:
        # lease_ttl: the storm keeps the pool's queue seconds long, and the primary's renewals
        # and completion wait in that queue too; this test is about the bounds, not lease expiry
        async with Deduplicator.from_url(
            redis_url, namespace=namespace, lease_ttl=30, max_connections=16
        ) as dedup:
            calls = [dedup.execute("tok", call) for _ in range(5000)]
            outcomes = await asyncio.wait_for(asyncio.gather(*calls), 35)
            during = sampler.samples
    finally:
        sampler.stop()

    assert runs == 1
    assert len(outcomes) == 5000
    assert all(o.value == {"answer": 42, "items": list(range(10))} for o in outcomes)
    roles = [o.role for o in outcomes]
    assert roles.count(Role.PRIMARY) == 1
    assert roles.count(Role.WAITER) + roles.count(Role.REPLAY) == 4999
    assert roles.count(Role.WAITER) > 0
    assert during >= 10, f"only {during} samples were taken during the storm"
    assert sampler.busy_samples > 0, "no sample saw the deduplicator's connections"
    assert sampler.max_connections <= 16 + 1, sampler.max_connections
    assert sampler.max_threads <= threads_before + 2, (threads_before, sampler.max_threads)


# -- 6. the blocking facade --------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_sync_facade_under_16_threads(redis_url: str, namespace: str, r: redis.Redis) -> None:
    barrier = threading.Barrier(16)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def call() -> dict[str, Any]:
        n = r.incr(f"{namespace}:executions")
        time.sleep(0.3)  # the work itself: long enough for the other threads to arrive
        return {"thread": threading.current_thread().name, "execution": n}

    with SyncDeduplicator.from_url(redis_url, namespace=namespace, lease_ttl=2) as sync_dedup:

        def worker() -> None:
            try:
                barrier.wait(10)
                outcome = sync_dedup.execute("tok", call)
                with lock:
                    results.append(outcome)
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, name=f"caller-{i}") for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)

    assert errors == []
    assert len(results) == 16
    assert executions(r, namespace) == 1
    values = [o.value for o in results]
    assert all(v == values[0] for v in values)
    assert values[0]["execution"] == 1
    roles = [o.role for o in results]
    assert roles.count(Role.PRIMARY) == 1
    assert roles.count(Role.WAITER) == 15  # they all arrived within the 0.3 s call


@pytest.mark.timeout(30)
async def test_sync_facade_inside_a_running_event_loop(
    redis_url: str, namespace: str, r: redis.Redis
) -> None:
    asyncio.get_running_loop()  # this body runs on the test's event loop
    with SyncDeduplicator.from_url(redis_url, namespace=namespace, lease_ttl=2) as sync_dedup:
        first = sync_dedup.execute("tok", lambda: {"n": r.incr(f"{namespace}:executions")})
        again = sync_dedup.execute("tok", lambda: {"n": r.incr(f"{namespace}:executions")})
        value = sync_dedup.run("other", lambda: "plain")
    assert (first.role, first.value) == (Role.PRIMARY, {"n": 1})
    assert (again.role, again.value, again.fence) == (Role.REPLAY, {"n": 1}, first.fence)
    assert value == "plain"
    assert executions(r, namespace) == 1
    # the loop is still usable afterwards
    assert await asyncio.wait_for(asyncio.sleep(0, "ok"), 1) == "ok"
