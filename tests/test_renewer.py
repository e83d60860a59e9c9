"""The renewer on its own, over a store that records what it is asked to renew: leases handed
over from other threads, and refusals while a completion is under way."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from strands_dedup._engine.renewer import HeldLease, Renewer
from strands_dedup._keys import KeySchema
from strands_dedup._protocol import Role

pytestmark = pytest.mark.timeout(20)

INTERVAL = 0.05


class RecordingStore:
    """Answers every renewal with ``verdict`` and remembers which owners it was asked for."""

    def __init__(self) -> None:
        self.verdict = True
        self.rounds: list[list[bytes]] = []
        self.round_seen = asyncio.Event()

    async def renew(self, refs: Sequence[Any], within: float) -> list[bool]:
        self.rounds.append([ref.value for ref in refs])
        self.round_seen.set()
        return [self.verdict] * len(refs)

    async def renew_tickets(self, refs: Sequence[Any], within: float) -> list[bool]:
        return []


def lease(owner: str) -> HeldLease:
    keys = KeySchema("ns").for_token(owner)
    return HeldLease(keys, owner, 1, owner.encode(), Role.PRIMARY, None)


async def rounds_until(store: RecordingStore, check: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        store.round_seen.clear()
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await store.round_seen.wait()


async def test_a_lease_added_from_another_thread_is_renewed_and_dropped() -> None:
    store = RecordingStore()
    lost: list[HeldLease] = []
    renewer = Renewer(store, INTERVAL, lost.append)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    held = lease("a")
    adder = threading.Thread(target=renewer.add_from_thread, args=(held, loop))
    adder.start()
    adder.join(5)
    assert renewer.held == 1  # counted before the renewer has taken it
    await rounds_until(store, lambda: any(b"a" in r for r in store.rounds))
    dropper = threading.Thread(target=renewer.discard_from_thread, args=(held,))
    dropper.start()
    dropper.join(5)
    assert renewer.held == 0
    seen = len(store.rounds)
    # the next period takes the drop; with nothing held the task ends and renews no more
    deadline = time.monotonic() + 5
    while renewer.running and time.monotonic() < deadline:
        await asyncio.sleep(INTERVAL)
    assert not renewer.running
    assert all(b"a" not in r for r in store.rounds[seen + 1 :])
    assert lost == []
    await renewer.aclose()


async def test_a_lease_added_from_a_thread_while_the_task_runs_needs_no_wakeup() -> None:
    store = RecordingStore()
    renewer = Renewer(store, INTERVAL, lambda lease: None)  # type: ignore[arg-type]
    renewer.add(lease("home"))
    assert renewer.running

    class NoLoop:
        def call_soon_threadsafe(self, *args: Any) -> None:
            raise AssertionError("the running renewer needed a wake-up")

    renewer.add_from_thread(lease("b"), NoLoop())  # type: ignore[arg-type]
    await rounds_until(store, lambda: any(b"b" in r for r in store.rounds))
    await renewer.aclose()


async def test_a_refusal_while_completing_is_no_loss() -> None:
    store = RecordingStore()
    lost: list[HeldLease] = []
    renewer = Renewer(store, INTERVAL, lost.append)  # type: ignore[arg-type]
    ending, running = lease("ending"), lease("running")
    ending.ending = True
    renewer.add(ending)
    renewer.add(running)
    store.verdict = False
    await rounds_until(store, lambda: bool(lost))
    assert lost == [running] and running.lost and not ending.lost
    await renewer.aclose()
