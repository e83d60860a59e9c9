"""The Redis key schema: every key and channel name strands-dedup uses is built here.

All keys of one token share one Redis Cluster hash slot::

    <namespace>:{<scope>:<token>}:lease     the primary's lease (SET NX PX), "owner|fence|meta"
    <namespace>:{<scope>:<token>}:fence     the token's fence counter (until a result is stored)
    <namespace>:{<scope>:<token>}:result    the stored result envelope
    <namespace>:{<scope>:<token>}:chan      pub/sub channel that wakes waiting duplicates
    <namespace>:{<scope>:<token>}:stream    a streamed call's chunks, for followers (Redis Stream)

the keys of one identity's budget (HTTP surfaces; the tag starts with ``!``, which no encoded
session name holds)::

    <namespace>:{!budget|<identity>}:keys     new keys reserved in the current window (string)
    <namespace>:{!budget|<identity>}:bytes    bytes stored, per time bucket (hash)
    <namespace>:{!budget|<identity>}:op:<id>  one reservation's grant, so a retry repeats it

and all keys of one guarded session (`SessionGuard`; the tag holds no ``:``, so it never meets a
token's tag), or of the fleet-wide total, ``{!total}``::

    <namespace>:{<session>}:holders   holder tickets -> lease expiry     (sorted set)
    <namespace>:{<session>}:queue     unsequenced waiters -> arrival      (sorted set)
    <namespace>:{<session>}:seqq      sequenced waiters -> sequence no.   (sorted set)
    <namespace>:{<session>}:qexp      every waiter -> lease expiry        (sorted set)
    <namespace>:{<session>}:meta      ticket -> caller metadata           (hash)
    <namespace>:{<session>}:state     counters, next sequence number, grants (hash)
    <namespace>:{<session>}:schan     pub/sub channel announcing admissions
    <namespace>:{<session>}:conv      its conversation: commit record, Strands items (hash)

A token or scope that is not short plain text is replaced by a digest (``#`` + 32 hex digits), so
no user input can break the hash tag (``{``/``}``), act as a SCAN glob (``* ? [ ]``) or make two
different (scope, token) pairs collide; the original is kept, in display form, in the lease and
the result envelope. A scope never holds ``:`` in its plain form, so ``scope:token`` is unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache

from ._errors import InvalidToken

__all__ = [
    "MAX_TOKEN_BYTES",
    "KeySchema",
    "SessionKeys",
    "TokenKeys",
    "display_form",
    "validate_namespace",
]

#: Tokens and scopes above this size are refused outright (a digest would hide anything longer).
MAX_TOKEN_BYTES = 64 * 1024
_MAX_PLAIN = 128
_MAX_DISPLAY = 200
_PLAIN_TOKEN = re.compile(rb"[A-Za-z0-9._~@=+/:\-]+")
_PLAIN_SCOPE = re.compile(rb"[A-Za-z0-9._~@=+/\-]+")
_NAMESPACE = re.compile(r"[A-Za-z0-9._\-]+(:[A-Za-z0-9._\-]+)*")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it can prefix keys, else raise ``ValueError`` saying why."""
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(
            f"namespace {namespace!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(':' may separate non-empty parts)"
        )
    if len(namespace) > 64:
        raise ValueError(f"namespace is {len(namespace)} characters long; the limit is 64")
    return namespace


def _as_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogatepass")
    else:
        raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")
    if len(raw) > MAX_TOKEN_BYTES:
        raise InvalidToken(f"{what} is {len(raw)} bytes long; the limit is {MAX_TOKEN_BYTES}")
    return raw


def display_form(raw: bytes) -> str:
    """A printable, bounded rendering of a token or scope, for logs, errors and the CLI."""
    text = raw.decode("utf-8", "backslashreplace")
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= _MAX_DISPLAY else text[: _MAX_DISPLAY - 3] + "..."


def _display(given: str | bytes | None, raw: bytes) -> str:
    """`display_form` of ``raw``, the bytes of ``given``: printable text is its own display
    form (it holds no surrogates, so its UTF-8 decodes back to it)."""
    if type(given) is str and len(given) <= _MAX_DISPLAY and given.isprintable():
        return given
    return display_form(raw)


def _json_string(text: str) -> str:
    """``json.dumps(text)``, without its machinery for the usual printable ASCII text."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def _encode(raw: bytes, plain: re.Pattern[bytes], kind: bytes) -> bytes:
    if len(raw) <= _MAX_PLAIN and plain.fullmatch(raw):
        return raw
    return b"#" + hashlib.sha256(kind + b"\0" + raw).hexdigest()[:32].encode()


@dataclass(frozen=True, slots=True)
class TokenKeys:
    """The names belonging to one (scope, token) pair."""

    lease: bytes
    fence: bytes
    result: bytes
    channel: bytes
    stream: bytes
    token: str
    """Display form of the token."""
    scope: str
    """Display form of the scope ("" when there is none)."""
    meta: str
    """The token and scope as a JSON object fragment, for lease metadata."""

    @property
    def digested(self) -> bool:
        """Whether the key names hold a digest of the token or scope instead of its text (``#``
        is in no plain form and no namespace)."""
        return b"#" in self.lease

    @property
    def identity(self) -> bytes:
        """``<namespace>:{<scope>:<token>}``: names the call alone, whatever its attempt (the
        encoded forms, so a long token is not cut as its display form is)."""
        return self.lease[: -len(b":lease")]


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The names belonging to one guarded session (or the fleet-wide total)."""

    holders: bytes
    queue: bytes
    seqq: bytes
    qexp: bytes
    meta: bytes
    state: bytes
    channel: bytes
    name: str
    """Display form of the session name ("(fleet total)" for the total)."""

    @property
    def conversation(self) -> bytes:
        """The session's conversation hash: its commit record and, with `RedisSessionManager`,
        its Strands session, agents and messages."""
        return self.holders[: -len(b"holders")] + b"conv"

    @property
    def all(self) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
        """The six keys in the order the session script takes them."""
        return (self.holders, self.queue, self.seqq, self.qexp, self.meta, self.state)


