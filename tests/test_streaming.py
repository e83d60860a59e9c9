"""Streamed calls: followers replay the primary's stream from the start, then follow it live."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
from children import Child
from side import side_of

from strands_dedup import (
    Deduplicator,
    LeaseLost,
    PrimaryFailed,
    ResultTooLarge,
    StreamReset,
)

pytestmark = pytest.mark.timeout(30)


class Producer:
    """Yields ``n`` chunks; pauses after ``pause_after`` until released."""

    def __init__(self, n: int, pause_after: int | None = None) -> None:
        self.n = n
        self.pause_after = pause_after
        self.produced = 0
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.runs = 0

    async def __call__(self) -> AsyncIterator[dict[str, int]]:
        self.runs += 1
        for i in range(self.n):
            if i == self.pause_after:
                self.paused.set()
                await self.resume.wait()
            self.produced += 1
            yield {"i": i}


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def test_a_duplicate_joining_mid_stream_gets_every_chunk_in_order(
    backend_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        produce = Producer(20, pause_after=5)
        primary = asyncio.create_task(collect(dedup.stream("tok", produce)))
        await asyncio.wait_for(produce.paused.wait(), 5)
        other = Producer(20)  # never runs: the first call is alive
        follower = asyncio.create_task(collect(dedup.stream("tok", other)))
        while dedup.activity().waiters < 1:
            await asyncio.sleep(0.005)
        produce.resume.set()
        mine, theirs = await asyncio.gather(primary, follower)
        expected = [{"i": i} for i in range(20)]
        assert mine == expected and theirs == expected
        assert produce.runs == 1 and other.runs == 0


async def test_a_late_retry_gets_the_whole_stream(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        produce = Producer(50)
        first = await collect(dedup.stream("tok", produce))
        again = await collect(dedup.stream("tok", produce))
        assert first == again == [{"i": i} for i in range(50)]
        assert produce.runs == 1


async def test_followers_in_another_deduplicator_follow_live(
    backend_url: str, namespace: str
) -> None:
    async with (
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as a,
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as b,
    ):
        seen: list[int] = []
        gate = asyncio.Event()

        async def slow() -> AsyncIterator[int]:
            for i in range(10):
                if i == 2:
                    await gate.wait()
                yield i

        primary = asyncio.create_task(collect(a.stream("live", slow)))

        async def follow() -> None:
            async for item in b.stream("live", slow):
                seen.append(item)
                if item == 1:
                    gate.set()  # the follower got chunk 1 before the primary made chunk 2

        await asyncio.wait_for(follow(), 10)
        assert seen == list(range(10)) and await primary == list(range(10))


async def test_the_stream_size_is_bounded(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(
        backend_url, namespace=namespace, lease_ttl=2, max_stream_chunks=5
    ) as dedup:
        produce = Producer(6)
        with pytest.raises(ResultTooLarge):
            await collect(dedup.stream("big", produce))
        assert produce.produced == 6  # the sixth chunk passed the bound
    async with Deduplicator.from_url(
        backend_url, namespace=namespace, lease_ttl=2, max_stream_bytes=30
    ) as dedup:
        with pytest.raises(ResultTooLarge):
            await collect(dedup.stream("bytes", Producer(10)))
        # the failure is not stored: a retry runs again (and fails again here)
        with pytest.raises(ResultTooLarge):
            await collect(dedup.stream("bytes", Producer(10)))


async def test_a_failing_primary_fails_its_followers(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        started, gate = asyncio.Event(), asyncio.Event()

        async def broken() -> AsyncIterator[int]:
            started.set()
            yield 1
            await gate.wait()
            raise RuntimeError("model exploded")

        primary = asyncio.create_task(collect(dedup.stream("fail", broken)))
        await asyncio.wait_for(started.wait(), 5)
        follower = dedup.stream("fail", broken)
        assert await anext(follower) == 1  # following the live stream
        gate.set()
        with pytest.raises(RuntimeError):
            await primary
        with pytest.raises(PrimaryFailed, match="model exploded"):
            await anext(follower)


async def test_a_fenced_out_primary_cannot_append(redis_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=2) as dedup:
        produce = Producer(10, pause_after=3)
        primary = asyncio.create_task(collect(dedup.stream("zombie", produce)))
        await asyncio.wait_for(produce.paused.wait(), 5)
        keys = dedup.token_keys("zombie")
        side = redis.Redis.from_url(redis_url)
        side.incr(keys.fence)  # somebody else claimed the token meanwhile
        side.delete(keys.lease)
        produce.resume.set()
        with pytest.raises(LeaseLost):
            await primary
        kinds = [fields[b"k"] for _, fields in side.xrange(keys.stream)]
        side.close()
        assert kinds == [b"b", b"c", b"c", b"c"]  # nothing after the fence moved


async def test_bad_input(namespace: str) -> None:
    async with Deduplicator.from_url("memory://", namespace=namespace) as dedup:
        with pytest.raises(TypeError, match="callable"):
            await collect(dedup.stream("t", "not callable"))  # type: ignore[arg-type]

        async def unserializable() -> AsyncIterator[Any]:
            yield object()

        from strands_dedup import SerializationError

        with pytest.raises(SerializationError, match="JSON"):
            await collect(dedup.stream("t2", unserializable))


# -- a primary SIGKILLed mid-stream ------------------------------------------------------------


@pytest.mark.redis
async def test_a_primary_killed_mid_stream_is_replaced_and_followers_reset(
    redis_url: str, namespace: str, children: Callable[..., Awaitable[Child]]
) -> None:
    lease_ttl = 1.0
    child = await children(
        "stream",
        redis_url,
        namespace,
        "sk",
        "--calls",
        "1000",
        "--seconds",
        "0.02",
        "--lease-ttl",
        str(lease_ttl),
    )
    await child.expect("streaming", 30)
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=lease_ttl) as dedup:
        got: list[Any] = []

        async def mine() -> AsyncIterator[dict[str, int]]:
            for i in range(5):
                yield {"pid": os.getpid(), "i": i}

        async def follow() -> None:
            async for item in dedup.stream("sk", mine):
                got.append(item)
                if len(got) == 6:
                    os.kill(child.pid, signal.SIGKILL)

        await asyncio.wait_for(follow(), 20)
    resets = [i for i, item in enumerate(got) if isinstance(item, StreamReset)]
    assert len(resets) == 1, got
    before, after = got[: resets[0]], got[resets[0] + 1 :]
    assert {item["pid"] for item in before} == {child.pid}
    assert [item["i"] for item in before] == list(range(len(before)))  # in order, from 0
    assert after == [{"pid": os.getpid(), "i": i} for i in range(5)]  # the new attempt, whole


async def test_a_follower_follows_only_the_attempt_of_the_live_lease(
    backend_url: str, namespace: str
) -> None:
    # A first attempt streams three chunks and fails (its lease is released); a second primary
    # holds the token without having streamed yet. A follower joining now must not take the dead
    # attempt's chunks for the live one's (it would have to be reset, mid-response, later).
    async with (
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as a,
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as b,
        side_of(backend_url) as side,
    ):
        keys = a.token_keys("tok")
        fail = asyncio.Event()

        async def dies() -> AsyncIterator[dict[str, int]]:
            for i in range(3):
                yield {"dead": i}
            await fail.wait()
            raise RuntimeError("the first attempt dies")

        first = asyncio.create_task(collect(a.stream("tok", dies)))
        deadline = asyncio.get_running_loop().time() + 5
        while await side.xlen(keys.stream) < 4:  # its begin and 3 chunks
            assert asyncio.get_running_loop().time() < deadline, "the chunks never arrived"
            await asyncio.sleep(0.005)  # polling the stream against a deadline
        fail.set()
        with pytest.raises(RuntimeError):
            await first
        live = Producer(5, pause_after=0)  # claims, then waits before its first chunk
        second = asyncio.create_task(collect(b.stream("tok", live)))
        await asyncio.wait_for(live.paused.wait(), 5)
        follower = asyncio.create_task(collect(a.stream("tok", Producer(5))))
        while a.activity().waiters < 1:
            await asyncio.sleep(0.005)  # polling the subscriber against the test's timeout
        live.resume.set()
        followed, produced = await asyncio.gather(follower, second)
        assert produced == [{"i": i} for i in range(5)]
        assert followed == produced  # no dead chunk, no StreamReset
