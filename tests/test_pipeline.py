"""The auto-pipeline: concurrent commands in one write, replies in order, failures contained.

On real redis-servers of the tests' own (DEBUG SLEEP holds a batch in flight; CLIENT KILL drops
its connection; SIGSTOP stalls it; SCRIPT FLUSH forgets the scripts).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aredis
import redis.exceptions as rex
from servers import RedisServer

from strands_dedup import Deduplicator, StoreUnavailable
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._store.pipeline import AutoPipeline

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def server(redis_server_factory: type[RedisServer]) -> RedisServer:
    return redis_server_factory("--enable-debug-command", "yes")


@pytest.fixture
async def pipe(server: RedisServer) -> AsyncIterator[AutoPipeline]:
    client = aredis.Redis(port=server.port, protocol=2)
    pipeline = AutoPipeline(client.connection_pool, timeout=2)
    yield pipeline
    await pipeline.aclose()
    await client.aclose()


async def test_replies_reach_their_callers_in_order(pipe: AutoPipeline) -> None:
    async def one(i: int) -> None:
        for round_ in range(5):
            await asyncio.sleep(0.001 * (i % 3))  # interleave the callers over iterations
            assert await pipe.execute("ECHO", f"{i}-{round_}") == f"{i}-{round_}".encode()

    await asyncio.gather(*(one(i) for i in range(300)))
    assert pipe.commands == 1500 and pipe.batches < 300  # batched, not one write each


async def test_an_error_reply_goes_to_its_caller_only(pipe: AutoPipeline) -> None:
    results = await asyncio.gather(
        pipe.execute("ECHO", "a"),
        pipe.execute("NO-SUCH-COMMAND"),
        pipe.execute("ECHO", "b"),
        return_exceptions=True,
    )
    assert results[0] == b"a" and results[2] == b"b"
    assert isinstance(results[1], rex.ResponseError)


class CuttingProxy:
    """A TCP proxy to Redis that, once ``budget`` is set, passes that many more reply bytes and
    then closes the connection: a connection dropped in the middle of a batch's replies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.budget: int | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        pump = asyncio.ensure_future(requests())
        try:
            while data := await up_reader.read(65536):
                if self.budget is not None:
                    data = data[: self.budget]
                    self.budget -= len(data)
                    if self.budget <= 0:
                        writer.write(data)
                        break
                writer.write(data)
                await writer.drain()
        finally:
            pump.cancel()
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_connection_dropped_mid_batch_fails_that_batch_and_no_more(
    server: RedisServer,
) -> None:
    proxy = CuttingProxy(server.port)
    client = aredis.Redis(port=await proxy.start(), protocol=2)
    pipe = AutoPipeline(client.connection_pool, timeout=2)
    try:
        assert await pipe.execute("ECHO", "connected") == b"connected"
        proxy.budget = 5 * len(b"$2\r\n00\r\n") + 3  # five whole replies, then a cut
        async with asyncio.timeout(5):  # nobody hangs
            results = await asyncio.gather(
                *(pipe.execute("ECHO", f"{i:02d}") for i in range(50)), return_exceptions=True
            )
        assert results[:5] == [f"{i:02d}".encode() for i in range(5)]
        assert all(isinstance(r, rex.ConnectionError) for r in results[5:]), results[5:]
        proxy.budget = None
        assert await pipe.execute("ECHO", "after") == b"after"  # a new connection
    finally:
        await pipe.aclose()
        await client.aclose()
        await proxy.close()


