"""`IdempotencyMiddleware`: pure ASGI, per the IETF draft "The Idempotency-Key HTTP Header Field".

``app.add_middleware(IdempotencyMiddleware, dedup=dedup)`` (Starlette, FastAPI) or
``IdempotencyMiddleware(app, dedup=dedup)`` for any ASGI app. Options: `HttpConfig`.

- Requests carrying ``Idempotency-Key`` on POST and PATCH (``methods=``) run once across every
  replica sharing the deduplicator's Redis; other methods pass through. ``require_key=True``
  answers a keyed method without a key with 400; two keys, or a list, are a 400 too.
- **Clients are isolated**: a key is scoped by the caller's identity, a keyed digest (HMAC with
  ``identity_secret``) of its credential headers (``identity_headers``: Authorization and
  X-Api-Key by default; add Cookie for cookie sessions) or of the name an ``identity=`` callable
  returns. Requests without credentials share one anonymous scope. A tenant (``scope_header=`` or
  ``scope=``) combines with it. ``share_keys_across_identities=True`` drops the identity (and
  logs a warning). Credentials are never stored, logged or shown: only their digest.
- The fingerprint covers method, path, query string, ``Content-Type``, body and
  ``fingerprint_headers``: the same key with another request is 422.
- The primary's own client gets the application's response as the application sends it, whole,
  whatever happens to the store meanwhile. A concurrent duplicate waits for the primary and gets
  its response (``on_duplicate="wait"``), or 409 with ``Retry-After`` from the lease's remaining
  time (``"reject"``). A duplicate's response carries ``Idempotent-Replayed: true`` and no
  hop-by-hop, ``Date`` or (unless ``replay_set_cookie=True``) ``Set-Cookie`` headers.
- ``retain(status)`` says which responses are stored for later retries (default: 2xx and 4xx
  except 409 and 429). Others (5xx, ...) go to the duplicates waiting at that moment, when they
  fit in a wake-up message (``inline_result_bytes``); a later retry runs again. A body larger than
  ``max_stored_body`` is not stored either: its waiting duplicates get 409 ``not-retained``.
- A streamed response (``text/event-stream``, or a body without ``Content-Length``) is also
  followed live by the duplicates; one with a ``Content-Length`` is stored as a plain result.
- The request body is bounded: a ``Content-Length`` over ``max_request_body`` is refused before
  the body is read, a chunked body as soon as it passes the limit (413).
- The handler runs in its own task: a client that disconnects does not abort it, its result is
  stored for the retry, and its lease is renewed however long it takes. `cancel_primaries` (used
  by the gateway on shutdown) cancels what still runs, which releases those keys.
- Errors are ``application/problem+json`` with a stable ``type`` under
  ``https://strands-dedup.dev/problems/``: ``key-missing``, ``key-invalid`` and ``bad-length``
  (400), ``body-too-large`` (413), ``key-reused`` (422), ``in-progress`` and ``wait-timeout``
  (409, with Retry-After), ``not-retained`` (409), ``primary-failed`` (502, naming the failure's
  class only), ``store-unavailable`` (503, with Redis' refusal when it refused; where Redis is
  goes to the log only).
- ``max_stored_body`` above what the deduplicator's ``max_result_bytes`` can hold (the body in
  base64, in JSON, with its headers) is a `ValueError` naming the ceiling; left at its default,
  it is lowered to the ceiling. A warning is logged at start when no ``identity_secret`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel

from .._engine.deduplicator import Deduplicator
from .._engine.observe import ROLE_STATE
from .._engine.streaming import Chunk, Emit, StreamReset
from .._errors import DedupError, NotStored, StoreUnavailable
from .._keys import TokenKeys
from .._protocol import LeaveClaimed, Outcome, Role, ShareOnly
from ._asgi import ASGIApp, Message, Receive, Scope, Send, read_body, reject, send_response
from ._budget import KEY_COST, Budgets, stored_size
from ._policy import (
    ANONYMOUS,
    HttpConfig,
    Rejected,
    StreamBroken,
    combine_scope,
    identity_of,
    named_identity,
    parse_key,
    problem_for,
    replay_headers,
    storable_body,
    stored_size_bound,
)

__all__ = ["KEYED", "IdempotencyMiddleware", "StoredResponse"]

log = logging.getLogger("strands_dedup.http")
_OWN = object()  # marks the chunks the primary's own client already has
KEYED = "strands_dedup.keyed"
"""Key of the ASGI scope the application sees: true when the request is a keyed primary."""


class StoredResponse(BaseModel):
    """A response as stored and replayed (JSON: headers as latin-1 text, body as base64)."""

    status: int
    headers: list[tuple[str, str]]
    body: str

    @classmethod
    def capture(
        cls, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes
    ) -> StoredResponse:
        return cls.model_construct(  # the fields are built right here: nothing to validate
            status=status,
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers],
            body=base64.b64encode(body).decode("ascii"),
        )

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in self.headers]

    def raw_body(self) -> bytes:
        return base64.b64decode(self.body)


def is_streamed(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """A response duplicates should follow live: server-sent events, or no Content-Length."""
    names = {n.lower(): v for n, v in headers}
    kind = names.get(b"content-type", b"").split(b";")[0].strip().lower()
    return kind == b"text/event-stream" or b"content-length" not in names


class _Client:
    """The primary's own client: the application's messages go straight to it, as they come.

    A client that has gone away swallows the rest; the application goes on regardless.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.gone = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        if self.gone:
            return
        try:
            await self._send(message)
        except Exception:  # the connection is gone: the response is still stored for retries
            self.gone = True


