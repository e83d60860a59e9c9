"""The rules of the HTTP surfaces, with no I/O: options, keys, identities, targets, headers.

`IdempotencyMiddleware` and the gateway are thin shells over these functions; each is a plain
function of bytes, tested (and fuzzed) without a server. Clients are untrusted: whatever they
send is either accepted under these rules or refused with a `Rejected` (a 4xx problem).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal
from urllib.parse import quote, unquote_to_bytes, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from .._errors import (
    DuplicateInFlight,
    FingerprintMismatch,
    InvalidToken,
    LeaseLost,
    NotStored,
    PrimaryFailed,
    StoreRefused,
    StoreUnavailable,
    WaitTimeout,
)

__all__ = [
    "ANONYMOUS",
    "CREDENTIAL_HEADERS",
    "REFUSED_METHODS",
    "STORED_HEAD_BYTES",
    "GatewayConfig",
    "HttpConfig",
    "Rejected",
    "StreamBroken",
    "check_method",
    "declared_length",
    "default_retain",
    "identity_of",
    "is_forwarding_header",
    "parse_key",
    "problem_for",
    "public_health",
    "relay_headers",
    "replay_headers",
    "retry_after",
    "split_upstream",
    "storable_body",
    "store_detail",
    "stored_size_bound",
    "strip_hop_by_hop",
    "upstream_target",
    "without_addresses",
]

MiB = 1024 * 1024
ANONYMOUS = "anon"
"""The identity of every request that carries none of the identity headers."""

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
"""Headers that carry a credential whatever ``identity_headers`` says: never a scope header."""
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
"""Methods the gateway never proxies (a tunnel; an echo of the request, credentials included)."""
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-host",
        b"x-original-uri",
        b"x-original-method",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-host",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-proxyuser-ip",
    }
)
STORED_HEAD_BYTES = 64 * 1024
"""What a stored response's status and headers may take in its JSON, kept free of the body's
share of ``max_result_bytes`` (`storable_body`)."""
_DEFAULT_IDENTITY_KEY = b"strands-dedup identity v1"
_IDENTITY_HEX = 24  # 96 bits of the digest name an identity in keys and displays
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # pchar and "/", without "%": a decoded "%" is sent as %25
_QUERY_SAFE = "/?:@!$&'()*+,;=-._~%"  # the query passes as sent; only illegal bytes are encoded
_PLAIN_SF_STRING = re.compile(rb'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"')  # no escapes: most keys
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_ADDRESS = re.compile(
    r"\b[a-z][a-z0-9+.-]*://\S+"  # a URL
    r"|\[[0-9a-f:.]+\](?::\d+)?"  # [IPv6]:port
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"  # IPv4:port
    r"|\b(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}\b"  # IPv6
    r"|\b[\w.-]+:\d{2,5}\b",  # host:port
    re.IGNORECASE,
)


def default_retain(status: int) -> bool:
    """2xx and 4xx except 409 (conflict) and 429 (rate limited) are stored for retries."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (409, 429))