async def test_a_cancelled_caller_leaves_the_others_their_replies(pipe: AutoPipeline) -> None:
    queued = [asyncio.ensure_future(pipe.execute("ECHO", str(i))) for i in range(10)]
    queued[3].cancel()  # before the write: dropped from the batch
    assert [r for i, r in enumerate(await asyncio.gather(*queued, return_exceptions=True))
            if i != 3] == [str(i).encode() for i in range(10) if i != 3]  # fmt: skip
    # The first command goes alone (nothing in flight); the rest are one batch, written once it
    # is answered, whose replies DEBUG SLEEP holds back: ECHO 1 is cancelled after its write.
    before = pipe.batches
    first = asyncio.ensure_future(pipe.execute("DEBUG", "SLEEP", "0.1"))
    batch = [
        asyncio.ensure_future(pipe.execute(*args))
        for args in (("ECHO", "0"), ("DEBUG", "SLEEP", "0.3"), ("ECHO", "1"), ("ECHO", "2"))
    ]
    await first
    deadline = time.monotonic() + 5
    while pipe.batches < before + 2:  # the lone command, then the batch: written, unanswered
        assert time.monotonic() < deadline, "the batch was never written"
        await asyncio.sleep(0.005)  # polling the pipeline's count against a deadline
    assert not batch[2].done()  # DEBUG SLEEP 0.3 holds the batch's replies
    batch[2].cancel()  # after the write: its reply is read and dropped
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [results[0], results[3]] == [b"0", b"2"]
    assert await pipe.execute("ECHO", "next") == b"next"  # nothing shifted


async def test_a_stalled_server_times_the_batch_out_then_recovers(
    pipe: AutoPipeline, server: RedisServer
) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(pipe.execute("ECHO", str(i)) for i in range(20)), return_exceptions=True
            )
        assert all(isinstance(r, rex.TimeoutError) for r in results)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert await pipe.execute("ECHO", "back") == b"back"


async def test_scripts_survive_a_flush_mid_stream_and_a_killed_connection(
    server: RedisServer,
) -> None:
    side = redis.Redis(port=server.port)
    async with Deduplicator.from_url(server.url, namespace="pipe", lease_ttl=2) as dedup:
        assert (await dedup.execute("warm", lambda: 0)).value == 0
        side.script_flush()  # every script is forgotten: EVALSHA answers NOSCRIPT

        async def call(i: int) -> int:
            return (await dedup.execute(f"t{i}", lambda: i)).value

        assert await asyncio.gather(*(call(i) for i in range(100))) == list(range(100))

        started = 0
        storming = asyncio.Event()

        async def slow(i: int) -> int:
            nonlocal started
            started += 1
            if started == 10:
                storming.set()
            await asyncio.sleep(0.05)  # the call's own work
            return i

        calls = [
            asyncio.ensure_future(dedup.execute(f"k{i}", lambda i=i: slow(i))) for i in range(60)
        ]
        async with asyncio.timeout(10):
            await storming.wait()
        side.client_kill_filter(_type="normal", skipme=True)  # mid-storm: every connection
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            assert isinstance(outcome, StoreUnavailable) or outcome.value == i
        # Nothing is left claimed for long, and the store answers again.
        assert (await dedup.execute("after", lambda: 1)).value == 1
    side.close()


async def test_a_lone_call_is_one_write(server: RedisServer) -> None:
    async with Deduplicator.from_url(server.url, namespace="lone") as dedup:
        pipeline = engine_of(dedup).store.pipeline
        assert pipeline is not None
        await dedup.execute("warm", lambda: 1)  # the scripts are loaded (EVAL once each)
        before = pipeline.commands
        await dedup.execute("one", lambda: 1)
        assert pipeline.commands - before == 2  # claim, settle: one write each
    async with Deduplicator.from_url(server.url, namespace="off", auto_pipeline=False) as dedup:
        assert engine_of(dedup).store.pipeline is None
        assert (await dedup.execute("one", lambda: 1)).value == 1


async def _written(pipe: AutoPipeline, count: int, holding: asyncio.Future[object]) -> None:
    """Wait (5 s at most) until ``count`` batches were written, failing if ``holding`` (a
    command whose reply DEBUG SLEEP holds back) was answered first."""
    deadline = time.monotonic() + 5
    while pipe.batches < count:
        assert not holding.done(), "the held batch was answered before the next one was written"
        assert time.monotonic() < deadline, "the next batch was never written"
        await asyncio.sleep(0.005)  # polling the pipeline's count against a deadline


async def _held_batch(
    pipe: AutoPipeline, seconds: str, *echoes: str
) -> list[asyncio.Future[object]]:
    """A lone ``ECHO`` first; meanwhile ``DEBUG SLEEP seconds`` and an ``ECHO`` of each of
    ``echoes`` are issued: one batch, whose replies the sleep holds back. Its futures, once the
    lone reply came and the batch is written."""
    before = pipe.batches
    lone = asyncio.ensure_future(pipe.execute("ECHO", "lone"))
    held = [
        asyncio.ensure_future(pipe.execute("DEBUG", "SLEEP", seconds)),
        *(asyncio.ensure_future(pipe.execute("ECHO", e)) for e in echoes),
    ]
    assert await lone == b"lone"
    await _written(pipe, before + 2, held[0])
    return held


