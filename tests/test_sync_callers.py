"""The blocking facade's calls: the claim and the completion run in the caller's thread over the
blocking shell (no hand-off to the portal, no event loop of the thread's own); leases are still
renewed, and duplicates still wait, on the portal."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from servers import STALL_OPTIONS

from strands_dedup import (
    Deduplicator,
    LeaseLost,
    Role,
    StoreUnavailable,
    SyncDeduplicator,
    current_call,
)
from strands_dedup._engine.sync import Bridge

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def warm(dedup: SyncDeduplicator) -> None:
    """A first call: the core is bound to the portal and has read the store."""
    dedup.run(uuid.uuid4().hex, lambda: "warm")


def counting_portal(dedup: SyncDeduplicator) -> list[Any]:
    """What is handed to the portal from now on."""
    handed: list[Any] = []
    portal = Bridge(dedup, "test").portal
    assert portal is not None
    portal_call = portal.call

    def counted(coro: Any) -> Any:
        handed.append(coro)
        return portal_call(coro)

    portal.call = counted  # type: ignore[method-assign]
    return handed


def clients(url: str) -> list[dict[str, Any]]:
    """The connections of a Redis, without the one asking."""
    admin = redis.Redis.from_url(url)
    try:
        me = admin.client_id()
        return [c for c in admin.client_list() if int(c["id"]) != me]
    finally:
        admin.close()


def eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def dedup(redis_url: str, namespace: str) -> Iterator[SyncDeduplicator]:
    with SyncDeduplicator.from_url(redis_url, namespace=namespace, metrics=False) as d:
        yield d


def test_a_call_crosses_no_thread(dedup: SyncDeduplicator) -> None:
    warm(dedup)
    handed = counting_portal(dedup)
    ran_in: list[threading.Thread] = []

    def call() -> dict[str, int]:
        ran_in.append(threading.current_thread())
        return {"v": 3}

    first = dedup.execute("t", call)
    again = dedup.execute("t", call)
    assert (first.role, first.value) == (Role.PRIMARY, {"v": 3})
    assert (again.role, again.value, again.fence) == (Role.REPLAY, {"v": 3}, first.fence)
    assert ran_in == [threading.current_thread()]
    other: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: other.update(out=dedup.execute("t2", lambda: 4)))
    thread.start()
    thread.join(20)
    assert (other["out"].role, other["out"].value) == (Role.PRIMARY, 4)  # a thread's first call
    assert handed == []  # neither the claims nor the completions went to the portal
    assert dedup.counters["claims"] >= 3 and dedup.counters["replays"] == 1


def test_a_lease_claimed_in_a_callers_thread_is_renewed(redis_url: str, namespace: str) -> None:
    options = {"namespace": namespace, "lease_ttl": 0.6, "metrics": False}
    with (
        SyncDeduplicator.from_url(redis_url, **options) as primary,
        SyncDeduplicator.from_url(redis_url, **options) as other,
    ):
        warm(primary)
        started = threading.Event()
        runs = 0

        def call() -> str:
            nonlocal runs
            runs += 1
            started.set()
            time.sleep(2.0)  # the call's own work: three lease TTLs
            return "done"

        result: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: result.update(dup=other.execute("t", call)))
        outcome_box: dict[str, Any] = {}
        primary_thread = threading.Thread(
            target=lambda: (warm(primary), outcome_box.update(out=primary.execute("t", call)))
        )
        primary_thread.start()
        assert started.wait(10)
        worker.start()
        primary_thread.join(20)
        worker.join(20)
        out = outcome_box["out"]
        assert (out.role, out.value) == (Role.PRIMARY, "done")
        dup = result["dup"]
        assert (dup.role, dup.value, dup.fence) == (Role.WAITER, "done", out.fence)
        assert runs == 1


def test_a_lost_lease_reaches_a_call_in_a_callers_thread(redis_url: str, namespace: str) -> None:
    with SyncDeduplicator.from_url(
        redis_url, namespace=namespace, lease_ttl=0.6, metrics=False
    ) as dedup:
        warm(dedup)
        raw = redis.Redis.from_url(redis_url)
        seen: list[bool] = []

        def call() -> str:
            context = current_call()
            assert context is not None
            keys = dedup.token_keys("t")
            # another owner took the token: a lease of its own, with the next fence
            raw.set(keys.lease, b"somebody-else|1|{}", px=5000)
            raw.incr(keys.fence)
            seen.append(context.lost.wait(5))
            return "late"

        try:
            with pytest.raises(LeaseLost):
                dedup.run("t", call)
        finally:
            raw.delete(dedup.token_keys("t").lease)
            raw.close()
        assert seen == [True]
        assert dedup.counters["lease_lost"] >= 1


def test_threads_that_end_leave_no_connection_behind(redis_server_factory: type) -> None:
    server = redis_server_factory()
    dedup = SyncDeduplicator.from_url(server.url, namespace="ns", metrics=False)
    try:
        dedup.run("first", lambda: 0)  # the portal's connections and the blocking pool's
        before = len(clients(server.url))
        for i in range(4):  # one after the other: the pool's connection is used again
            thread = threading.Thread(
                target=lambda i=i: [dedup.run(f"t{i}-{j}", lambda: j) for j in range(3)]
            )
            thread.start()
            thread.join(20)
        assert len(clients(server.url)) <= before
    finally:
        dedup.close()
    assert eventually(lambda: clients(server.url) == [])


def test_more_threads_than_max_connections_wait_for_one(redis_url: str, namespace: str) -> None:
    with SyncDeduplicator.from_url(
        redis_url, namespace=namespace, max_connections=2, metrics=False
    ) as dedup:
        dedup.run(uuid.uuid4().hex, lambda: 0)
        barrier = threading.Barrier(4)
        results: dict[int, list[int]] = {}

        def work(n: int) -> None:
            barrier.wait(10)
            results[n] = [dedup.run(f"{n}-{j}", lambda j=j: n * 10 + j) for j in range(5)]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert results == {n: [n * 10 + j for j in range(5)] for n in range(4)}


def test_a_thread_that_runs_an_event_loop_calls_in_its_thread(
    dedup: SyncDeduplicator,
) -> None:
    warm(dedup)
    handed = counting_portal(dedup)

    async def inside() -> list[int]:
        return [dedup.run(uuid.uuid4().hex, lambda i=i: i) for i in range(3)]

    assert asyncio.run(inside()) == [0, 1, 2]
    assert handed == []


def test_the_embedded_store_calls_in_the_callers_thread(namespace: str) -> None:
    with SyncDeduplicator.from_url("memory://", namespace=namespace, metrics=False) as dedup:
        warm(dedup)
        handed = counting_portal(dedup)
        assert [dedup.run(f"t{i}", lambda i=i: i) for i in range(3)] == [0, 1, 2]
        assert dedup.run("t1", lambda: "never") == 1  # replayed from the shared embedded server
        assert handed == []

        async def asyncio_sees() -> int:
            async with Deduplicator.from_url("memory://", namespace=namespace) as core:
                return await core.run("t2", lambda: "never")  # type: ignore[no-any-return]

        assert asyncio.run(asyncio_sees()) == 2  # an asyncio client reads what the blocking wrote


def test_a_killed_connection_and_flushed_scripts_cost_a_retry(
    redis_server_factory: type,
) -> None:
    server = redis_server_factory()
    admin = redis.Redis.from_url(server.url)
    try:
        with SyncDeduplicator.from_url(server.url, namespace="ns", metrics=False) as dedup:
            warm(dedup)
            admin.client_kill_filter(_type="normal", skipme=True)
            first = dedup.execute("a", lambda: "a")
            assert (first.role, first.value) == (Role.PRIMARY, "a")
            admin.script_flush()
            second = dedup.execute("b", lambda: "b")
            assert (second.role, second.value) == (Role.PRIMARY, "b")
            assert dedup.execute("a", lambda: "never").role is Role.REPLAY
    finally:
        admin.close()


def test_a_lost_completion_reply_is_recovered_in_a_callers_thread(
    redis_server_factory: type,
) -> None:
    server = redis_server_factory()
    pid = server.proc.pid

    def call() -> str:  # stops Redis as it returns; resumed 2 s later
        os.kill(pid, signal.SIGSTOP)
        threading.Timer(2.0, os.kill, (pid, signal.SIGCONT)).start()
        return "value"

    try:
        with SyncDeduplicator.from_url(server.url, wait_timeout=20, **STALL_OPTIONS) as dedup:
            warm(dedup)
            started = time.monotonic()
            outcome = dedup.execute("tok", call)
            assert time.monotonic() - started >= 1.5  # it did wait for Redis
            assert (outcome.role, outcome.value) == (Role.PRIMARY, "value")
            again = dedup.execute("tok", lambda: "never")
            assert (again.role, again.value, again.fence) == (Role.REPLAY, "value", outcome.fence)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_stalled_redis_fails_a_claim_in_time_and_the_next_one_works(
    redis_server_factory: type,
) -> None:
    server = redis_server_factory()
    pid = server.proc.pid
    try:
        with SyncDeduplicator.from_url(server.url, **STALL_OPTIONS) as dedup:
            warm(dedup)
            os.kill(pid, signal.SIGSTOP)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                dedup.run("tok", lambda: "never")
            assert time.monotonic() - started < 5
            os.kill(pid, signal.SIGCONT)
            assert dedup.run("tok2", lambda: "ok") == "ok"
    finally:
        os.kill(pid, signal.SIGCONT)


def test_connections_killed_while_several_wait_for_the_next_command_cost_one_retry(
    redis_server_factory: type,
) -> None:
    """Threads leave several connections waiting for the next command; once the server drops
    them all, a call fails over to fresh ones within its retries (here two attempts)."""
    server = redis_server_factory()
    admin = redis.Redis.from_url(server.url)
    try:
        with SyncDeduplicator.from_url(
            server.url, namespace="ns", metrics=False, retry_attempts=2
        ) as dedup:
            barrier = threading.Barrier(6)

            def work(n: int) -> None:
                barrier.wait(10)
                for j in range(20):
                    dedup.run(f"{n}-{j}", lambda: j)

            threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(20)
            assert len(clients(server.url)) >= 3  # several connections in use, now waiting
            admin.client_kill_filter(_type="normal", skipme=True)
            outcomes = [dedup.execute(f"after-{i}", lambda i=i: i) for i in range(10)]
            assert [(o.role, o.value) for o in outcomes] == [(Role.PRIMARY, i) for i in range(10)]
    finally:
        admin.close()
