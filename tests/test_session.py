"""SessionGuard's contract, on the embedded memory:// backend and on a real Redis."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pydantic
import pytest
from side import side_of
from timing import SLACK

from strands_dedup import (
    BusyReason,
    InvalidToken,
    LeaseLost,
    SessionBusy,
    SessionGuard,
    SyncDeduplicator,
    current_session,
)

pytestmark = pytest.mark.timeout(30)


class Occupancy:
    """Counts who is inside a session at once, and in which order they entered."""

    def __init__(self) -> None:
        self.inside = 0
        self.most = 0
        self.order: list[Any] = []

    @asynccontextmanager
    async def enter(self, who: Any) -> AsyncIterator[None]:
        self.inside += 1
        self.most = max(self.most, self.inside)
        self.order.append(who)
        try:
            yield
        finally:
            self.inside -= 1


async def test_throw_mode_refuses_a_second_holder_at_once(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, mode="throw")
        async with guard.hold("s-1") as hold:
            assert hold.fence >= 1 and current_session() is hold
            started = time.monotonic()
            with pytest.raises(SessionBusy) as caught:
                async with guard.hold("s-1"):
                    pytest.fail("admitted twice")
            assert time.monotonic() - started < 1.0 + SLACK
            assert caught.value.reason is BusyReason.TAKEN
            assert caught.value.holders == 1 and caught.value.session == "s-1"
            assert caught.value.retry_after is not None and caught.value.retry_after > 0
            async with guard.hold("s-2"):  # another session is independent
                pass
        assert current_session() is None
        async with guard.hold("s-1") as again:
            assert again.fence > hold.fence


async def test_queue_mode_admits_one_at_a_time_in_arrival_order(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, mode="queue")
        seen = Occupancy()

        async def caller(i: int) -> int:
            async with guard.hold("s-q") as hold:
                async with seen.enter(i):
                    await asyncio.sleep(0.01)
                return hold.fence

        fences = await asyncio.gather(*(caller(i) for i in range(12)))
        assert seen.most == 1
        assert seen.order == list(range(12))
        assert sorted(fences) == fences and len(set(fences)) == 12


async def test_max_concurrent_bounds_holders(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, max_concurrent=3)
        seen = Occupancy()

        async def caller(i: int) -> None:
            async with guard.hold("s-3"), seen.enter(i):
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller(i) for i in range(10)))
        assert seen.most == 3


async def test_max_concurrent_total_bounds_every_session_together(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, max_concurrent_total=2)
        seen = Occupancy()

        async def caller(i: int) -> None:
            async with guard.hold(f"s-total-{i}"), seen.enter(i):
                await asyncio.sleep(0.05)

        await asyncio.gather(*(caller(i) for i in range(6)))
        assert seen.most == 2


async def test_overflow_raises_at_once_with_the_queue_depth(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, max_queue=1)
        inside = asyncio.Event()
        leave = asyncio.Event()

        async def holder() -> None:
            async with guard.hold("s-o"):
                inside.set()
                await leave.wait()

        first = asyncio.create_task(holder())
        await inside.wait()
        waiter = asyncio.create_task(holder())
        while (await dedup.health()).sessions_waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(SessionBusy) as caught:
            async with guard.hold("s-o"):
                pytest.fail("admitted past a full queue")
        assert caught.value.reason is BusyReason.QUEUE_FULL
        assert caught.value.depth == 1
        leave.set()
        await asyncio.gather(first, waiter)


async def test_queue_timeout_gives_up_and_leaves_the_queue(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, queue_timeout=0.3)
        async with guard.hold("s-t"):
            started = time.monotonic()
            with pytest.raises(SessionBusy) as caught:
                async with guard.hold("s-t"):
                    pytest.fail("admitted while held")
            waited = time.monotonic() - started
            assert caught.value.reason is BusyReason.QUEUE_TIMEOUT
            assert 0.29 <= waited < 2.0
            health = await dedup.health()
            assert [(s.session, s.holders, s.queue_depth) for s in health.sessions] == [
                ("s-t", 1, 0)
            ]


async def test_a_cancelled_waiter_leaves_the_queue(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup)
        async with guard.hold("s-c"):
            waiter = asyncio.create_task(guard.hold("s-c").__aenter__())
            while (await dedup.health()).sessions_waiting < 1:
                await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert [s.queue_depth for s in (await dedup.health()).sessions] == [0]
        async with guard.hold("s-c", timeout=1):
            pass


async def test_sequence_numbers_are_admitted_in_order(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, first_seq=1, gap_timeout=5)
        seen = Occupancy()

        async def caller(seq: int) -> None:
            async with guard.hold("s-seq", seq=seq) as hold, seen.enter(seq):
                assert hold.skipped is None and not hold.late

        tasks = []
        for seq in (3, 5, 2, 4, 1):  # delivered out of order
            tasks.append(asyncio.create_task(caller(seq)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*tasks)
        assert seen.order == [1, 2, 3, 4, 5]


async def test_a_missing_number_is_skipped_after_gap_timeout(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup, first_seq=1, gap_timeout=0.3)
        started = time.monotonic()
        async with guard.hold("s-gap", seq=2) as hold:
            assert time.monotonic() - started >= 0.29
            assert hold.skipped == (1, 1) and not hold.late
        async with guard.hold("s-gap", seq=1) as late:
            assert late.late and late.skipped is None
        async with guard.hold("s-gap", seq=3) as due:
            assert not due.late and due.skipped is None


async def test_a_holder_that_stops_renewing_frees_the_session_within_one_lease(
    make: Any,
) -> None:
    async with make(lease_ttl=0.5) as dedup, make(lease_ttl=0.5) as other:
        guard = SessionGuard(dedup)
        hold = await guard.hold("s-crash").__aenter__()
        await dedup.aclose()  # the process "dies": no renewal, no release
        started = time.monotonic()
        async with SessionGuard(other).hold("s-crash", timeout=5) as next_hold:
            assert next_hold.fence > hold.fence
        assert time.monotonic() - started < 0.5 + 1.0 + SLACK


async def test_a_lost_hold_is_signalled_and_raises_on_exit(make: Any, backend_url: str) -> None:
    async with make(lease_ttl=0.3) as dedup, side_of(backend_url) as side:
        guard = SessionGuard(dedup)
        with pytest.raises(LeaseLost):
            async with guard.hold("s-lost") as hold:
                await side.delete(dedup.session_keys("s-lost").holders)
                assert await asyncio.to_thread(hold.lost.wait, 5)


def test_blocking_guard_over_a_sync_deduplicator(backend_url: str, namespace: str) -> None:
    with SyncDeduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guard = SessionGuard(dedup)
        inside = 0
        most = 0
        lock = threading.Lock()

        def worker() -> None:
            nonlocal inside, most
            for _ in range(3):
                with guard.hold("s-sync") as hold:
                    assert current_session() is hold
                    with lock:
                        inside += 1
                        most = max(most, inside)
                    time.sleep(0.005)
                    with lock:
                        inside -= 1

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert most == 1
        assert dedup.health().sessions_held == 0

        async def from_a_loop() -> int:
            async with guard.hold("s-sync") as hold:
                return hold.fence

        assert asyncio.run(from_a_loop()) >= 13


async def test_bad_input_is_refused_up_front(make: Any) -> None:
    async with make() as dedup:
        guard = SessionGuard(dedup)
        with pytest.raises(InvalidToken):
            guard.hold("")
        with pytest.raises(ValueError, match="seq"):
            guard.hold("s", seq=-1)
        with pytest.raises(ValueError, match="timeout"):
            guard.hold("s", timeout=0)
        with pytest.raises(ValueError, match="throw"):
            SessionGuard(dedup, mode="throw").hold("s", seq=1)
        with pytest.raises(pydantic.ValidationError, match="max_concurrent"):
            SessionGuard(dedup, max_concurrent=0)
        with pytest.raises(pydantic.ValidationError):
            SessionGuard(dedup, mode="wait")
        with pytest.raises(RuntimeError, match="async with"), guard.hold("s"):
            pass
        with pytest.raises(TypeError, match="Deduplicator"):
            SessionGuard(object())  # type: ignore[arg-type]
        async with guard.hold("{weird*name}\n") as hold:  # any text is a usable name
            assert hold.session == "{weird*name}\\n"


async def test_the_next_in_line_is_woken_by_a_message_not_a_timer(make: Any) -> None:
    async with make(lease_ttl=30) as dedup:  # a timer would fire after ~30 s, not in 1 s
        guard = SessionGuard(dedup)
        admitted_after: list[float] = []

        async def waiter() -> None:
            async with guard.hold("s-wake"):
                admitted_after.append(time.monotonic())

        async with guard.hold("s-wake"):
            task = asyncio.create_task(waiter())
            while (await dedup.health()).sessions_waiting < 1:
                await asyncio.sleep(0.01)
            started = time.monotonic()
        await asyncio.wait_for(task, 5)
        assert admitted_after[0] - started < 1.0
