"""Outgoing requests that carry their call's identity: the same effect on every attempt.

Inside a primary call (`current_call()` is set), an unsafe request (POST, PUT, PATCH, DELETE)
without an ``Idempotency-Key`` gets one derived from the call (namespace, scope, token) and the
request (method, URL, body digest), so every attempt of the call (a retry after a failure, a
takeover after a crash, another replica) sends the same key for the same request, and a
different request gets a different key. The call's fence goes along in ``Idempotency-Fence``
for services that refuse a stale writer. Safe methods, and requests outside a call, leave as
they are (``strict=True`` refuses an unkeyed unsafe request outside a call instead)::

    client = httpx.AsyncClient(transport=IdempotentAsyncTransport())
    client = httpx.Client(transport=IdempotentTransport(httpx.HTTPTransport(retries=2)))

A body that is streamed (a generator, a file upload) is read into memory to be digested, up to
``max_body_bytes``; a larger one is refused with `UnkeyedRequest` before anything is sent. A
multipart body is digested without its boundary (httpx draws a new one for every request).

The decisions are `OutgoingRules` (no I/O) and `effect_key`; the two transports only read the
body, each in its own way, and pass the request on.
"""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .._engine.call import CallContext, current_call
from .._errors import UnkeyedRequest

__all__ = [
    "FENCE_HEADER",
    "IdempotentAsyncTransport",
    "IdempotentTransport",
    "OutgoingConfig",
    "OutgoingRules",
    "effect_key",
]

FENCE_HEADER = "Idempotency-Fence"
"""The header that carries the call's fence (a decimal integer that grows with every attempt)."""

_KIND = b"strands-dedup outgoing request v1"
Headers = MutableMapping[str, Any]
"""A request's headers, case-insensitive (``httpx.Headers``, or ``requests``' own)."""


def _shown(url: str) -> str:
    """A URL for an error: no credentials and no query (either may hold secrets)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _boundary(content_type: str | None) -> bytes | None:
    """The boundary of a multipart content type, or None."""
    if content_type is None or not content_type.strip().lower().startswith("multipart/"):
        return None
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


def effect_key(
    identity: bytes, method: str, url: str, body: bytes, content_type: str | None = None
) -> str:
    """The idempotency key of one outgoing request of a call: ``sd1-`` and 64 hex digits.

    ``identity`` is the call's (`CallContext.identity`); ``url`` the request's URL as sent;
    ``body`` its bytes. A multipart body (``content_type`` naming a boundary) is digested as
    the parts between its delimiters, so two encodings of one form with different boundaries
    get one key. Each field is framed by its length: no two different requests share a key.
    """
    digest = hashlib.sha256()
    boundary = _boundary(content_type)
    parts = body.split(b"--" + boundary) if boundary else [body]
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    key = hashlib.sha256()
    for field in (_KIND, identity, method.upper().encode(), url.encode(), digest.digest()):
        key.update(len(field).to_bytes(8, "big") + field)
    return "sd1-" + key.hexdigest()


class OutgoingConfig(BaseModel):
    """Options of `IdempotentTransport` and `IdempotentAsyncTransport`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    methods: tuple[str, ...] = Field(
        ("POST", "PUT", "PATCH", "DELETE"),
        description="Methods that get a key and the fence; the others go as they are.",
    )
    header: str = Field(
        "Idempotency-Key",
        min_length=1,
        description="The key's header; a key the caller set is kept.",
    )
    fence_header: str = Field(
        FENCE_HEADER,
        min_length=1,
        description="The fence's header; a fence the caller set is kept.",
    )
    strict: bool = Field(
        False,
        description="Refuse (`UnkeyedRequest`, nothing sent) an unkeyed request of these methods "
        "made outside a call; otherwise it goes as it is.",
    )
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=0,
        description="Largest streamed body (a generator, a file) read into memory to be "
        "digested; a larger one is refused with `UnkeyedRequest` before any of it is sent.",
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(m.strip().upper() for m in value)
        if not all(methods):
            raise ValueError("methods must be non-empty names")
        return methods


