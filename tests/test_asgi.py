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
from strands_dedup.http import IdempotencyMiddleware

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
        await until(lambda: dedup.activity().listening == 5)
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
        await until(lambda: dedup.activity().listening == 1)
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
        await until(lambda: dedup.activity().listening == 1)
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
            await until(lambda: dedup.activity().listening == 1)
            go.set()
            assert (await primary).status_code == 500  # the server's own answer to a crash
            shared = await dup
        assert shared.status_code == 502 and shared.json()["type"].endswith("/primary-failed")
        detail = shared.json()["detail"]
    assert "RuntimeError" in detail and "handler crashed" not in detail  # the text stays in logs


async def test_callers_are_isolated_by_their_credentials(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup)) as http:
        alice = {**key("k"), "Authorization": "Bearer alice"}
        bob = {**key("k"), "X-Api-Key": "bob"}
        a = await http.post("/invoke", content=b"q", headers=alice)
        b = await http.post("/invoke", content=b"q", headers=bob)
        anon = await http.post("/invoke", content=b"q", headers=key("k"))
        again = await http.post("/invoke", content=b"q", headers=alice)
    assert [a.json()["run"], b.json()["run"], anon.json()["run"]] == [1, 2, 3]
    assert again.json()["run"] == 1 and again.headers["idempotent-replayed"] == "true"


async def test_an_identity_callable_and_a_tenant_combine(dedup: Deduplicator) -> None:
    agent = Agent()

    def user(scope: dict[str, object]) -> str:
        return dict(scope["headers"]).get(b"x-user", b"").decode()  # type: ignore[call-overload, no-any-return]

    app = agent.app(dedup, identity=user, scope_header="X-Tenant")
    async with client(app) as http:
        runs = [
            (await http.post("/invoke", headers={**key("k"), **h})).json()["run"]
            for h in (
                {"X-User": "u1", "X-Tenant": "t1"},
                {"X-User": "u1", "X-Tenant": "t2"},
                {"X-User": "u2", "X-Tenant": "t1"},
                {"X-User": "u1", "X-Tenant": "t1", "Authorization": "ignored"},
            )
        ]
    assert runs == [1, 2, 3, 1]