TOTAL_TAG = b"!total"


class KeySchema:
    """Builds key names under one validated namespace."""

    __slots__ = ("_cached", "_prefix", "namespace")

    def __init__(self, namespace: str) -> None:
        self.namespace = validate_namespace(namespace)
        self._prefix = namespace.encode() + b":{"
        # Retries and duplicates reuse tokens: remember recent ones (bounded, per schema).
        self._cached = lru_cache(maxsize=4096)(self._build)

    @property
    def probe(self) -> bytes:
        """A key written (with a short TTL) to check that Redis accepts writes."""
        return self._prefix + b"probe}:write"

    def for_token(self, token: str | bytes, scope: str | bytes | None = None) -> TokenKeys:
        """The keys of ``token`` within ``scope``; raises ``InvalidToken`` for unusable input."""
        if (
            type(token) in (str, bytes)
            and len(token) <= _MAX_PLAIN
            and (scope is None or (type(scope) in (str, bytes) and len(scope) <= _MAX_PLAIN))
        ):
            return self._cached(token, scope)
        return self._build(token, scope)

    def _build(self, token: str | bytes, scope: str | bytes | None) -> TokenKeys:
        raw = _as_bytes(token, "token")
        if not raw:
            raise InvalidToken("token must not be empty")
        raw_scope = b"" if scope is None else _as_bytes(scope, "scope")
        tag = (
            self._prefix
            + (_encode(raw_scope, _PLAIN_SCOPE, b"scope") if raw_scope else b"")
            + b":"
            + _encode(raw, _PLAIN_TOKEN, b"token")
            + b"}:"
        )
        token_text = _display(token, raw)
        scope_text = _display(scope, raw_scope) if raw_scope else ""
        return TokenKeys(
            lease=tag + b"lease",
            fence=tag + b"fence",
            result=tag + b"result",
            channel=tag + b"chan",
            stream=tag + b"stream",
            token=token_text,
            scope=scope_text,
            meta=f'"tok":{_json_string(token_text)},"sc":{_json_string(scope_text)}',
        )

    def for_session(self, name: str | bytes) -> SessionKeys:
        """The keys of a guarded session; raises `InvalidToken` for an unusable name."""
        raw = _as_bytes(name, "session")
        if not raw:
            raise InvalidToken("session name must not be empty")
        return self._session(_encode(raw, _PLAIN_SCOPE, b"session"), display_form(raw))

    def for_total(self) -> SessionKeys:
        """The keys of the fleet-wide holder count (``max_concurrent_total``)."""
        return self._session(TOTAL_TAG, "(fleet total)")

    def _session(self, tag: bytes, name: str) -> SessionKeys:
        base = self._prefix + tag + b"}:"
        return SessionKeys(
            holders=base + b"holders",
            queue=base + b"queue",
            seqq=base + b"seqq",
            qexp=base + b"qexp",
            meta=base + b"meta",
            state=base + b"state",
            channel=base + b"schan",
            name=name,
        )

    def for_budget(self, identity: str, op: str) -> tuple[bytes, bytes, bytes]:
        """The keys of one identity's budget (key counter, byte buckets) and of one operation
        on it (its marker), in the order budget.lua takes them."""
        raw = _as_bytes(identity, "identity")
        base = self._prefix + b"!budget|" + _encode(raw, _PLAIN_SCOPE, b"identity") + b"}:"
        return base + b"keys", base + b"bytes", base + b"op:" + op.encode("ascii")

    def session_pattern(self, part: str) -> bytes:
        """A SCAN MATCH pattern for one part of every session's keys."""
        return self._prefix + b"*}:" + part.encode()

    def pattern(self, part: str, scope: str | bytes | None = None) -> bytes:
        """A SCAN MATCH pattern for every key of one part ("lease", "result", ...).

        With ``scope``, only that scope's keys (its encoded form holds no glob characters).
        """
        if scope is None:
            return self.namespace.encode() + b":{*}:" + part.encode()
        raw = _as_bytes(scope, "scope")
        encoded = _encode(raw, _PLAIN_SCOPE, b"scope") if raw else b""
        return self._prefix + encoded + b":*}:" + part.encode()

    def stats_key(self, process: str) -> bytes:
        """Where one process publishes its event counters (outside any token's hash slot)."""
        return self.namespace.encode() + b":stats:" + process.encode()

    def stats_pattern(self) -> bytes:
        return self.namespace.encode() + b":stats:*"

    def channel_of(self, key: bytes) -> bytes:
        """The channel of the token a lease or result key belongs to."""
        return key[: key.rindex(b"}:") + 2] + b"chan"
