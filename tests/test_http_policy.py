"""The HTTP rules, observed on the surfaces: request targets as the upstream receives them from
the gateway, keys and identities as the middleware's calls are named, headers as relayed and
replayed, Retry-After as answered; fuzzed.

The upstream is a few lines of asyncio that answer each request with its request line's target
and its Host header; everything runs in one event loop (`asyncio.Runner`), over ASGI.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_http_lifecycle import answer

from strands_dedup import CallContext, Deduplicator, DuplicateInFlight, current_call
from strands_dedup.http import Gateway, GatewayConfig, HttpConfig, IdempotencyMiddleware

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
BASES = ("", "/api", "/a/b")
SCOPED = settings(deadline=None)

PIECES = st.sampled_from(
    ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", ";", "..;", "@", ":", "?",
     "%", "%25", "%00", "a", "b", "~", "http://x", "*", "%252e", "\x00", "é"]
)  # fmt: skip
TARGETS = st.one_of(
    st.lists(PIECES, max_size=12).map(lambda parts: "".join(parts).encode("utf-8")),
    st.binary(max_size=64),
)


def resolves_under(path: str, base: str) -> bool:
    """Decode once and remove dot-segments, as an upstream would: still under ``base``?"""
    stack: list[bytes] = []
    for segment in unquote_to_bytes(path).split(b"/")[1:]:
        if segment in (b"..",):
            if not stack:
                return False
            stack.pop()
        elif segment != b".":
            stack.append(segment)
    base_parts = [p.encode() for p in base.split("/")[1:]] if base else []
    return stack[: len(base_parts)] == base_parts and b"\\" not in b"/".join(stack)


UPSTREAM_HEADERS = [
    (b"Content-Type", b"text/plain"),
    (b"Content-Length", b"5"),
    (b"Date", b"Mon, 01 Jan 2001 00:00:00 GMT"),
    (b"Set-Cookie", b"sid=1"),
    (b"Connection", b"keep-alive, X-Private"),
    (b"X-Private", b"no"),
    (b"Keep-Alive", b"timeout=5"),
]


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers ``.../headers`` with `UPSTREAM_HEADERS` and ``hello``, ``.../chunked`` with a
    chunked ``hello`` that also declares a Content-Length, and anything else with JSON naming
    the request line's target and the Host header."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            target = lines[0].split(b" ")[1]
            fields = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(b":") for line in lines[1:] if line)
            }
            await reader.readexactly(int(fields.get(b"content-length", b"0")))
            path = target.split(b"?", 1)[0]
            if path.endswith(b"/headers"):
                named = b"".join(n + b": " + v + b"\r\n" for n, v in UPSTREAM_HEADERS)
                writer.write(b"HTTP/1.1 200 OK\r\n" + named + b"\r\nhello")
            elif path.endswith(b"/chunked"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n"
                )
            else:
                seen = {"target": target.decode("latin-1"), "host": fields[b"host"].decode()}
                body = json.dumps(seen).encode()
                length = str(len(body)).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the gateway closed its connection
    finally:
        writer.close()  # also when the loop's end cancels this handler


@dataclass
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    call: CallContext | None = None
    """The deduplicated call the application ran in (None: it ran outside one, or not)."""

    def json(self) -> Any:
        return json.loads(self.body)

    def kind(self) -> str:
        """The problem's kind (the last part of its type)."""
        return str(self.json()["type"]).rsplit("/", 1)[1]


