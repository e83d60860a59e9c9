"""IdempotencyMiddleware through httpx's ASGI transport, on memory:// and a real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from servers import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strands_dedup import Deduplicator
from strands_dedup.asgi import IdempotencyMiddleware

pytestmark = pytest.mark.timeout(30)


class Agent:
    """A Starlette app whose handler counts runs and can be held on an event."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.status = 200
        self.size = 10
        self.done = asyncio.Event()

    async def invoke(self, request: Request) -> Response:
        self.runs += 1
        self.started.set()
        body = await request.body()
        await self.release.wait()
        self.done.set()
        return JSONResponse(
            {"run": self.runs, "echo": body.decode(), "pad": "x" * self.size},
            status_code=self.status,
            headers={"x-agent": "1", "connection": "keep-alive, x-private", "x-private": "no"},
        )

    async def read(self, request: Request) -> Response:
        return JSONResponse({"runs": self.runs})

    def app(self, dedup: Deduplicator, **options: Any) -> Starlette:
        app = Starlette(
            routes=[
                Route("/invoke", self.invoke, methods=["POST", "PATCH"]),
                Route("/invoke", self.read, methods=["GET"]),
            ]
        )
        app.add_middleware(IdempotencyMiddleware, dedup=dedup, **options)
        return app


@pytest.fixture
async def dedup(backend_url: str, namespace: str) -> AsyncIterator[Deduplicator]:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=1) as d:
        yield d


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


def key(k: str) -> dict[str, str]:
    return {"Idempotency-Key": k}


async def test_replay_is_marked_and_hop_by_hop_headers_dropped(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup)) as http:
        first = await http.post("/invoke", content=b"hi", headers=key("k1"))
        again = await http.post("/invoke", content=b"hi", headers=key("k1"))
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() and agent.runs == 1
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-agent"] == "1"
    assert "x-private" not in again.headers and "keep-alive" not in again.headers.get(
        "connection", ""
    )


async def test_concurrent_duplicate_waits_for_the_primary(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.release.clear()
    async with client(agent.app(dedup)) as http:
        first = asyncio.create_task(http.post("/invoke", content=b"q", headers=key("k")))
        await agent.started.wait()
        dups = [
            asyncio.create_task(http.post("/invoke", content=b"q", headers=key("k")))
            for _ in range(5)
        ]
        await until(lambda: dedup._subscriber.listening == 5)
        agent.release.set()
        responses = await asyncio.gather(first, *dups)
    assert agent.runs == 1
    assert len({r.content for r in responses}) == 1
    assert [r.headers.get("idempotent-replayed") for r in responses[1:]] == ["true"] * 5


async def test_reject_mode_answers_409_with_retry_after(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.release.clear()
    async with client(agent.app(dedup, on_duplicate="reject")) as http:
        first = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await agent.started.wait()
        dup = await http.post("/invoke", headers=key("k"))
        agent.release.set()
        await first
    assert dup.status_code == 409 and int(dup.headers["retry-after"]) >= 1
    assert dup.headers["content-type"] == "application/problem+json"
    assert dup.json()["type"].endswith("/in-progress")


async def test_same_key_other_request_is_422(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup)) as http:
        await http.post("/invoke", content=b"one", headers=key("k"))
        other = await http.post("/invoke", content=b"two", headers=key("k"))
        other_query = await http.post("/invoke?x=1", content=b"one", headers=key("k"))
    assert other.status_code == other_query.status_code == 422
    assert other.json()["type"].endswith("/key-reused") and agent.runs == 1


async def test_unkeyed_and_other_methods_pass_through(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup)) as http:
        await http.post("/invoke")
        await http.post("/invoke")
        assert (await http.get("/invoke", headers=key("k"))).json() == {"runs": 2}
    strict = Agent()
    async with client(strict.app(dedup, require_key=True)) as http:
        missing = await http.post("/invoke")
        empty = await http.post("/invoke", headers=key(" "))
    assert missing.status_code == 400 and missing.json()["type"].endswith("/key-missing")
    assert empty.status_code == 400 and strict.runs == 0


async def test_scope_header_isolates_tenants(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup, scope_header="X-Tenant-Id")) as http:
        a = await http.post("/invoke", content=b"q", headers={**key("k"), "X-Tenant-Id": "a"})
        b = await http.post("/invoke", content=b"q", headers={**key("k"), "X-Tenant-Id": "b"})
    assert agent.runs == 2 and a.json()["run"] == 1 and b.json()["run"] == 2