async def test_sharing_keys_across_identities_is_explicit_and_logged(
    dedup: Deduplicator, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent()
    with caplog.at_level("WARNING", logger="strands_dedup.http"):
        IdempotencyMiddleware(agent.invoke, dedup=dedup, share_keys_across_identities=True)  # type: ignore[arg-type]
    assert "share_keys_across_identities" in caplog.text
    async with client(agent.app(dedup, share_keys_across_identities=True)) as http:
        await http.post("/invoke", headers={**key("k"), "Authorization": "Bearer a"})
        other = await http.post("/invoke", headers={**key("k"), "Authorization": "Bearer b"})
    assert other.headers["idempotent-replayed"] == "true" and agent.runs == 1


def test_a_credential_header_cannot_be_the_tenant() -> None:
    with pytest.raises(ValueError, match="credential header"):
        IdempotencyMiddleware(Agent().invoke, dedup=None, scope_header="Authorization")  # type: ignore[arg-type]


async def test_replays_carry_no_set_cookie_unless_asked(dedup: Deduplicator) -> None:
    async def login(request: Request) -> Response:
        return Response(
            "ok", headers={"set-cookie": "sid=1", "date": "Mon, 01 Jan 2001 00:00:00 GMT"}
        )

    for keep in (False, True):
        app = Starlette(routes=[Route("/login", login, methods=["POST"])])
        app.add_middleware(IdempotencyMiddleware, dedup=dedup, replay_set_cookie=keep)
        async with client(app) as http:
            first = await http.post("/login", headers=key(f"cookie-{keep}"))
            again = await http.post("/login", headers=key(f"cookie-{keep}"))
        assert first.headers["set-cookie"] == "sid=1"
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers.get("set-cookie") == ("sid=1" if keep else None)
        assert "date" not in again.headers  # the server adds a fresh one


async def test_retry_after_follows_the_lease_and_is_capped(
    backend_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=30) as dedup:
        for cap, low, high in ((60, 25, 30), (5, 5, 5)):
            agent = Agent()
            agent.release.clear()
            app = agent.app(dedup, on_duplicate="reject", max_retry_after=cap)
            async with client(app) as http:
                first = asyncio.create_task(http.post("/invoke", headers=key(f"ra-{cap}")))
                await agent.started.wait()
                dup = await http.post("/invoke", headers=key(f"ra-{cap}"))
                agent.release.set()
                await first
            assert dup.status_code == 409 and low <= int(dup.headers["retry-after"]) <= high


async def test_keys_must_be_one_and_may_be_quoted(dedup: Deduplicator) -> None:
    agent = Agent()
    async with client(agent.app(dedup)) as http:
        bare = await http.post("/invoke", headers=key("abc"))
        quoted = await http.post("/invoke", headers=key('"abc"'))
        listed = await http.post("/invoke", headers=key('"a", "b"'))
        two = await http.post(
            "/invoke", headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
    assert quoted.headers["idempotent-replayed"] == "true" and quoted.json() == bare.json()
    assert listed.status_code == two.status_code == 400 and agent.runs == 1
    assert two.json()["type"].endswith("/key-invalid")


async def test_a_declared_length_over_the_limit_is_refused_unread(dedup: Deduplicator) -> None:
    read: list[str] = []

    async def receive() -> dict[str, object]:
        read.append("body")
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    middleware = IdempotencyMiddleware(Agent().invoke, dedup=dedup, max_request_body=1000)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invoke",
        "headers": [(b"idempotency-key", b"k"), (b"content-length", b"300000000")],
    }
    await middleware(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 413 and read == []
    chunked = {**scope, "headers": [(b"idempotency-key", b"k")]}
    sent.clear()
    await middleware(chunked, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 413 and len(read) == 11  # refused once past the limit


class Streamer:
    """A raw ASGI app that streams b"a", then (once released) b"b" and b"c", without a length."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.runs += 1
        await receive()
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        await send({"type": "http.response.body", "body": b"c", "more_body": False})
        self.finished.set()


class Recorder:
    """An ASGI client: the messages it was sent; ``fail_after`` messages, its send raises."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.fail_after = fail_after
        self.got_first_chunk = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"q", "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if self.fail_after is not None and len(self.messages) >= self.fail_after:
            raise OSError("the connection is gone")
        self.messages.append(message)
        if message.get("body") == b"a":
            self.got_first_chunk.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


def keyed_scope(k: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "headers": [(b"idempotency-key", k), (b"content-length", b"1")],
    }


async def test_a_client_leaving_mid_stream_cuts_neither_the_run_nor_its_followers(
    dedup: Deduplicator,
) -> None:
    app = Streamer()
    middleware = IdempotencyMiddleware(app, dedup=dedup)
    gone, follower, retry = Recorder(), Recorder(), Recorder()
    first = asyncio.create_task(middleware(keyed_scope(b"s1"), gone.receive, gone.send))
    await gone.got_first_chunk.wait()
    joined = asyncio.create_task(middleware(keyed_scope(b"s1"), follower.receive, follower.send))
    await follower.got_first_chunk.wait()  # the follower has the live stream's start
    first.cancel()  # the primary's client leaves (its server cancels its request)
    with pytest.raises(asyncio.CancelledError):
        await first
    app.release.set()
    await joined
    assert follower.status == 200 and follower.body == b"abc"
    assert follower.headers[b"idempotent-replayed"] == b"true"
    await app.finished.wait()
    await middleware(keyed_scope(b"s1"), retry.receive, retry.send)
    assert retry.body == b"abc" and retry.headers[b"idempotent-replayed"] == b"true"
    assert gone.body.startswith(b"a") and app.runs == 1


async def test_a_connection_lost_mid_response_does_not_cut_the_stored_result(
    dedup: Deduplicator,
) -> None:
    app = Streamer()
    app.release.set()
    middleware = IdempotencyMiddleware(app, dedup=dedup)
    gone, retry = Recorder(fail_after=2), Recorder()  # the head and b"a" go out, then it fails
    await middleware(keyed_scope(b"s2"), gone.receive, gone.send)
    assert gone.body == b"a"
    await middleware(keyed_scope(b"s2"), retry.receive, retry.send)
    assert retry.status == 200 and retry.body == b"abc" and app.runs == 1
    assert retry.headers[b"idempotent-replayed"] == b"true"


async def test_cancel_primaries_releases_the_keys_of_running_calls(dedup: Deduplicator) -> None:
    app = Streamer()
    middleware = IdempotencyMiddleware(app, dedup=dedup)
    first, retry = Recorder(), Recorder()
    running = asyncio.create_task(middleware(keyed_scope(b"s3"), first.receive, first.send))
    await first.got_first_chunk.wait()
    await middleware.cancel_primaries()
    with pytest.raises(asyncio.CancelledError):
        await running  # its request ends too: the response was cut
    app.release.set()
    await middleware(keyed_scope(b"s3"), retry.receive, retry.send)
    assert retry.status == 200 and retry.body == b"abc" and app.runs == 2
    assert b"idempotent-replayed" not in retry.headers