class _Follower:
    """Sends a followed stream to one client: the head chunk, then body chunks as they come,
    and ends it only if what it sent is the start of the stored body."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.sent = 0  # body bytes sent
        self._digest = hashlib.sha256()  # of the body bytes sent
        self._head_seen = False

    async def chunk(self, chunk: Chunk) -> None:
        if not self._head_seen:
            self._head_seen = True
            if self.started:
                return  # a new attempt's head after a reset: the client has the first one
            head = json.loads(chunk.data)
            headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in head["headers"]]
            headers.append((b"idempotent-replayed", b"true"))
            await self._send(
                {"type": "http.response.start", "status": int(head["status"]), "headers": headers}
            )
            self.started = True
            return
        self.sent += len(chunk.data)
        self._digest.update(chunk.data)
        await self._send({"type": "http.response.body", "body": chunk.data, "more_body": True})

    def reset(self) -> None:
        if self.started:
            # Part of a dead attempt's body went out: the response cannot be taken back.
            raise StreamBroken("the stream's primary died; retry the request")
        self._head_seen = False

    async def finish(self, body: bytes) -> None:
        """End with the part of the stored body the stream did not bring; `StreamBroken` (the
        connection is aborted, never ended cleanly) when what was sent is not its start."""
        if self.sent > len(body) or hashlib.sha256(body[: self.sent]).digest() != (
            self._digest.digest()
        ):
            raise StreamBroken(
                f"the {self.sent} body bytes relayed are not the start of the stored body "
                f"({len(body)} bytes)"
            )
        rest = body[self.sent :]
        await self._send({"type": "http.response.body", "body": rest, "more_body": False})


def _storable(config: HttpConfig, dedup: Deduplicator) -> HttpConfig:
    """``config`` with a ``max_stored_body`` the store can hold: a default above it is lowered
    to it, a value given above it is a `ValueError` naming it."""
    ceiling = storable_body(dedup.config.max_result_bytes)
    if config.max_stored_body <= ceiling:
        return config
    if "max_stored_body" in config.model_fields_set:
        raise ValueError(
            f"max_stored_body {config.max_stored_body} is more than the store can hold: at most "
            f"{ceiling} bytes (a body is stored as base64 in JSON, with its headers, under the "
            f"deduplicator's max_result_bytes {dedup.config.max_result_bytes})"
        )
    return config.model_copy(update={"max_stored_body": ceiling})


class _Throttled:
    """A logger's warnings, at most one a ``period``; those left out are counted in the next."""

    def __init__(self, logger: logging.Logger, period: float = 1.0) -> None:
        self._log = logger
        self._period = period
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        self._next = now + self._period
        if self._left_out:
            message += f" ({self._left_out} more left out)"
            self._left_out = 0
        self._log.warning(message, *args)