async def test_5xx_reaches_waiters_but_is_not_retained(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.status = 503
    agent.release.clear()
    async with client(agent.app(dedup)) as http:
        first = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await agent.started.wait()
        dup = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await until(lambda: dedup._subscriber.listening == 1)
        agent.release.set()
        r1, r2 = await asyncio.gather(first, dup)
        assert r1.status_code == r2.status_code == 503 and r1.content == r2.content
        assert r2.headers["idempotent-replayed"] == "true"
        agent.status = 200
        later = await http.post("/invoke", headers=key("k"))
    assert later.status_code == 200 and agent.runs == 2


async def test_oversized_response_is_passed_on_but_not_retained(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.size = 5000
    async with client(agent.app(dedup, max_stored_body=1000)) as http:
        first = await http.post("/invoke", headers=key("k"))
        again = await http.post("/invoke", headers=key("k"))
    assert first.status_code == 200 and len(first.content) > 5000
    assert again.status_code == 200 and agent.runs == 2  # not stored: the retry ran again


async def test_body_too_large_is_413(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup, max_request_body=10)) as http:
        r = await http.post("/invoke", content=b"x" * 11, headers=key("k"))
    assert r.status_code == 413 and r.json()["type"].endswith("/body-too-large") and agent.runs == 0


async def test_a_client_that_leaves_does_not_abort_the_primary(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.release.clear()
    async with client(agent.app(dedup)) as http:
        gone = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await agent.started.wait()
        gone.cancel()
        agent.release.set()
        await agent.done.wait()
        retry = await http.post("/invoke", headers=key("k"))
    assert retry.status_code == 200 and agent.runs == 1
    assert retry.headers["idempotent-replayed"] == "true"


async def test_slow_handler_outliving_its_lease_runs_once(dedup: Deduplicator) -> None:
    agent = Agent()
    agent.release.clear()
    async with client(agent.app(dedup)) as http:  # lease_ttl is 1 s
        first = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await agent.started.wait()
        past = time.monotonic() + 2.5
        await until(lambda: time.monotonic() > past)
        dup = asyncio.create_task(http.post("/invoke", headers=key("k")))
        await until(lambda: dedup._subscriber.listening == 1)
        agent.release.set()
        r1, r2 = await asyncio.gather(first, dup)
    assert agent.runs == 1 and r1.content == r2.content


async def test_store_unavailable_is_503(namespace: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    async with Deduplicator.from_url(url, namespace=namespace, retry_attempts=1) as dead:
        agent = Agent()
        async with client(agent.app(dead)) as http:
            r = await http.post("/invoke", headers=key("k"))
    assert r.status_code == 503 and r.json()["type"].endswith("/store-unavailable")
    assert agent.runs == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="on_duplicate"):
        IdempotencyMiddleware(lambda *a: None, dedup=None, on_duplicate="queue")  # type: ignore[arg-type]


async def test_wait_timeout_and_handler_failure(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(
        backend_url, namespace=namespace, lease_ttl=1, wait_timeout=0.3
    ) as dedup:
        agent = Agent()
        agent.release.clear()
        async with client(agent.app(dedup)) as http:
            first = asyncio.create_task(http.post("/invoke", headers=key("slow")))
            await agent.started.wait()
            waited = await http.post("/invoke", headers=key("slow"))
            agent.release.set()
            await first
        assert waited.status_code == 409 and waited.json()["type"].endswith("/wait-timeout")
        assert "retry-after" in waited.headers

        async def crash(request: Request) -> Response:
            started.set()
            await go.wait()
            raise RuntimeError("handler crashed")

        started, go = asyncio.Event(), asyncio.Event()
        app = Starlette(routes=[Route("/crash", crash, methods=["POST"])])
        app.add_middleware(IdempotencyMiddleware, dedup=dedup)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            primary = asyncio.create_task(http.post("/crash", headers=key("boom")))
            await started.wait()
            dup = asyncio.create_task(http.post("/crash", headers=key("boom")))
            await until(lambda: dedup._subscriber.listening == 1)
            go.set()
            assert (await primary).status_code == 500  # the server's own answer to a crash
            shared = await dup
        assert shared.status_code == 502 and shared.json()["type"].endswith("/primary-failed")
        detail = shared.json()["detail"]
    assert "RuntimeError" in detail and "handler crashed" not in detail  # the text stays in logs
