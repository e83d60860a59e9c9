"""Streams are exactly-once per chunk, and followers verify what they relayed.

An append whose reply was lost is sent again; when both copies run (Redis resumed after a stall)
each chunk must still be in the stream once. A follower checks the chunks it relayed against the
attempt's count and digest before it ends: a stream that does not add up (a chunk twice) gives the
library's caller a `StreamReset` (then the stored value, whole) and aborts an HTTP follower's
connection instead of ending it cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from servers import STALL_OPTIONS, ClusterSetup, RedisServer
from side import Side, side_of
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from test_http_streaming import serve

from strands_dedup import Deduplicator, StreamReset
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup.http import IdempotencyMiddleware

pytestmark = pytest.mark.timeout(30)
CHUNKS = 20


async def collect(stream: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in stream]


async def entries(side: Side, keys: Any) -> list[tuple[bytes, bytes]]:
    """The (kind, data) of every entry of the token's stream (``keys``: `token_keys`')."""
    found = await side.xrange(keys.stream)
    return [(fields[b"k"], fields[b"d"]) for _, fields in found]


async def until(check: Callable[[], Any], what: str, seconds: float = 10) -> None:
    """Wait (polling a counter, with a deadline) until ``check()`` is true."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


class Gated:
    """Streams CHUNKS JSON chunks; after ``hold_after`` of them, waits for ``go``. ``before(i)``
    is awaited before chunk ``i`` is made."""

    def __init__(
        self, hold_after: int, before: Callable[[int], Awaitable[None]] | None = None
    ) -> None:
        self.hold_after = hold_after
        self.before = before
        self.held = asyncio.Event()
        self.go = asyncio.Event()
        self.runs = 0

    async def __call__(self) -> AsyncIterator[dict[str, int]]:
        self.runs += 1
        for i in range(CHUNKS):
            if i == self.hold_after:
                self.held.set()
                await self.go.wait()
            if self.before is not None:
                await self.before(i)
            yield {"i": i}


EXPECTED = [{"i": i} for i in range(CHUNKS)]


async def follow_and_finish(dedup: Deduplicator, token: str, produce: Gated) -> list[Any]:
    """Start a follower while the primary is held; once it has relayed the stream's first chunk
    (it follows the live attempt), release the primary; return what the follower got."""
    other = Gated(CHUNKS)
    stream = dedup.stream(token, other)
    got = [await asyncio.wait_for(anext(stream), 10)]
    produce.go.set()
    got += await asyncio.wait_for(collect(stream), 20)
    assert other.runs == 0
    return got


# -- a repeated append ---------------------------------------------------------------------------