class Rejected(Exception):
    """A request refused before it reaches the application: a problem with a stable kind."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(f"{status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.headers = list(headers)


def _lower(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip().lower() for name in names if name.strip()))


class HttpConfig(BaseModel):
    """Options of `IdempotencyMiddleware` (and of the gateway, which adds its own).

    Defaults live here only; the middleware, the gateway and the CLI all build this model.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    methods: tuple[str, ...] = Field(
        ("POST", "PATCH"), description="Methods that are keyed; the others pass through."
    )
    header: str = Field(
        "Idempotency-Key", min_length=1, description="The header holding the idempotency key."
    )
    require_key: bool = Field(
        False, description="A keyed method without a key is refused: 400 `key-missing`."
    )
    scope_header: str | None = Field(
        None,
        description="Header naming the tenant: keys are scoped by it and by the caller's "
        "identity. Not a credential header (a scope is stored and shown in clear).",
    )
    scope: Callable[[Any], str | bytes | None] | None = Field(
        None,
        description="Callable of the ASGI scope naming the tenant (instead of `scope_header`).",
    )
    identity_headers: tuple[str, ...] = Field(
        ("authorization", "x-api-key"),
        description="Headers holding the caller's credentials; a digest of them scopes its keys.",
    )
    identity: Callable[[Any], str | bytes | None] | None = Field(
        None,
        description="Callable of the ASGI scope naming the caller (instead of `identity_headers`).",
    )
    identity_secret: SecretStr | None = Field(
        None,
        description="HMAC key of the credentials' digest (`None`: a fixed, public key, so whoever "
        "reads Redis can test guesses of short credentials).",
    )
    share_keys_across_identities: bool = Field(
        False,
        description="Unsafe: any caller may replay any other caller's response for the same key.",
    )
    fingerprint_headers: tuple[str, ...] = Field(
        (),
        description="Headers in the request's fingerprint, besides method, path, query, "
        "`Content-Type` and body.",
    )
    on_duplicate: Literal["wait", "reject"] = Field(
        "wait",
        description='A concurrent duplicate waits for the response (`"wait"`), or gets 409 with '
        '`Retry-After` (`"reject"`).',
    )
    retain: Callable[[int], bool] = Field(
        default_retain,
        description="Which statuses are stored for later retries (by default 2xx, and 4xx "
        "but 409 and 429).",
    )
    replay_set_cookie: bool = Field(
        False,
        description="Store and replay `Set-Cookie` headers (by default a replayed response has "
        "none).",
    )
    max_request_body: int = Field(
        10 * MiB,
        gt=0,
        description="Largest request body accepted, any request; then 413 `body-too-large`.",
    )
    max_stored_body: int = Field(
        MiB,
        gt=0,
        description="Largest response body stored for retries; a larger one still reaches its "
        "own client whole. At most what the deduplicator's `max_result_bytes` holds (the "
        "default is lowered to it; a larger value is a `ValueError`).",
    )
    max_key_length: int = Field(
        255, gt=0, le=4096, description="Longest key accepted; then 400 `key-invalid`."
    )
    max_retry_after: int = Field(60, ge=1, description="Cap of a 409's `Retry-After`, seconds.")
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a request body may take to arrive; then 408 `body-timeout`.",
    )
    max_new_keys: int = Field(
        6000,
        ge=0,
        description="New keys per identity per `new_keys_window`, fleet-wide; then 429 "
        "`key-budget` (0: no limit).",
    )
    new_keys_window: float = Field(60.0, gt=0, description="The window of `max_new_keys`, seconds.")
    max_stored_bytes: int = Field(
        64 * MiB,
        ge=0,
        description="Bytes of responses one identity may keep stored, fleet-wide; then 429 "
        "`byte-budget` (0: no limit).",
    )

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        methods = tuple(m.strip().upper() for m in value)
        if not all(methods):
            raise ValueError("methods must not be empty strings")
        return methods

    @field_validator("identity_headers", "fingerprint_headers")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _lower(value)

    @model_validator(mode="after")
    def _combinations(self) -> HttpConfig:
        if self.scope_header is not None and self.scope is not None:
            raise ValueError("give scope_header= or scope=, not both")
        if self.scope_header is not None:
            name = self.scope_header.strip().lower()
            if name in self.identity_headers or name in CREDENTIAL_HEADERS:
                raise ValueError(
                    f"scope_header {self.scope_header!r} is a credential header (the identity "
                    f"headers {', '.join(self.identity_headers) or '(none)'}, and always "
                    f"{', '.join(sorted(CREDENTIAL_HEADERS))}): a scope is stored and shown in "
                    "clear; name a tenant header"
                )
        return self

    @property
    def header_name(self) -> bytes:
        return self.header.strip().lower().encode("latin-1")

    @property
    def identity_header_names(self) -> frozenset[bytes]:
        return frozenset(name.encode("latin-1") for name in self.identity_headers)

    @property
    def secret(self) -> bytes:
        if self.identity_secret is None:
            return _DEFAULT_IDENTITY_KEY
        return self.identity_secret.get_secret_value().encode()


class GatewayConfig(HttpConfig):
    """Options of the gateway: the middleware's, plus the upstream and its limits."""

    upstream: str = Field(
        description="The service to protect: `http(s)://host[:port][/base]`, with no "
        "credentials, query or fragment.",
    )
    upstream_timeout: float = Field(
        60.0,
        gt=0,
        description="Longest wait for the upstream, seconds; then 504 `upstream-timeout`.",
    )
    max_upstream_connections: int = Field(
        100, gt=0, description="Pooled connections to the upstream."
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long requests in flight may finish, seconds; then their "
        "keys are released.",
    )
    send_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a client may accept no response bytes before it is cut off.",
    )

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str) -> str:
        split_upstream(value)
        return value