async def test_a_batch_leaves_while_the_one_before_is_unanswered(pipe: AutoPipeline) -> None:
    # The first command goes alone; what is issued meanwhile is one batch, whose replies DEBUG
    # SLEEP holds back; commands issued then leave at once, on the same connection, in order.
    held = await _held_batch(pipe, "1", "a")
    written = pipe.batches
    second = [asyncio.ensure_future(pipe.execute("ECHO", str(i))) for i in range(3)]
    await _written(pipe, written + 1, held[0])
    third = asyncio.ensure_future(pipe.execute("ECHO", "c"))
    await _written(pipe, written + 2, held[0])
    async with asyncio.timeout(5):
        assert await asyncio.gather(*held) == [b"OK", b"a"]
        assert await asyncio.gather(*second) == [b"0", b"1", b"2"]
        assert await third == b"c"


async def test_at_most_depth_batches_are_unanswered(server: RedisServer) -> None:
    client = aredis.Redis(port=server.port, protocol=2)
    pipe = AutoPipeline(client.connection_pool, timeout=5, depth=1)
    try:
        (held,) = await _held_batch(pipe, "0.3")
        written = pipe.batches
        waiting = asyncio.ensure_future(pipe.execute("ECHO", "next"))
        deadline = time.monotonic() + 5
        while not held.done():  # `next` waits for the held batch's reply before it leaves
            assert pipe.batches == written
            assert time.monotonic() < deadline, "the held batch was never answered"
            await asyncio.sleep(0.005)  # polling the pipeline's count against a deadline
        async with asyncio.timeout(5):
            assert await held == b"OK"
            assert await waiting == b"next"
        assert pipe.batches == written + 1
    finally:
        await pipe.aclose()
        await client.aclose()
    with pytest.raises(ValueError, match="depth"):
        AutoPipeline(client.connection_pool, timeout=1, depth=0)


async def test_a_connection_dropped_with_two_batches_unanswered_fails_both(
    server: RedisServer,
) -> None:
    proxy = CuttingProxy(server.port)
    client = aredis.Redis(port=await proxy.start(), protocol=2)
    pipe = AutoPipeline(client.connection_pool, timeout=5)
    try:
        held = await _held_batch(pipe, "0.5", "a")
        proxy.budget = len(b"+OK\r\n") + 3  # the held batch's first reply, then a cut
        written = pipe.batches
        second = [asyncio.ensure_future(pipe.execute("ECHO", str(i))) for i in range(3)]
        await _written(pipe, written + 1, held[0])
        async with asyncio.timeout(5):  # nobody hangs
            results = await asyncio.gather(*held, *second, return_exceptions=True)
        assert results[0] == b"OK"
        assert all(isinstance(r, rex.ConnectionError) for r in results[1:]), results
        proxy.budget = None
        assert await pipe.execute("ECHO", "after") == b"after"  # a new connection
    finally:
        await pipe.aclose()
        await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_replies_and_error_replies_on_either_protocol(
    server: RedisServer, protocol: int
) -> None:
    client = aredis.Redis(port=server.port, protocol=protocol)
    pipe = AutoPipeline(client.connection_pool, timeout=5)
    try:
        await pipe.execute("SET", "k", "v")
        results = await asyncio.gather(
            *(pipe.execute("GET", "k") for _ in range(40)),
            pipe.execute("EVALSHA", "0" * 40, 0),
            pipe.execute("HSET", "h", "f", "1"),
            pipe.execute("HGETALL", "h"),
            return_exceptions=True,
        )
        assert results[:40] == [b"v"] * 40
        assert isinstance(results[40], rex.NoScriptError)  # the error's own type
        assert results[41] == 1
        assert results[42] in ([b"f", b"1"], {b"f": b"1"})  # RESP2 array, RESP3 map
    finally:
        await pipe.aclose()
        await client.aclose()