async def request(
    app: Any,
    raw_path: bytes,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> Reply:
    """One POST into an ASGI app, its target as given (no client library re-encodes it)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": query,
        "headers": list(headers),
        "client": ("127.0.0.1", 50000),
        "server": ("gateway", 80),
    }
    asked = False

    async def receive() -> dict[str, Any]:
        nonlocal asked
        if not asked:
            asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Future()  # the client stays connected
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return Reply(start["status"], list(start["headers"]), body)


@dataclass
class Surfaces:
    """Gateways (one per base path) in front of `upstream`, and middlewares around an
    application that notes the call it runs in, on one deduplicator, in one event loop."""

    runner: asyncio.Runner
    port: int
    dedup: Deduplicator
    gateways: dict[str, Gateway] = field(default_factory=dict)
    calls: list[CallContext | None] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)

    def run(self, step: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await asyncio.wait_for(step, 10)

        return self.runner.run(wrapped())

    def forward(self, raw: bytes, query: bytes = b"", base: str = "/api") -> Reply:
        """A POST through the gateway whose upstream has base path ``base``."""
        return self.run(request(self.gateways[base], raw, query))

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(current_call())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ran"})

    def keyed(self, headers: list[tuple[bytes, bytes]], **options: Any) -> Reply:
        """A POST through a middleware with ``options``; ``call`` is the call the app ran in."""
        options.setdefault("identity_secret", "a secret of this test")
        middleware = IdempotencyMiddleware(self.app, dedup=self.dedup, **options)
        self.calls.clear()
        reply = self.run(request(middleware, b"/", b"", headers))
        assert len(self.calls) <= 1
        reply.call = self.calls[0] if self.calls else None
        return reply

    def caller(self) -> tuple[bytes, bytes]:
        """Credentials of a caller of its own (a fresh scope: no key of another example)."""
        return (b"authorization", f"Bearer caller-{next(self.counter)}".encode())


@pytest.fixture(scope="module")
def surfaces() -> Iterator[Surfaces]:
    with asyncio.Runner() as runner:

        async def start() -> tuple[asyncio.Server, Surfaces]:
            server = await asyncio.start_server(upstream, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            dedup = Deduplicator.from_url("memory://http-policy", metrics=False)
            found = Surfaces(runner, port, dedup)
            for base in BASES:
                found.gateways[base] = Gateway(f"http://127.0.0.1:{port}{base}", dedup=dedup)
            return server, found

        server, found = runner.run(start())
        try:
            yield found
        finally:

            async def stop() -> None:
                for gateway in found.gateways.values():
                    await gateway.stop()
                await found.dedup.aclose()
                server.close()
                await server.wait_closed()

            runner.run(stop())


# -- request targets ---------------------------------------------------------------------------


@settings(SCOPED, max_examples=2000)
@given(raw=TARGETS, query=st.binary(max_size=16), base=st.sampled_from(BASES))
def test_a_target_stays_under_the_base_or_is_refused(
    surfaces: Surfaces, raw: bytes, query: bytes, base: str
) -> None:
    reply = surfaces.forward(raw, query, base)
    if reply.status == 400:
        assert reply.kind() == "bad-target"
        return
    assert reply.status == 200, reply
    seen = reply.json()
    target = seen["target"]
    assert raw.startswith(b"/") and not raw.startswith(b"//")
    target.encode("ascii")  # always plain ASCII: nothing for a client library to re-interpret
    path = target.split("?", 1)[0]
    assert path.startswith(base + "/")
    assert resolves_under(path, base)
    # It reached the configured origin, and the URL built from it keeps that origin.
    origin = f"127.0.0.1:{surfaces.port}"
    assert seen["host"] == origin
    url = urlsplit(f"http://{origin}" + target)
    assert (url.scheme, url.hostname, url.port, url.username) == (
        "http",
        "127.0.0.1",
        surfaces.port,
        None,
    )
    # Normalizing again changes nothing: no dot-segment survives the first pass.
    again = surfaces.forward(path[len(base) :].encode(), b"", base)
    assert again.status == 200 and again.json()["target"] == path


def test_targets_by_example(surfaces: Surfaces) -> None:
    def target(raw: bytes, query: bytes, base: str = "/api") -> str:
        reply = surfaces.forward(raw, query, base)
        assert reply.status == 200, reply
        return str(reply.json()["target"])

    assert target(b"/x/../y", b"q=1") == "/api/y?q=1"
    assert target(b"/x/%2e%2e/y/.", b"", "") == "/y/"
    assert target(b"/a%20b/%25", b"a b#c") == "/api/a%20b/%25?a%20b%23c"
    for bad in [b"*", b"http://evil/", b"//evil/x", b"/..", b"/%2e%2e/x", b"/..;/x", b"/a\\b"]:
        refused = surfaces.forward(bad, b"", "/api")
        assert (refused.status, refused.kind()) == (400, "bad-target"), bad


@pytest.mark.parametrize(
    "url",
    ["ftp://svc", "http://", "http://u:p@svc", "http://svc/?q=1", "http://svc/#f", "svc:80",
     "http://svc/a/../b", "http://svc:99999"],
)  # fmt: skip
def test_an_unsafe_upstream_is_refused(surfaces: Surfaces, url: str) -> None:
    with pytest.raises(ValueError):
        GatewayConfig(upstream=url)
    with pytest.raises(ValueError):
        Gateway(url, dedup=surfaces.dedup)


def test_an_upstream_is_split_into_fixed_parts(surfaces: Surfaces) -> None:
    """The base path loses its trailing slash; an IPv6 literal host is reached in brackets."""

    async def through(upstream_url: str, raw: bytes) -> Reply:
        gateway = Gateway(upstream_url, dedup=surfaces.dedup)
        try:
            return await request(gateway, raw)
        finally:
            await gateway.stop()

    port = surfaces.port
    seen = surfaces.run(through(f"http://127.0.0.1:{port}/api/", b"/x")).json()
    assert seen == {"target": "/api/x", "host": f"127.0.0.1:{port}"}

    async def on_ipv6() -> Reply:
        server = await asyncio.start_server(upstream, "::1", 0)
        try:
            v6 = server.sockets[0].getsockname()[1]
            reply = await through(f"http://[::1]:{v6}", b"/y")
            assert reply.json() == {"target": "/y", "host": f"[::1]:{v6}"}
            return reply
        finally:
            server.close()
            await server.wait_closed()

    assert surfaces.run(on_ipv6()).status == 200


# -- keys and identities -----------------------------------------------------------------------

CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def readings(value: bytes) -> list[bytes]:
    """What a header value may stand for: itself, or (quoted) the string inside the quotes."""
    value = value.strip(b" \t")
    found = [value]
    if len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
        found.append(re.sub(rb"\\(.)", rb"\1", value[1:-1], flags=re.DOTALL))
    return found


@settings(SCOPED, max_examples=1000)
@given(values=st.lists(st.binary(max_size=40), max_size=3))
def test_a_key_is_one_value_or_refused(surfaces: Surfaces, values: list[bytes]) -> None:
    headers = [surfaces.caller(), *((b"idempotency-key", value) for value in values)]
    reply = surfaces.keyed(headers, max_key_length=30, require_key=True)
    if reply.status == 400:
        assert reply.kind() == ("key-invalid" if values else "key-missing")
        assert reply.call is None
        return
    assert reply.status == 200 and reply.call is not None
    assert len(values) == 1
    call = reply.call
    [key] = [
        key
        for key in readings(values[0])
        if key and surfaces.dedup.token_keys(key, call.scope).identity == call.identity
    ]
    assert 1 <= len(key) <= 30
    assert CONTROL.search(key) is None


def test_keys_by_example(surfaces: Surfaces) -> None:
    def key_of(*values: bytes) -> bytes | None:
        """The key the call was named by (None: refused with key-invalid)."""
        headers = [surfaces.caller(), *((b"idempotency-key", value) for value in values)]
        reply = surfaces.keyed(headers, max_key_length=10, require_key=True)
        if reply.status == 400:
            assert reply.kind() == ("key-invalid" if values else "key-missing")
            return None
        assert reply.call is not None
        for key in (b"abc", b'a"b'):
            if surfaces.dedup.token_keys(key, reply.call.scope).identity == reply.call.identity:
                return key
        raise AssertionError(f"{values!r} named the call {reply.call.identity!r}")

    assert key_of(b"abc") == key_of(b'"abc"') == b"abc"
    assert key_of(b'"a\\"b"') == b'a"b'
    for bad in ([b"a", b"b"], [b"a, b"], [b'"a", "b"'], [b'"a'], [b""], [b"x" * 11], []):
        assert key_of(*bad) is None, bad


def test_an_identity_is_a_keyed_digest_of_the_credentials(surfaces: Surfaces) -> None:
    def scope(secret: str, *credentials: tuple[bytes, bytes]) -> str:
        key = (b"idempotency-key", f"identity-{next(surfaces.counter)}".encode())
        reply = surfaces.keyed([*credentials, key], identity_secret=secret)
        assert reply.status == 200 and reply.call is not None
        return reply.call.scope

    alice = (b"Authorization", b"Bearer alice")
    one = scope("k1", alice)
    assert one.startswith("id-") and "alice" not in one
    assert one == scope("k1", (b"authorization", b"Bearer alice"))
    assert one != scope("k2", alice)  # the secret keys the digest
    assert one != scope("k1", (b"Authorization", b"Bearer bob"))
    assert one != scope("k1", (b"X-Api-Key", b"Bearer alice"))
    assert scope("k1", (b"Cookie", b"sid=1")) == scope("k1") == "anon"


def test_configuration_refuses_a_credential_as_tenant_and_unknown_options() -> None:
    with pytest.raises(ValueError, match="credential header"):
        HttpConfig(scope_header="X-Api-Key")
    with pytest.raises(ValueError):
        HttpConfig(max_request_body=0)
    with pytest.raises(ValueError):
        HttpConfig(no_such_option=1)  # type: ignore[call-arg]
    assert HttpConfig(methods=("post",)).methods == ("POST",)


# -- headers and Retry-After -------------------------------------------------------------------


def test_stored_and_relayed_headers(surfaces: Surfaces) -> None:
    async def twice(options: dict[str, Any], raw: bytes) -> tuple[Reply, Reply]:
        """The primary's response through a keyed gateway, then a retry's replay."""
        port = surfaces.port
        gateway = Gateway(f"http://127.0.0.1:{port}", dedup=surfaces.dedup, **options)
        key = (b"idempotency-key", f"headers-{next(surfaces.counter)}".encode())
        try:
            return await request(gateway, raw, b"", [key]), await request(gateway, raw, b"", [key])
        finally:
            await gateway.stop()

    relayed, replayed = surfaces.run(twice({}, b"/headers"))
    assert relayed.body == replayed.body == b"hello"
    assert (b"Content-Length", b"5") in relayed.headers
    assert (b"Set-Cookie", b"sid=1") in relayed.headers
    assert not [
        n for n, _ in relayed.headers if n.lower() in (b"date", b"x-private", b"keep-alive")
    ]
    assert replayed.headers == [
        (b"Content-Type", b"text/plain"),
        (b"idempotent-replayed", b"true"),
        (b"content-length", b"5"),  # the replay's own
    ]
    _, with_cookie = surfaces.run(twice({"replay_set_cookie": True}, b"/headers"))
    assert (b"Set-Cookie", b"sid=1") in with_cookie.headers
    chunked, _ = surfaces.run(twice({}, b"/chunked"))
    assert chunked.body == b"hello"
    assert chunked.headers == []


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.2, "1"), (12.1, "13"), (1e9, "30"), (float("inf"), "30")],
)
def test_retry_after_is_whole_seconds_within_bounds(
    surfaces: Surfaces, seconds: float, header: str
) -> None:
    busy = DuplicateInFlight("x", token="t", owner="o", fence=1, retry_after=seconds)
    response = surfaces.run(answer(busy, max_retry_after=30))
    assert response.status_code == 409
    assert response.headers["retry-after"] == header