class IdempotencyMiddleware:
    """Deduplicate keyed requests across replicas (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        dedup: Deduplicator,
        config: HttpConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("give config= or keyword options, not both")
        self.app = app
        self.dedup = dedup
        self.config = _storable(config if config is not None else HttpConfig(**options), dedup)
        cfg = self.config
        self._methods = frozenset(cfg.methods)
        self._header = cfg.header_name
        self._tenant_header = cfg.scope_header.lower().encode() if cfg.scope_header else None
        self._identity_names = cfg.identity_header_names  # read once: used on every request
        self._secret = cfg.secret
        self._fingerprint_headers = tuple(h.encode("latin-1") for h in cfg.fingerprint_headers)
        self._on_duplicate: Literal["wait", "raise"] = (
            "raise" if cfg.on_duplicate == "reject" else "wait"
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._budgets = Budgets(dedup, cfg) if cfg.max_new_keys or cfg.max_stored_bytes else None
        if cfg.share_keys_across_identities:
            log.warning(
                "share_keys_across_identities is on: any client that sends another's "
                "Idempotency-Key gets that client's response"
            )
        elif cfg.identity_secret is None:
            log.warning(
                "no identity secret is configured: callers' credentials are digested with a "
                "public key, so whoever reads Redis (or the CLI's output) can test guesses of "
                "short credentials against the scopes; set identity_secret (the gateway: "
                "--identity-secret-file or STRANDS_DEDUP_IDENTITY_SECRET)"
            )
        self._store_log = _Throttled(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", [])
        values = [v for n, v in headers if n.lower() == self._header]
        if not values and not self.config.require_key:
            await self.app(scope, receive, send)
            return
        try:
            if not values:
                raise Rejected(
                    400,
                    "key-missing",
                    "Idempotency-Key missing",
                    f"{scope['method']} requests need an Idempotency-Key header",
                )
            key = parse_key(values, self.config.max_key_length)
            body = await read_body(
                receive, headers, self.config.max_request_body, self.config.body_timeout
            )
        except Rejected as rejected:
            if rejected.status == 408:
                self.dedup.count_refusal("body-timeout")
            await reject(send, rejected)
            return
        if body is None:
            return  # the client left before sending its body
        await self._deduplicated(scope, send, key, self.scope_of(scope), body)

    def _identity(self, scope: Scope) -> str:
        """The caller's identity alone: whose budget a request spends (even when keys are
        shared across identities)."""
        cfg = self.config
        if cfg.identity is not None:
            named = cfg.identity(scope)
            return named_identity(named, self._secret) if named else ANONYMOUS
        return identity_of(scope.get("headers", []), self._identity_names, self._secret)

    def scope_of(self, scope: Scope) -> bytes | None:
        """The token scope of a request: its tenant and its caller's identity digest."""
        cfg = self.config
        tenant: str | bytes | None = None
        if cfg.scope is not None:
            tenant = cfg.scope(scope)
        elif self._tenant_header is not None:
            tenant = next(
                (v for n, v in scope.get("headers", []) if n.lower() == self._tenant_header), None
            )
        identity: str | None = None
        if not cfg.share_keys_across_identities:
            if cfg.identity is not None:
                named = cfg.identity(scope)
                identity = named_identity(named, self._secret) if named else ANONYMOUS
            else:
                identity = identity_of(scope.get("headers", []), self._identity_names, self._secret)
        return combine_scope(tenant, identity)

    def _fingerprint(self, scope: Scope, body: bytes) -> str:
        parts = [
            scope["method"].encode(),
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
        ]
        headers = scope.get("headers", [])
        if self._fingerprint_headers:
            parts += (
                b",".join(v for n, v in headers if n.lower() == name)
                for name in self._fingerprint_headers
            )
        # The body's media type: the same bytes as JSON and as a form are two requests (a request
        # without one keeps the digest of releases that did not fingerprint it).
        content_type = [v for n, v in headers if n.lower() == b"content-type"]
        if content_type:
            parts.append(b",".join(content_type))
        parts.append(body)
        framed: list[bytes] = []
        for part in parts:  # each part prefixed by its length: one digest over all of them
            framed += (len(part).to_bytes(8, "big"), part)
        return hashlib.sha256(b"".join(framed)).hexdigest()

    async def _deduplicated(
        self, scope: Scope, send: Send, key: bytes, tenant: bytes | None, body: bytes
    ) -> None:
        own = _Client(send)
        budgets = self._budgets
        identity = ""
        over: Rejected | None = None  # over budget: only a stored or running key is answered

        async def produce(emit: Emit) -> StoredResponse:
            if over is not None:  # the key ended meanwhile: a new key is refused
                self.dedup.count_refusal(over.kind)
                refused = StoredResponse.capture(over.status, over.headers, b"")
                await reject(own, over)
                raise ShareOnly(over.detail, refused.model_dump_json().encode())
            if budgets is not None:
                budgets.spend(identity)
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            stored = 0
            try:
                response = await self._run_app(scope, body, emit, own)
                stored = stored_size(
                    len(response.body) + sum(len(n) + len(v) + 8 for n, v in response.headers)
                )
                return response
            finally:
                if task is not None:
                    self._tasks.discard(task)
                if budgets is not None:
                    budgets.charge(identity, KEY_COST + stored)

        follower: _Follower | None = None  # made at the first chunk of a stream it follows
        outcome: Outcome[StoredResponse] | None = None
        keys: TokenKeys | None = None
        try:
            keys = self.dedup.token_keys(key, tenant)
            if budgets is not None:
                identity = self._identity(scope)
                refusal = await budgets.admit(identity)
                if refusal is not None:
                    # Not a new key if it has a stored response (a replay) or runs now (a
                    # duplicate): those are served; only a new key is refused.
                    over = refusal.rejected(budgets.window)
                    if not await self.dedup.in_use(keys):
                        self.dedup.count_refusal(over.kind)
                        await reject(send, over)
                        return
            async for event in self.dedup.stream_events(
                keys,
                produce,
                rtype=StoredResponse,
                fingerprint=self._fingerprint(scope, body),
                wait_timeout=None,
                on_duplicate=self._on_duplicate,
                best_effort=True,
            ):
                if isinstance(event, Chunk):
                    if event.original is not _OWN:
                        if follower is None:
                            follower = _Follower(send)
                        await follower.chunk(event)
                elif isinstance(event, StreamReset):
                    if follower is not None:
                        follower.reset()
                else:
                    outcome = event.outcome
        except Exception as exc:
            if own.started:
                self._after_own(exc, own, keys)
            elif follower is None or not follower.started:
                await self._send_error(send, exc)
            else:
                raise  # part of a body went out: abort the connection; the client retries
            return
        if outcome is None:  # pragma: no cover - the stream always ends with its value
            raise RuntimeError("the stream ended without a value")
        scope.setdefault("state", {})[ROLE_STATE] = outcome.role.value  # for request metrics
        if own.started:
            if not own.finished:
                await own({"type": "http.response.body", "body": b"", "more_body": False})
            return
        response = outcome.value
        if follower is not None and follower.started:
            await follower.finish(response.raw_body())
            return
        headers = replay_headers(response.raw_headers(), self.config.replay_set_cookie)
        if outcome.role not in (Role.PRIMARY, Role.TAKEOVER):
            headers.append((b"idempotent-replayed", b"true"))
        await send_response(send, response.status, headers, response.raw_body())

    @staticmethod
    def _after_own(exc: Exception, own: _Client, keys: TokenKeys | None) -> None:
        """The primary's response already went to its client: what is left is the store's part."""
        if not own.finished:
            raise exc  # the application failed part-way: abort; the client retries
        if isinstance(exc, ShareOnly | LeaveClaimed):
            return
        label = "?" if keys is None else f"{keys.token} (scope {keys.scope})"
        log.warning("the response to key %s was sent but not stored: %r", label, exc)

    async def _send_error(self, send: Send, exc: Exception) -> None:
        """Answer a keyed request whose call raised ``exc`` (`problem_for`), or re-raise it."""
        if isinstance(exc, NotStored) and exc.shared:  # the response, handed over unstored
            response = StoredResponse.model_validate_json(exc.shared)
            headers = replay_headers(response.raw_headers(), self.config.replay_set_cookie)
            headers.append((b"idempotent-replayed", b"true"))
            await send_response(send, response.status, headers, response.raw_body())
            return
        answer = problem_for(exc, self.config.max_retry_after)
        if answer is None:
            raise exc
        if isinstance(exc, StoreUnavailable):
            self._store_log.warning("answered 503 store-unavailable: %s", exc)
        await reject(send, answer)

    async def _run_app(self, scope: Scope, body: bytes, emit: Emit, own: _Client) -> StoredResponse:
        """Run the app on the buffered request; its response goes straight to its client.

        What fits in ``max_stored_body`` is kept to be stored. A streamed response is also
        emitted as it comes, head first, so that duplicates can follow it live (best effort:
        the primary's client never waits for, nor depends on, the store).
        """
        cfg = self.config
        delivered = False
        never: asyncio.Future[None] | None = None  # made if the app asks for a second message

        async def receive() -> Message:
            nonlocal delivered, never
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            if never is None:
                never = asyncio.get_running_loop().create_future()
            await never  # the request task owns the real client; this call outlives it
            return {"type": "http.disconnect"}  # pragma: no cover

        status = 500
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        following = False

        def tell_followers(data: bytes) -> None:
            nonlocal following
            try:
                emit(data, _OWN)
            except DedupError:
                following = False  # the followers get the stored value (or a problem)

        async def capture(message: Message) -> None:
            nonlocal status, headers, size, following
            if message["type"] == "http.response.start":
                status = int(message["status"])
                raw = list(message.get("headers", []))
                headers = replay_headers(raw, cfg.replay_set_cookie)
                await own(message)
                following = is_streamed(raw)
                if following:
                    head = {
                        "status": status,
                        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                    }
                    tell_followers(json.dumps(head).encode())
            elif message["type"] == "http.response.body":
                await own(message)
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= cfg.max_stored_body:
                    chunks.append(chunk)
                elif chunks:
                    chunks.clear()  # too large to retain: keep nothing
                if following and chunk:
                    tell_followers(chunk)

        try:
            await self.app({**scope, KEYED: True}, receive, capture)
        finally:
            if never is not None:
                never.cancel()
        if size > cfg.max_stored_body:
            raise ShareOnly("the response body exceeded max_stored_body")
        if stored_size_bound(size, headers) > self.dedup.config.max_result_bytes:
            raise ShareOnly("the response (its headers) exceeded what the store holds")
        response = StoredResponse.capture(status, headers, b"".join(chunks))
        if not cfg.retain(status):
            shared = response.model_dump_json().encode()
            if len(shared) > self.dedup.config.inline_result_bytes:
                shared = b""  # too large to hand over in the wake-up message: a 409 instead
            raise ShareOnly(f"status {status} is not retained", shared)
        return response

    async def cancel_primaries(self, timeout: float = 10.0) -> None:
        """Cancel the calls still running (their keys are released; waiters elsewhere take over)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
