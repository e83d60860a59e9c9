"""The blocking facade: one protocol through the portal loop; calls run in the caller's thread."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest

from strands_dedup import (
    FingerprintMismatch,
    PrimaryFailed,
    ReentrantCall,
    Role,
    SyncDeduplicator,
)

pytestmark = pytest.mark.timeout(30)


class Receipt(pydantic.BaseModel):
    order_id: str
    amount: int


@pytest.fixture
def sync_dedup(backend_url: str, namespace: str):  # type: ignore[no-untyped-def]
    with SyncDeduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as d:
        yield d


def test_call_runs_in_the_callers_thread(sync_dedup: SyncDeduplicator) -> None:
    seen: list[threading.Thread] = []

    def call() -> str:
        seen.append(threading.current_thread())
        return "ok"

    assert sync_dedup.execute("t", call).role is Role.PRIMARY
    assert seen == [threading.current_thread()]
    again = sync_dedup.execute("t", call)
    assert (again.role, again.value) == (Role.REPLAY, "ok") and len(seen) == 1


def test_threads_share_one_execution(sync_dedup: SyncDeduplicator) -> None:
    started, release = threading.Event(), threading.Event()
    runs = 0

    def call() -> dict[str, int]:
        nonlocal runs
        runs += 1
        started.set()
        release.wait(10)
        return {"v": 7}

    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(sync_dedup.execute, "t", call)
        assert started.wait(10)
        rest = [pool.submit(sync_dedup.execute, "t", call) for _ in range(7)]
        deadline = threading.Event()
        for _ in range(1000):
            if sync_dedup.activity().listening >= 7:
                break
            deadline.wait(0.005)
        release.set()
        outcomes = [first.result(10)] + [f.result(10) for f in rest]
    assert runs == 1
    assert [o.role for o in outcomes].count(Role.PRIMARY) == 1
    assert all(o.value == {"v": 7} for o in outcomes)


def test_errors_propagate_and_are_shared(sync_dedup: SyncDeduplicator) -> None:
    def boom() -> None:
        raise LookupError("missing")

    with pytest.raises(LookupError):
        sync_dedup.execute("t", boom)
    assert sync_dedup.execute("t", lambda: 5).value == 5  # failures are not stored by default


def test_awaitables_are_refused_and_release_the_token(sync_dedup: SyncDeduplicator) -> None:
    async def coro() -> int:
        return 1

    with pytest.raises(TypeError, match="awaitable"):
        sync_dedup.execute("t", coro)
    assert sync_dedup.execute("t", lambda: 2).value == 2


def test_idempotent_decorator(sync_dedup: SyncDeduplicator) -> None:
    runs = 0

    @sync_dedup.idempotent(key=lambda order_id, amount: order_id, scope=lambda o, a: "tenant-1")
    def refund(order_id: str, amount: int) -> Receipt:
        nonlocal runs
        runs += 1
        return Receipt(order_id=order_id, amount=amount)

    assert refund("o1", 3) == refund("o1", 3) == Receipt(order_id="o1", amount=3)
    assert runs == 1
    with pytest.raises(FingerprintMismatch):
        refund("o1", 4)


async def test_usable_inside_a_running_event_loop(sync_dedup: SyncDeduplicator) -> None:
    assert asyncio.get_running_loop().is_running()
    assert sync_dedup.execute("t", lambda: "from a coroutine").value == "from a coroutine"
    assert sync_dedup.run("t", lambda: "x") == "from a coroutine"


def test_cache_errors_in_the_facade(backend_url: str, namespace: str) -> None:
    with SyncDeduplicator.from_url(backend_url, namespace=namespace, cache_errors=True) as d:
        with pytest.raises(ZeroDivisionError):
            d.execute("t", lambda: 1 / 0)
        with pytest.raises(PrimaryFailed, match="ZeroDivisionError"):
            d.execute("t", lambda: 1)


def test_close_stops_the_portal_thread(backend_url: str, namespace: str) -> None:
    before = threading.active_count()
    d = SyncDeduplicator.from_url(backend_url, namespace=namespace)
    assert threading.active_count() == before + 1
    d.execute("t", lambda: 1)
    d.close()
    d.close()  # idempotent
    assert threading.active_count() == before


def test_a_blocking_call_on_its_own_token_fails_at_once(sync_dedup: SyncDeduplicator) -> None:
    def outer() -> str:
        return sync_dedup.run("outer", lambda: "never")

    with pytest.raises(ReentrantCall, match="'outer'"):
        sync_dedup.run("outer", outer)