def split_upstream(url: str) -> tuple[str, str, int | None, str]:
    """``http://svc:8080/api`` -> ("http", "svc", 8080, "/api"); a `ValueError` otherwise.

    Only a plain http(s) origin with an optional base path is accepted: no credentials, query or
    fragment, so what the gateway reaches is exactly what this URL names.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"upstream {url!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream must be an http:// or https:// URL with a host, not {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"upstream {url!r} must not carry credentials")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"upstream {url!r} must not have a query or a fragment")
    base = parts.path.rstrip("/")
    if base and _normalized(unquote_to_bytes(base)) != unquote_to_bytes(base):
        raise ValueError(f"upstream base path {parts.path!r} is not a normalized path")
    return parts.scheme, parts.hostname, port, base


def _normalized(path: bytes) -> bytes | None:
    """RFC 3986 section 5.2.4 on a decoded absolute path; None if it climbs above the root."""
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        dots = segment.split(b";", 1)[0]
        if dots not in (b".", b".."):
            out.append(segment)
            continue
        if dots == b"..":
            if not out:
                return None
            out.pop()
        if i == len(segments) - 1:
            out.append(b"")  # "/a/.." and "/a/." end with a slash
    return b"/" + b"/".join(out)


def _bad_target(detail: str) -> Rejected:
    return Rejected(400, "bad-target", "Request target not allowed", detail)


def upstream_target(raw_path: bytes, query: bytes, base: str) -> str:
    """The upstream's path and query for a request target; `Rejected` (400) if unsafe.

    Only origin-form targets (one leading ``/``) are accepted. The path is percent-decoded once,
    its dot-segments are removed (RFC 3986 section 5.2.4; a segment whose part before ``;`` is a
    dot-segment counts as one), and it is encoded again under ``base``: a client can name any path
    below the base and nothing else. Control characters and backslashes are refused.
    """
    if not raw_path.startswith(b"/") or raw_path.startswith(b"//"):
        raise _bad_target("only origin-form request targets (a path with one leading '/')")
    decoded = unquote_to_bytes(raw_path)
    if any(byte < 0x20 or byte == 0x7F for byte in decoded) or b"\\" in decoded:
        raise _bad_target("the path holds a control character or a backslash")
    path = _normalized(decoded)
    if path is None or path.startswith(b"//"):
        raise _bad_target("the path leaves the upstream's base path")
    target = base + quote(path, safe=_PATH_SAFE)
    if query:
        target += "?" + quote(query, safe=_QUERY_SAFE)
    return target


def parse_key(values: Sequence[bytes], max_length: int) -> bytes:
    """The Idempotency-Key from its header values; `Rejected` (400) unless exactly one.

    The IETF draft's form (a quoted structured-field string) and a bare token are both accepted;
    several headers, or one holding a list, are refused.
    """

    def invalid(detail: str) -> Rejected:
        return Rejected(400, "key-invalid", "Invalid Idempotency-Key", detail)

    if len(values) != 1:
        raise invalid("send exactly one Idempotency-Key header")
    value = values[0].strip(b" \t")
    if value.startswith(b'"'):
        plain = _PLAIN_SF_STRING.fullmatch(value)
        key = plain.group(1) if plain is not None else _sf_string(value)
        if key is None:
            raise invalid("the key is not one quoted string (a list, or a bad escape)")
    elif b"," in value:
        raise invalid("the key is a list; send one key")
    else:
        key = value
    if not key or len(key) > max_length:
        raise invalid(f"the key must be 1 to {max_length} bytes long")
    if _CONTROL.search(key) is not None:
        raise invalid("the key holds a control character")
    return key


def _sf_string(value: bytes) -> bytes | None:
    """An RFC 8941 string (``"..."`` with ``\\"`` and ``\\\\`` escapes) alone; None otherwise."""
    out = bytearray()
    i = 1
    while i < len(value):
        byte = value[i]
        if byte == 0x5C:  # backslash
            if i + 1 >= len(value) or value[i + 1] not in b'"\\':
                return None
            out.append(value[i + 1])
            i += 2
            continue
        if byte == 0x22:  # closing quote: nothing may follow
            return bytes(out) if i == len(value) - 1 else None
        if byte < 0x20 or byte > 0x7E:
            return None
        out.append(byte)
        i += 1
    return None


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length (None when absent); `Rejected` (400) when malformed."""
    values = {v.strip() for n, v in headers if n.lower() == b"content-length"}
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        raise Rejected(400, "bad-length", "Invalid Content-Length", "one decimal Content-Length")
    return int(next(iter(values)))


def body_too_large(limit: int) -> Rejected:
    return Rejected(
        413, "body-too-large", "Request body too large", f"the body exceeds {limit} bytes"
    )


def body_timed_out(seconds: float) -> Rejected:
    """408: the body did not arrive in time (the connection is closed after the answer)."""
    return Rejected(
        408,
        "body-timeout",
        "Request body timeout",
        f"the request body did not arrive within {seconds:g}s",
        [(b"connection", b"close")],
    )


def identity_of(
    headers: Iterable[tuple[bytes, bytes]], names: Collection[bytes], secret: bytes
) -> str:
    """``id-<hex>``: a keyed digest of the caller's credential headers (``names``, lower-case),
    or `ANONYMOUS`.

    The credentials themselves never leave this function: only the digest is stored, logged or
    shown.
    """
    found = sorted((n.lower(), v) for n, v in headers if n.lower() in names)
    if not found:
        return ANONYMOUS
    return "id-" + _digest(secret, found)


def _digest(secret: bytes, parts: Iterable[tuple[bytes, bytes]]) -> str:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for name, value in parts:
        for part in (name, value):
            mac.update(len(part).to_bytes(8, "big") + part)
    return mac.hexdigest()[:_IDENTITY_HEX]


def named_identity(value: str | bytes, secret: bytes) -> str:
    """The identity of a caller named by an ``identity=`` callable (digested the same way)."""
    raw = value.encode() if isinstance(value, str) else value
    return "id-" + _digest(secret, [(b"identity", raw)])


def combine_scope(tenant: str | bytes | None, identity: str | None) -> bytes | None:
    """The token scope: ``<tenant>|<identity>``, either part alone, or None (shared by all).

    An identity never holds ``|``, so the split from the right is unambiguous.
    """
    if tenant is None:
        return identity.encode() if identity is not None else None
    raw = tenant.encode() if isinstance(tenant, str) else tenant
    return raw if identity is None else raw + b"|" + identity.encode()


_NOT_STORED = frozenset({b"content-length", b"date"})


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


def replay_headers(
    headers: Iterable[tuple[bytes, bytes]], keep_cookies: bool
) -> list[tuple[bytes, bytes]]:
    """What a stored or replayed response keeps: no hop-by-hop, length or date headers, and no
    ``Set-Cookie`` unless asked (the server adds a fresh ``Date`` and the length)."""
    return [
        (n, v)
        for n, v in strip_hop_by_hop(headers)
        if n.lower() not in _NOT_STORED and (keep_cookies or n.lower() != b"set-cookie")
    ]


def relay_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upstream response's headers as the gateway relays them: hop-by-hop ones removed,
    ``Content-Length`` kept when the body is not chunked, ``Date`` left to the gateway's server."""
    headers = list(headers)
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in headers)
    return [
        (n, v)
        for n, v in strip_hop_by_hop(headers)
        if n.lower() != b"date" and not (chunked and n.lower() == b"content-length")
    ]