class OutgoingRules:
    """What the transports decide, with no I/O: which requests are stamped, and with what.

    ``headers`` are the request's own (case-insensitive: ``httpx.Headers``, or the
    ``CaseInsensitiveDict`` of ``requests``); they are changed in place.
    """

    def __init__(self, config: OutgoingConfig) -> None:
        self.config = config
        self._methods = frozenset(config.methods)

    def call_for(self, method: str, url: str, headers: Headers) -> CallContext | None:
        """The call whose identity the request takes, or None to send it as it is.

        Raises `UnkeyedRequest` for an unkeyed request of a stamped method outside a call when
        the rules are strict.
        """
        if method.upper() not in self._methods:
            return None
        call = current_call()
        if call is None and self.config.strict and self.config.header not in headers:
            raise UnkeyedRequest(
                f"{method} {_shown(url)} has no {self.config.header} and is made outside a "
                "primary call (strict=True): give it a key, or make it inside the call",
                method=method,
                url=_shown(url),
            )
        return call

    def needs_body(self, headers: Headers) -> bool:
        """Whether the key is to be derived (the caller set none), so the body is digested."""
        return self.config.header not in headers

    def too_large(self, method: str, url: str, size: int) -> UnkeyedRequest:
        """The error for a streamed body over ``max_body_bytes`` (``size`` bytes read)."""
        return UnkeyedRequest(
            f"{method} {_shown(url)}: its streamed body is over max_body_bytes ({size} > "
            f"{self.config.max_body_bytes} bytes read) and cannot be digested into an "
            f"idempotency key; nothing was sent. Send it with a {self.config.header} of its "
            "own, or raise the bound",
            method=method,
            url=_shown(url),
        )

    def stamp(
        self,
        method: str,
        url: str,
        headers: Headers,
        call: CallContext,
        body: bytes | None,
    ) -> None:
        """Add the derived key (when ``body`` is given) and the fence, unless already set."""
        if body is not None:
            content_type = headers.get("content-type")
            if isinstance(content_type, bytes):
                content_type = content_type.decode("latin-1")
            headers[self.config.header] = effect_key(call.identity, method, url, body, content_type)
        if self.config.fence_header not in headers:
            headers[self.config.fence_header] = str(call.fence)


def _rules(config: OutgoingConfig | None, options: dict[str, Any]) -> OutgoingRules:
    if config is not None and options:
        raise TypeError("give config= or keyword options, not both")
    return OutgoingRules(config if config is not None else OutgoingConfig(**options))


class IdempotentTransport(httpx.BaseTransport):
    """An ``httpx`` transport that stamps a primary call's unsafe requests (module docstring).

    ``transport``: the one that sends (default: a new ``httpx.HTTPTransport()``); options are
    those of `OutgoingConfig` (or ``config=``).
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        config: OutgoingConfig | None = None,
        **options: Any,
    ) -> None:
        self.rules = _rules(config, options)
        self.transport = transport if transport is not None else httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        method, url, headers = request.method, str(request.url), request.headers
        call = self.rules.call_for(method, url, headers)
        if call is not None:
            body = self._body(request) if self.rules.needs_body(headers) else None
            self.rules.stamp(method, url, headers, call, body)
        return self.transport.handle_request(request)

    def _body(self, request: httpx.Request) -> bytes:
        try:
            return request.content
        except httpx.RequestNotRead:
            pass
        limit, parts, size = self.rules.config.max_body_bytes, [], 0
        assert isinstance(request.stream, httpx.SyncByteStream)
        for part in request.stream:
            size += len(part)
            if size > limit:
                raise self.rules.too_large(request.method, str(request.url), size)
            parts.append(part)
        request.stream = httpx.ByteStream(b"".join(parts))
        return request.read()

    def close(self) -> None:
        self.transport.close()


class IdempotentAsyncTransport(httpx.AsyncBaseTransport):
    """The asyncio form of `IdempotentTransport` (same options, same keys)."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        config: OutgoingConfig | None = None,
        **options: Any,
    ) -> None:
        self.rules = _rules(config, options)
        self.transport = transport if transport is not None else httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method, url, headers = request.method, str(request.url), request.headers
        call = self.rules.call_for(method, url, headers)
        if call is not None:
            body = await self._body(request) if self.rules.needs_body(headers) else None
            self.rules.stamp(method, url, headers, call, body)
        return await self.transport.handle_async_request(request)

    async def _body(self, request: httpx.Request) -> bytes:
        try:
            return request.content
        except httpx.RequestNotRead:
            pass
        limit, parts, size = self.rules.config.max_body_bytes, [], 0
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for part in request.stream:
            size += len(part)
            if size > limit:
                raise self.rules.too_large(request.method, str(request.url), size)
            parts.append(part)
        request.stream = httpx.ByteStream(b"".join(parts))
        return await request.aread()

    async def aclose(self) -> None:
        await self.transport.aclose()
