"""Every script is safe to run twice: a retried command whose first copy also ran (Redis resumed
after a stall) changes nothing more. Stream appends: tests/test_stream_exactly_once.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from strands_dedup import Deduplicator, Role, SessionBusy, SessionGuard
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._keys import KeySchema
from strands_dedup._protocol import Claimed, encode_lease
from strands_dedup._store.commands import HeldLeaseRef, Settled
from strands_dedup._store.redis import RedisStore
from strands_dedup.cli import Inspector

pytestmark = pytest.mark.timeout(30)


def run_twice(store: Any, name: str) -> None:
    """Make ``store.<name>`` run each command twice, as a retry whose first copy also ran;
    ``session_acquire`` names the session script's acquire calls (sent through ``store.run``)."""
    if name == "session_acquire":
        run = store.run

        async def acquire_twice(call: Any, **kwargs: Any) -> Any:
            if call.script.name == "session" and call.args[0] == "acquire":
                await run(call, **kwargs)
            return await run(call, **kwargs)

        store.run = acquire_twice
        return
    once = getattr(store, name)

    async def twice(*args: Any, **kwargs: Any) -> Any:
        await once(*args, **kwargs)
        return await once(*args, **kwargs)

    setattr(store, name, twice)


async def test_a_session_join_run_twice_admits_its_caller_once(
    backend_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup:
        run_twice(engine_of(dedup).store, "session_acquire")
        guard = SessionGuard(dedup, mode="throw")
        async with guard.hold("s"):  # its own first copy does not hold the session against it
            pass
        async with guard.hold("s"):  # and left nothing behind that holds it
            pass


async def test_a_queued_join_run_twice_takes_one_place(backend_url: str, namespace: str) -> None:
    async with (
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as first,
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as second,
    ):
        run_twice(engine_of(second).store, "session_acquire")
        holding, leave = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with SessionGuard(first, mode="queue").hold("s"):
                holding.set()
                await leave.wait()

        holder = asyncio.create_task(hold())
        await asyncio.wait_for(holding.wait(), 5)
        queued = SessionGuard(second, mode="queue", queue_timeout=10)
        entered = asyncio.Event()

        async def wait_turn() -> None:
            async with queued.hold("s"):
                entered.set()

        waiter = asyncio.create_task(wait_turn())
        while second.activity().waiters == 0:  # it is in the queue
            await asyncio.sleep(0.005)
        leave.set()
        await holder
        # the next in line is the caller itself, not a copy of its ticket nobody renews (which
        # would hold its turn for a lease TTL, 5 s)
        await asyncio.wait_for(entered.wait(), 2)
        await waiter


async def test_a_release_run_again_after_a_takeover_leaves_the_new_lease(
    backend_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as a,
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as b,
        Inspector.from_url(backend_url, namespace=namespace) as inspector,
    ):
        stuck, done = asyncio.Event(), asyncio.Event()

        async def hangs() -> str:
            await stuck.wait()
            return "first"

        async def takes_over() -> str:
            await done.wait()
            return "second"

        primary = asyncio.create_task(a.execute("tok", hangs))
        while a.activity().in_flight == 0:
            await asyncio.sleep(0.005)
        waiter = asyncio.create_task(b.execute("tok", takes_over))
        while b.activity().waiters == 0:
            await asyncio.sleep(0.005)
        once = RedisStore.force_release

        async def again_after_the_takeover(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
            value = await once(self, *args, **kwargs)
            while b.activity().in_flight == 0:  # the waiter took over
                await asyncio.sleep(0.005)
            await once(self, *args, **kwargs)  # the retried copy, late
            return value

        monkeypatch.setattr(RedisStore, "force_release", again_after_the_takeover)
        released = await inspector.release("tok")
        assert released is not None and released.fence > 0
        lease = await inspector.lease("tok")
        assert lease is not None and lease.fence > released.fence  # the takeover's, still held
        done.set()
        outcome = await asyncio.wait_for(waiter, 10)
        assert (outcome.role, outcome.value) == (Role.TAKEOVER, "second")
        stuck.set()
        with pytest.raises(Exception, match="lease"):  # the released primary is fenced off
            await primary


async def test_a_throw_mode_join_is_still_refused_while_another_holds(
    backend_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup:
        run_twice(engine_of(dedup).store, "session_acquire")
        guard = SessionGuard(dedup, mode="throw")
        async with guard.hold("s"):
            with pytest.raises(SessionBusy):
                async with guard.hold("s"):
                    pytest.fail("admitted twice")


async def test_a_settle_run_twice_is_accepted_and_a_zombie_is_refused_once_the_fence_is_gone(
    backend_url: str, namespace: str
) -> None:
    """Storing a result deletes the fence key: the settle's own repeat still succeeds, while
    everything a zombie of an earlier fence sends is refused."""
    keys = KeySchema(namespace).for_token("tok")
    async with Deduplicator.from_url(backend_url, namespace=namespace) as dedup:
        store = engine_of(dedup).store
        client = store.client
        zombie = await store.claim(keys, "aaaa", b"{}")
        assert isinstance(zombie, Claimed)
        await client.delete(keys.lease)  # its lease ran out while it was paused
        taker = await store.claim(keys, "bbbb", b"{}")
        assert isinstance(taker, Claimed) and taker.fence > zombie.fence
        envelope = b"SD2|bbbb|%d|o|json|1||\n1" % taker.fence
        assert (await store.settle(keys, "bbbb", taker.fence, envelope, b"")).ok
        assert await client.exists(keys.fence) == 0 and await client.exists(keys.lease) == 0
        # the same settle again (a retry whose first copy ran): accepted, nothing changes
        assert (await store.settle(keys, "bbbb", taker.fence, envelope, b"")).ok
        lease = encode_lease("aaaa", zombie.fence, b"{}")
        assert await store.renew([HeldLeaseRef(keys, lease)]) == [False]
        late = await store.settle(keys, "aaaa", zombie.fence, b"SD2|aaaa|1|o|json|1||\n2", b"")
        assert late == Settled(False, "fence")
        assert not await store.append(keys, "aaaa", zombie.fence, [(b"c", b"x")], 1000, 0)
        assert await store.force_release(keys, "aaaa") is None
        assert await client.get(keys.result) == envelope
        assert await client.exists(keys.lease) == 0
        assert (await dedup.execute("tok", lambda: "other")).fence == taker.fence
