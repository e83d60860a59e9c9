"""`IdempotencyMiddleware`: pure ASGI, per the IETF draft "The Idempotency-Key HTTP Header Field".

``app.add_middleware(IdempotencyMiddleware, dedup=dedup)`` (Starlette, FastAPI) or
``IdempotencyMiddleware(app, dedup=dedup)`` for any ASGI app.

- Requests carrying ``Idempotency-Key`` on POST and PATCH (``methods=``) run once across every
  replica sharing the deduplicator's Redis; other methods pass through. ``require_key=True``
  answers a keyed method without a key with 400.
- The fingerprint covers method, path, query string, body and ``fingerprint_headers``: the same
  key with another request is 422.
- A concurrent duplicate waits for the primary and gets its response (``on_duplicate="wait"``),
  or 409 with ``Retry-After`` (``"reject"``). A duplicate's response carries
  ``Idempotent-Replayed: true``. Hop-by-hop headers are neither stored nor replayed.
- ``retain(status)`` says which responses are stored for later retries (default: 2xx and 4xx
  except 409 and 429). Others (5xx, ...) go to the duplicates waiting at that moment, when they
  fit in a shared failure (about 1 KiB of body); a later retry runs again.
- A response body larger than ``max_stored_body`` reaches the primary's client but is not stored;
  its waiting duplicates get 409 ``not-retained`` and a later retry runs again.
- ``scope_header=`` or ``scope=`` (a callable of the ASGI scope) names the tenant: one tenant's key
  never replays another's response.
- The handler runs in its own task: a client that disconnects does not abort it, its result is
  stored for the retry, and its lease is renewed however long it takes. `cancel_primaries` (used
  by the gateway on shutdown) cancels what still runs, which releases those keys.
- Errors are ``application/problem+json`` with a stable ``type`` under
  ``https://strands-dedup.dev/problems/``: ``key-missing`` and ``key-invalid`` (400),
  ``body-too-large`` (413), ``key-reused`` (422), ``in-progress`` and ``wait-timeout`` (409, with
  Retry-After), ``not-retained`` (409), ``primary-failed`` (502), ``store-unavailable`` (503).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Literal

from pydantic import BaseModel

from .core import Deduplicator
from .errors import (
    DuplicateInFlight,
    FingerprintMismatch,
    InvalidToken,
    LeaseLost,
    PrimaryFailed,
    StoreUnavailable,
    WaitTimeout,
)
from .observe import ROLE_STATE
from .protocol import Outcome
from .streaming import Chunk, Emit, StreamReset, stream_events

__all__ = ["IdempotencyMiddleware", "StoredResponse", "default_retain", "problem"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBLEM_BASE = "https://strands-dedup.dev/problems/"
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
_SHARE_LIMIT = 1800  # characters of a not-retained response shared through a failure message


class StoredResponse(BaseModel):
    """A response as stored and replayed (JSON: headers as latin-1 text, body as base64)."""

    status: int
    headers: list[tuple[str, str]]
    body: str

    @classmethod
    def capture(
        cls, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> StoredResponse:
        return cls(
            status=status,
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
            body=base64.b64encode(body).decode("ascii"),
        )

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.headers]

    def raw_body(self) -> bytes:
        return base64.b64decode(self.body)


class _NotRetained(Exception):
    """Raised through the deduplicator so a response is shared with waiters but not stored."""

    def __init__(self, response: StoredResponse | None, reason: str) -> None:
        payload = response.model_dump_json() if response is not None else ""
        shared = payload if len(payload) <= _SHARE_LIMIT else ""
        super().__init__(json.dumps({"reason": reason, "response": shared}))
        self.response = response


def default_retain(status: int) -> bool:
    """2xx and 4xx except 409 (conflict) and 429 (rate limited) are stored for retries."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (409, 429))


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers without the hop-by-hop ones (and those the Connection header names)."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