def retry_after(seconds: float, cap: int) -> bytes:
    """A Retry-After value: whole seconds, at least 1, at most ``cap``."""
    if not math.isfinite(seconds):
        return str(cap).encode()
    return str(min(cap, max(1, math.ceil(seconds)))).encode()


def check_method(method: str) -> None:
    """`Rejected` (405, with ``Allow``) for a method the gateway never proxies."""
    if method.upper() in REFUSED_METHODS:
        raise Rejected(
            405,
            "method-not-allowed",
            "Method not allowed",
            f"the gateway does not proxy {method.upper()} requests",
            [(b"allow", ALLOWED_METHODS)],
        )


def is_forwarding_header(name: bytes) -> bool:
    """A header that tells a server where a request came from, how, or what it stands for
    (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``X-Original-URL``,
    ``X-HTTP-Method-Override``, ...): never taken from a client (``name`` lower-case)."""
    return name.startswith(b"x-forwarded-") or name in _FORWARDING


def storable_body(max_result_bytes: int) -> int:
    """The largest response body a store bounded by ``max_result_bytes`` can hold: its base64
    in JSON, with `STORED_HEAD_BYTES` (an eighth of a smaller bound) kept for the status and
    headers. 16 MiB -> 12,533,760 bytes."""
    head = min(STORED_HEAD_BYTES, max_result_bytes // 8)
    return max(1, (max_result_bytes - head) // 4 * 3)


def stored_size_bound(body_size: int, headers: Iterable[tuple[bytes, bytes]]) -> int:
    """A stored response's JSON size (`StoredResponse`: headers as latin-1 text, the body in
    base64), within a few bytes above, without encoding the body."""
    text = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers]
    head = len(json.dumps(text, ensure_ascii=False, separators=(",", ":")).encode())
    return 4 * -(-body_size // 3) + head + 48


def without_addresses(text: str, *known: str) -> str:
    """``text`` with the ``known`` names of a server, and anything that looks like a URL, an IP
    address or a ``host:port``, replaced: what clients may read of a store's message."""
    for name in known:
        if name:
            text = text.replace(f"Redis at {name}", "Redis").replace(name, "<redis>")
    return _ADDRESS.sub("<address>", text)


def public_health(health: dict[str, Any], where: str) -> dict[str, Any]:
    """A deduplicator's health (`Health.to_json`) as clients of ``/readyz`` may read it: the
    store's error and warnings without its address (``where``, and what looks like one)."""
    public = dict(health)
    error = public.get("error")
    if error:
        kind = str(error).split(":", 1)[0]
        public["error"] = (
            f"{kind}: Redis unreachable"
            if not public.get("store_reachable")
            else without_addresses(str(error), where)
        )
    public["warnings"] = [without_addresses(str(w), where) for w in public.get("warnings", [])]
    return public


class StreamBroken(Exception):
    """A followed stream's attempt died after part of it was sent, or what was relayed is not
    the start of the stored body: the client's connection is aborted, or (nothing sent yet)
    it gets 503 ``primary-lost``; the client retries."""


def store_detail(exc: StoreUnavailable) -> str:
    """What a client is told of a store failure: Redis' own refusal, never where Redis is."""
    if isinstance(exc, StoreRefused):
        return f"Redis refused the command: {without_addresses(exc.server_message)}"
    return "Redis could not be reached or did not answer in time; retry"


_RETRY_NOW = (b"retry-after", b"1")


def _primary_failed(exc: PrimaryFailed, cap: int) -> Rejected:
    if isinstance(exc, NotStored):
        return Rejected(
            409,
            "not-retained",
            "Response not retained",
            "the first request's response was not retained; retry to run it again",
            [_RETRY_NOW],
        )
    kind = exc.error_type.rsplit(".", 1)[-1]  # the class only: its text stays in the logs
    return Rejected(
        502,
        "primary-failed",
        "The first request failed",
        f"the request with this key failed ({kind}); retry to run it again",
    )


def _in_progress(exc: DuplicateInFlight, cap: int) -> Rejected:
    return Rejected(
        409,
        "in-progress",
        "Request in progress",
        "a request with this key is being processed",
        [(b"retry-after", retry_after(exc.retry_after, cap))],
    )


def _wait_timeout(exc: WaitTimeout, cap: int) -> Rejected:
    return Rejected(
        409,
        "wait-timeout",
        "Request still in progress",
        f"gave up waiting after {exc.waited:.0f}s",
        [_RETRY_NOW],
    )


def _store_unavailable(exc: StoreUnavailable, cap: int) -> Rejected:
    return Rejected(
        503, "store-unavailable", "Deduplication store unavailable", store_detail(exc), [_RETRY_NOW]
    )


def _primary_lost(exc: Exception, cap: int) -> Rejected:
    return Rejected(
        503,
        "primary-lost",
        "The first request was interrupted",
        "the request with this key lost its lease; retry it",
        [_RETRY_NOW],
    )


_Problem = Callable[[Any, int], Rejected]
_PROBLEMS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], _Problem], ...] = (
    (PrimaryFailed, _primary_failed),
    (
        FingerprintMismatch,
        lambda exc, cap: Rejected(
            422, "key-reused", "Idempotency-Key reused", "this key was used for a different request"
        ),
    ),
    (DuplicateInFlight, _in_progress),
    (WaitTimeout, _wait_timeout),
    (StoreUnavailable, _store_unavailable),
    (
        InvalidToken,
        lambda exc, cap: Rejected(400, "key-invalid", "Invalid Idempotency-Key", str(exc)),
    ),
    ((LeaseLost, StreamBroken), _primary_lost),
)
"""What a keyed request's client is told of each failure of its call, first match first."""


def problem_for(exc: Exception, max_retry_after: int) -> Rejected | None:
    """The problem answering a keyed request whose call raised ``exc`` (``Retry-After`` capped
    at ``max_retry_after``); None for an error that is not the client's to see (re-raised: the
    server answers 500). A `NotStored` failure with a response handed over is replayed, not
    mapped: the caller checks ``shared`` first."""
    for types, make in _PROBLEMS:
        if isinstance(exc, types):
            return make(exc, max_retry_after)
    return None
