"""Streamed HTTP responses: the middleware and the gateway pass server-sent events to the
primary's client as they come and replay them live to duplicates (real uvicorn servers)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from servers import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from strands_dedup import Deduplicator
from strands_dedup.http import Gateway, IdempotencyMiddleware

pytestmark = pytest.mark.timeout(30)
EVENTS = 10


class SseAgent:
    """Streams EVENTS server-sent events; holds after the third until released."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()

    async def chat(self, request: Request) -> Response:
        self.runs += 1
        await request.body()

        async def events() -> AsyncIterator[bytes]:
            for i in range(EVENTS):
                if i == 3:
                    await self.release.wait()
                yield f"data: token-{i}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/chat", self.chat, methods=["POST"])])


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server failed to start"
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def read_events(
    client: httpx.AsyncClient, url: str, seen: list[str], headers: dict[str, str]
) -> httpx.Response:
    async with client.stream("POST", url, headers=headers, content=b"hi") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(line[6:])
    return response


async def check_live_replay(url: str, agent: SseAgent) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        first: list[str] = []
        second: list[str] = []
        key = {"Idempotency-Key": "sse-1"}
        primary = asyncio.create_task(read_events(client, url, first, key))
        while len(first) < 3:
            await asyncio.sleep(0.01)
        follower = asyncio.create_task(read_events(client, url, second, key))
        while len(second) < 3:  # the follower got the start of the stream, still in progress
            await asyncio.sleep(0.01)
        assert not primary.done()
        agent.release.set()
        mine, theirs = await asyncio.gather(primary, follower)
        expected = [f"token-{i}" for i in range(EVENTS)]
        assert first == expected and second == expected
        assert mine.headers["content-type"].startswith("text/event-stream")
        assert "idempotent-replayed" not in mine.headers
        assert theirs.headers["idempotent-replayed"] == "true"
        later: list[str] = []
        again = await read_events(client, url, later, key)
        assert later == expected and again.headers["idempotent-replayed"] == "true"
        assert agent.runs == 1


async def test_middleware_streams_live_to_duplicates(backend_url: str, namespace: str) -> None:
    agent = SseAgent()
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        app = agent.app()
        app.add_middleware(IdempotencyMiddleware, dedup=dedup)
        async with serve(app) as base:
            await check_live_replay(base + "/chat", agent)


@pytest.mark.redis
async def test_gateway_streams_live_to_duplicates(redis_url: str, namespace: str) -> None:
    agent = SseAgent()
    async with (
        serve(agent.app()) as upstream,
        Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=2) as dedup,
        serve(Gateway(upstream, dedup=dedup)) as gateway,
    ):
        await check_live_replay(gateway + "/chat", agent)