async def send_response(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def problem(
    send: Send,
    status: int,
    kind: str,
    title: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send an ``application/problem+json`` error with a stable ``type``."""
    payload = {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}
    body = json.dumps(payload).encode()
    await send_response(
        send, status, [(b"content-type", b"application/problem+json"), *(headers or [])], body
    )


def is_streamed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A response duplicates should follow live: server-sent events, or no Content-Length."""
    names = {n.lower(): v for n, v in headers}
    kind = names.get(b"content-type", b"").split(b";")[0].strip().lower()
    return kind == b"text/event-stream" or b"content-length" not in names


class _Streamed:
    """Sends a followed stream to one client: the head chunk, then body chunks as they come."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self._head_seen = False

    async def chunk(self, chunk: Chunk) -> None:
        if not self._head_seen:
            self._head_seen = True
            if self.started:
                return  # a new attempt's head after a reset: the client has the first one
            head = json.loads(chunk.data)
            headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"]]
            if chunk.original is None:  # followed from another caller's stream
                headers.append((b"idempotent-replayed", b"true"))
            await self._send(
                {"type": "http.response.start", "status": int(head["status"]), "headers": headers}
            )
            self.started = True
            return
        await self._send({"type": "http.response.body", "body": chunk.data, "more_body": True})

    def reset(self) -> None:
        if self.started:
            # Part of a dead attempt's body went out: the response cannot be taken back.
            raise _StreamBroken("the stream's primary died; retry the request")
        self._head_seen = False

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})


class _StreamBroken(Exception):
    """A streamed response's attempt died after part of it was sent: end it; the client retries."""


class IdempotencyMiddleware:
    """Deduplicate keyed requests across replicas (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        dedup: Deduplicator,
        methods: Iterable[str] = ("POST", "PATCH"),
        header: str = "Idempotency-Key",
        require_key: bool = False,
        scope_header: str | None = None,
        scope: Callable[[Scope], str | bytes | None] | None = None,
        fingerprint_headers: Iterable[str] = (),
        on_duplicate: str = "wait",
        retain: Callable[[int], bool] = default_retain,
        max_request_body: int = 10 * 1024 * 1024,
        max_stored_body: int = 1024 * 1024,
        max_key_length: int = 255,
    ) -> None:
        if on_duplicate not in ("wait", "reject"):
            raise ValueError(f"on_duplicate must be 'wait' or 'reject', not {on_duplicate!r}")
        if scope_header is not None and scope is not None:
            raise ValueError("give scope_header= or scope=, not both")
        if max_request_body <= 0 or max_stored_body <= 0 or max_key_length <= 0:
            raise ValueError("max_request_body, max_stored_body and max_key_length must be > 0")
        self.app = app
        self.dedup = dedup
        self.methods = frozenset(m.upper() for m in methods)
        self.header = header.lower().encode("latin-1")
        self.require_key = require_key
        self.scope_header = scope_header.lower().encode("latin-1") if scope_header else None
        self.scope = scope
        self.fingerprint_headers = tuple(h.lower().encode("latin-1") for h in fingerprint_headers)
        self.on_duplicate: Literal["wait", "raise"] = (
            "raise" if on_duplicate == "reject" else "wait"
        )
        self.retain = retain
        self.max_request_body = max_request_body
        self.max_stored_body = max_stored_body
        self.max_key_length = max_key_length
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self.methods:
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        key = next((v for n, v in headers if n.lower() == self.header), None)
        if key is None:
            if self.require_key:
                await problem(
                    send,
                    400,
                    "key-missing",
                    "Idempotency-Key missing",
                    f"{scope['method']} requests need an Idempotency-Key header",
                )
                return
            await self.app(scope, receive, send)
            return
        key = key.strip()
        if not key or len(key) > self.max_key_length:
            await problem(
                send,
                400,
                "key-invalid",
                "Invalid Idempotency-Key",
                f"the key must be 1 to {self.max_key_length} bytes long",
            )
            return
        body = await self._read_body(receive)
        if body is None:
            return  # the client left before sending its body
        if len(body) > self.max_request_body:
            await problem(
                send,
                413,
                "body-too-large",
                "Request body too large",
                f"the body exceeds {self.max_request_body} bytes",
            )
            return
        await self._deduplicated(scope, send, key, self._tenant(scope), body)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_request_body:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks) if size <= self.max_request_body else b"\0" * size

    def _tenant(self, scope: Scope) -> str | bytes | None:
        if self.scope is not None:
            return self.scope(scope)
        if self.scope_header is not None:
            return next(
                (v for n, v in scope.get("headers", []) if n.lower() == self.scope_header), None
            )
        return None

    def _fingerprint(self, scope: Scope, body: bytes) -> str:
        digest = hashlib.sha256()
        for part in (
            scope["method"].encode(),
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
            *(
                b",".join(v for n, v in scope.get("headers", []) if n.lower() == name)
                for name in self.fingerprint_headers
            ),
            body,
        ):
            digest.update(len(part).to_bytes(8, "big") + part)
        return digest.hexdigest()

    async def _deduplicated(
        self, scope: Scope, send: Send, key: bytes, tenant: str | bytes | None, body: bytes
    ) -> None:
        produced: dict[str, StoredResponse] = {}

        async def produce(emit: Emit) -> StoredResponse:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                response, complete = await self._run_app(scope, body, emit)
            finally:
                if task is not None:
                    self._tasks.discard(task)
            produced["response"] = response
            if not complete:
                raise _NotRetained(None, "the response body exceeded max_stored_body")
            if not self.retain(response.status):
                raise _NotRetained(response, f"status {response.status} is not retained")
            return response

        streamed = _Streamed(send)
        outcome: Outcome[StoredResponse] | None = None
        try:
            keys = self.dedup._keys.for_token(key, tenant)
            async for event in stream_events(
                self.dedup,
                keys,
                produce,
                rtype=StoredResponse,
                fingerprint=self._fingerprint(scope, body),
                wait_timeout=None,
                on_duplicate=self.on_duplicate,
            ):
                if isinstance(event, Chunk):
                    await streamed.chunk(event)
                elif isinstance(event, StreamReset):
                    streamed.reset()
                else:
                    outcome = event.outcome
        except Exception as exc:
            if not streamed.started:
                await self._send_error(send, exc, produced)
            elif isinstance(exc, (_NotRetained, LeaseLost)):
                await streamed.end()  # the primary's own client has had the whole body
            else:
                raise  # part of a body went out: abort the connection; the client retries
            return
        if outcome is None:  # pragma: no cover - the stream always ends with its value
            raise RuntimeError("the stream ended without a value")
        scope.setdefault("state", {})[ROLE_STATE] = outcome.role.value  # for request metrics
        if streamed.started:
            await streamed.end()
            return
        response = outcome.value
        headers = response.raw_headers()
        if outcome.role.value not in ("primary", "takeover"):
            headers.append((b"idempotent-replayed", b"true"))
        await send_response(send, response.status, headers, response.raw_body())

    async def _send_error(
        self, send: Send, exc: Exception, produced: dict[str, StoredResponse]
    ) -> None:
        if isinstance(exc, _NotRetained):
            await self._send_own(send, produced.get("response"), exc.response)
        elif isinstance(exc, LeaseLost):
            await self._send_own(send, produced.get("response"), None)
        elif isinstance(exc, FingerprintMismatch):
            await problem(
                send,
                422,
                "key-reused",
                "Idempotency-Key reused",
                "this key was used for a different request",
            )
        elif isinstance(exc, DuplicateInFlight):
            retry = str(max(1, math.ceil(exc.retry_after))).encode()
            await problem(
                send,
                409,
                "in-progress",
                "Request in progress",
                "a request with this key is being processed",
                [(b"retry-after", retry)],
            )
        elif isinstance(exc, WaitTimeout):
            await problem(
                send,
                409,
                "wait-timeout",
                "Request still in progress",
                f"gave up waiting after {exc.waited:.0f}s",
                [(b"retry-after", b"1")],
            )
        elif isinstance(exc, PrimaryFailed):
            await self._send_shared_failure(send, exc)
        elif isinstance(exc, StoreUnavailable):
            await problem(
                send,
                503,
                "store-unavailable",
                "Deduplication store unavailable",
                str(exc).split(":")[0],
                [(b"retry-after", b"1")],
            )
        elif isinstance(exc, InvalidToken):
            await problem(send, 400, "key-invalid", "Invalid Idempotency-Key", str(exc))
        else:
            raise exc

    async def _send_own(
        self, send: Send, full: StoredResponse | None, fallback: StoredResponse | None
    ) -> None:
        """The primary's own response, sent to its client although it was not stored."""
        response = full or fallback
        if response is None:
            await problem(
                send, 502, "primary-failed", "No response", "the handler gave no response"
            )
            return
        await send_response(send, response.status, response.raw_headers(), response.raw_body())

    async def _send_shared_failure(self, send: Send, exc: PrimaryFailed) -> None:
        if exc.error_type.endswith("._NotRetained"):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                shared = json.loads(exc.error_message)
                if shared.get("response"):
                    response = StoredResponse.model_validate_json(shared["response"])
                    headers = [*response.raw_headers(), (b"idempotent-replayed", b"true")]
                    await send_response(send, response.status, headers, response.raw_body())
                    return
            await problem(
                send,
                409,
                "not-retained",
                "Response not retained",
                "the first request's response was not retained; retry to run it again",
                [(b"retry-after", b"1")],
            )
            return
        await problem(
            send,
            502,
            "primary-failed",
            "The first request failed",
            f"{exc.error_type}: {exc.error_message}"[:500],
        )

    async def _run_app(self, scope: Scope, body: bytes, emit: Emit) -> tuple[StoredResponse, bool]:
        """Run the app on the buffered request; capture its response (complete if it fits).

        A streamed response (``text/event-stream``, or a body without ``Content-Length``) is also
        emitted as it comes, head first, so that duplicates can follow it live.
        """
        streaming = False
        delivered = False
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never  # the request task owns the real client; this call outlives it
            return {"type": "http.disconnect"}  # pragma: no cover

        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0

        async def capture(message: Message) -> None:
            nonlocal status, headers, size, streaming
            if message["type"] == "http.response.start":
                status = int(message["status"])
                raw = list(message.get("headers", []))
                headers = strip_hop_by_hop(raw)
                streaming = is_streamed(raw)
                if streaming:
                    head = {
                        "status": status,
                        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                    }
                    emit(json.dumps(head).encode(), head)  # the original marks our own
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                size += len(chunk)
                chunks.append(chunk)
                if streaming and chunk:
                    emit(chunk, chunk)

        try:
            await self.app(dict(scope), receive, capture)
        finally:
            never.cancel()
        response = StoredResponse.capture(status, headers, b"".join(chunks))
        return response, size <= self.max_stored_body

    async def cancel_primaries(self, timeout: float = 10.0) -> None:
        """Cancel the calls still running (their keys are released; waiters elsewhere take over)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