async def test_an_append_run_twice_adds_each_chunk_once(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup:
        store = engine_of(dedup).store
        once = store.append

        async def twice(*args: Any, **kwargs: Any) -> bool:
            # a retried append whose first copy also ran: the same batch, run twice
            await once(*args, **kwargs)
            return await once(*args, **kwargs)

        store.append = twice  # type: ignore[method-assign]
        produce = Gated(hold_after=10)
        primary = asyncio.create_task(collect(dedup.stream("tok", produce)))
        await asyncio.wait_for(produce.held.wait(), 5)
        got = await follow_and_finish(dedup, "tok", produce)
        assert await primary == EXPECTED
        assert got == EXPECTED  # every chunk once, no reset
        async with side_of(backend_url) as side:
            kinds = [kind for kind, _ in await entries(side, dedup.token_keys("tok"))]
        assert kinds == [b"b"] + [b"c"] * CHUNKS + [b"e"]


async def stalled_stream(url: str, pid: int) -> None:
    """Once chunks 0-4 are appended, a primary stops Redis for 1.5 s and emits chunks 5-11: their
    append leaves while Redis is stopped, times out and is sent again until Redis resumes (the
    copies that were sent all run then). A follower joining afterwards gets each chunk once."""
    options = {**STALL_OPTIONS, "retry_attempts": 20, "retry_deadline": 10, "lease_ttl": 30}
    async with (
        Deduplicator.from_url(url, wait_timeout=20, **options) as dedup,
        side_of(url) as side,
    ):
        keys = dedup.token_keys("stalled")

        async def stop(i: int) -> None:
            if i == 5:
                await until(lambda: _count(side, keys, 6), "chunks 0-4 appended")
                os.kill(pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(1.5, os.kill, pid, signal.SIGCONT)

        # Redis knows the script before the stall (else the first copy fails with NOSCRIPT)
        assert await collect(dedup.stream("warm", Gated(CHUNKS))) == EXPECTED
        produce = Gated(hold_after=12, before=stop)
        primary = asyncio.create_task(collect(dedup.stream("stalled", produce)))
        await asyncio.wait_for(produce.held.wait(), 10)
        # every chunk emitted so far is appended (the stall is over)
        await until(lambda: _count(side, keys, 13), "the appends after the stall", 15)
        got = await follow_and_finish(dedup, "stalled", produce)
        assert await primary == EXPECTED
        assert got == EXPECTED
        kinds = [kind for kind, _ in await entries(side, keys)]
        assert kinds == [b"b"] + [b"c"] * CHUNKS + [b"e"]


async def _count(side: Side, keys: Any, n: int) -> bool:
    return bool(await side.xlen(keys.stream) >= n)


@pytest.mark.redis
async def test_redis_stopped_mid_stream_appends_each_chunk_once(
    redis_server_factory: type[RedisServer],
) -> None:
    server = redis_server_factory()
    assert server.proc is not None
    try:
        await stalled_stream(server.url, server.proc.pid)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


@pytest.mark.redis
@pytest.mark.timeout(60)
async def test_a_cluster_node_stopped_mid_stream_appends_each_chunk_once(
    fresh_cluster: Callable[..., ClusterSetup],
) -> None:
    # a node timeout far above the stall: the stopped primary is not failed over
    cluster = fresh_cluster("--cluster-node-timeout", "30000")
    dedup = Deduplicator.from_url(cluster.url, namespace="ns")
    keys = dedup.token_keys("stalled")
    port = cluster.primary_port_for(keys.lease)
    proc = cluster.node(port).proc
    assert proc is not None
    await dedup.aclose()
    try:
        await stalled_stream(cluster.url, proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGCONT)


# -- a corrupted stream --------------------------------------------------------------------------


async def inject_duplicate(side: Side, keys: Any) -> None:
    """Add a copy of the stream's last entry after it (what a repeated append used to do)."""
    last = (await side.xrevrange(keys.stream, count=1))[0][1]
    await side.xadd(keys.stream, last)


async def test_a_follower_of_a_corrupted_stream_gets_a_reset_then_the_stored_value(
    backend_url: str, namespace: str
) -> None:
    async with (
        Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup,
        side_of(backend_url) as side,
    ):
        keys = dedup.token_keys("tok")
        produce = Gated(hold_after=10)
        primary = asyncio.create_task(collect(dedup.stream("tok", produce)))
        await asyncio.wait_for(produce.held.wait(), 5)
        await until(lambda: _count(side, keys, 11), "the first ten chunks")
        await inject_duplicate(side, keys)
        got = await follow_and_finish(dedup, "tok", produce)
        assert await primary == EXPECTED
        resets = [i for i, item in enumerate(got) if isinstance(item, StreamReset)]
        assert resets, f"the follower ended cleanly with a corrupted stream: {got}"
        assert got[resets[-1] + 1 :] == EXPECTED  # after the reset: the stored value, whole


class SseUpstream:
    """Streams CHUNKS server-sent events; holds after ten until ``go``."""

    def __init__(self) -> None:
        self.runs = 0
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    async def chat(self, request: Request) -> Response:
        self.runs += 1
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            for i in range(CHUNKS):
                if i == 10:
                    self.held.set()
                    await self.go.wait()
                yield f"data: token-{i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


async def test_an_http_follower_of_a_corrupted_stream_has_its_connection_aborted(
    backend_url: str, namespace: str
) -> None:
    upstream = SseUpstream()
    app = Starlette(routes=[Route("/chat", upstream.chat, methods=["POST"])])
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=5) as dedup:
        guarded = IdempotencyMiddleware(app, dedup=dedup)
        keys = dedup.token_keys(b"sse", guarded.scope_of({"headers": []}))
        async with (
            serve(guarded) as base,
            httpx.AsyncClient(timeout=20) as client,
            side_of(backend_url) as side,
        ):
            url, key = base + "/chat", {"Idempotency-Key": '"sse"'}
            primary = asyncio.create_task(client.post(url, headers=key, content=b"hi"))
            await asyncio.wait_for(upstream.held.wait(), 5)
            await until(lambda: _count(side, keys, 12), "the head and ten chunks")
            await inject_duplicate(side, keys)

            following = asyncio.Event()

            async def follow() -> bytes:
                async with client.stream("POST", url, headers=key, content=b"hi") as response:
                    assert response.headers["idempotent-replayed"] == "true"
                    parts = []
                    async for part in response.aiter_raw():
                        parts.append(part)
                        following.set()  # it follows the live stream
                    return b"".join(parts)

            follower = asyncio.create_task(follow())
            await asyncio.wait_for(following.wait(), 10)
            upstream.go.set()
            expected = "".join(f"data: token-{i}\n\n" for i in range(CHUNKS)).encode()
            assert (await primary).content == expected
            with pytest.raises(httpx.RemoteProtocolError):
                body = await asyncio.wait_for(follower, 20)
                pytest.fail(f"the follower's response ended cleanly ({len(body)} bytes)")
            assert upstream.runs == 1


@pytest.mark.parametrize("corrupted", [False, True])
async def test_an_http_follower_of_a_stream_that_stopped_checks_the_stored_body(
    backend_url: str, namespace: str, corrupted: bool
) -> None:
    # The stream outgrows max_stream_bytes at chunk 14: its appends stop (no end marker) and the
    # follower gets the rest from the stored body, once what it relayed is the body's start.
    upstream = SseUpstream()
    app = Starlette(routes=[Route("/chat", upstream.chat, methods=["POST"])])
    async with Deduplicator.from_url(
        backend_url, namespace=namespace, lease_ttl=5, max_stream_bytes=300
    ) as dedup:
        guarded = IdempotencyMiddleware(app, dedup=dedup)
        keys = dedup.token_keys(b"sse", guarded.scope_of({"headers": []}))
        async with (
            serve(guarded) as base,
            httpx.AsyncClient(timeout=20) as client,
            side_of(backend_url) as side,
        ):
            url, key = base + "/chat", {"Idempotency-Key": '"sse"'}
            primary = asyncio.create_task(client.post(url, headers=key, content=b"hi"))
            await asyncio.wait_for(upstream.held.wait(), 5)
            await until(lambda: _count(side, keys, 12), "the head and ten chunks")
            if corrupted:
                await inject_duplicate(side, keys)
            following = asyncio.Event()

            async def follow() -> bytes:
                async with client.stream("POST", url, headers=key, content=b"hi") as response:
                    parts = []
                    async for part in response.aiter_raw():
                        parts.append(part)
                        following.set()
                    return b"".join(parts)

            follower = asyncio.create_task(follow())
            await asyncio.wait_for(following.wait(), 10)
            upstream.go.set()
            expected = "".join(f"data: token-{i}\n\n" for i in range(CHUNKS)).encode()
            assert (await primary).content == expected
            kinds = [kind for kind, _ in await entries(side, keys)]
            assert b"e" not in kinds and len(kinds) < CHUNKS  # the stream stopped
            if corrupted:
                with pytest.raises(httpx.RemoteProtocolError):
                    body = await asyncio.wait_for(follower, 20)
                    pytest.fail(f"the follower's response ended cleanly ({len(body)} bytes)")
            else:
                assert await asyncio.wait_for(follower, 20) == expected
