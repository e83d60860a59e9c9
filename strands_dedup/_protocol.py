"""The protocol's data and decisions, as plain functions of data (no I/O).

Wire formats (all bytes):

- lease value:   ``<owner>|<fence>|<meta JSON>``; owner ids are hex, so Lua splits on ``|``.
- result envelope (`encode_envelope`):
  ``SD2|<owner>|<fence>|<status>|<serializer>|<created ms>|<fp>|<extra>\\n<payload>``; status
  ``o`` (ok), ``e`` (a failure), ``s`` (a value shared, never stored); ``fp`` the request
  fingerprint when it is plain text (else empty); ``extra`` empty, or a JSON object of what has no
  plain field: a fingerprint that is not plain text (``fp``), the token and scope when the key
  names hold digests of them (``tok``, ``sc``), a failure's type and text (``et``, ``em``). Each
  field once: the key name holds the token and scope when they are plain. The previous format,
  ``SD1|<owner>|<header JSON>\\n<payload>``, is still read.
- wake-up message on the token's channel: ``V<envelope>`` (the result or shared failure travels
  inside), ``S<fence>`` (stored, too large to travel: read the result key) or ``R<fence>``
  (released without a result: re-read, and one waiter takes over); ``A<fence>`` (a streaming
  primary appended chunks, published by ``stream_append.lua``); on a session's channel
  ``G<ticket>|<grant>`` (an admission, published by ``session.lua``).
- stream entries (``stream_append.lua``): id ``<fence>-<n>`` (item n of the attempt, from 0),
  fields ``k`` (kind: `STREAM_BEGIN`, `STREAM_CHUNK`, `STREAM_END`), ``f`` (fence), ``d`` (data);
  an end marker's data is ``<chunks>:<sha256 hex>`` (`StreamTally`).
- lease metadata: JSON ``{"fp", "tok", "sc", "t", "h", "p"}``; session ticket metadata: JSON
  ``{"s", "h", "p", "t", "q"}`` (`encode_lease_meta`, `encode_session_meta`, `decode_meta`).

The waiter's decision after each wake-up is `after_wake`; every waiter loop (plain, stream
follower, session queue) is the engine's one loop driven by it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = [
    "CLAIM_BUSY",
    "CLAIM_CLAIMED",
    "CLAIM_REPLAY",
    "MSG_APPENDED",
    "MSG_GRANT",
    "MSG_RELEASED",
    "MSG_STORED",
    "MSG_VALUE",
    "STREAM_BEGIN",
    "STREAM_CHUNK",
    "STREAM_END",
    "StreamTally",
    "Busy",
    "Claimed",
    "ClaimReply",
    "Envelope",
    "Grant",
    "LeaseInfo",
    "LeaveClaimed",
    "STATUS_SHARED",
    "ShareOnly",
    "Outcome",
    "QueueFull",
    "Queued",
    "Replay",
    "Role",
    "SessionReply",
    "Taken",
    "WakeUp",
    "Wake",
    "after_wake",
    "decode_envelope",
    "decode_lease",
    "encode_lease",
    "decode_message",
    "decode_meta",
    "encode_envelope",
    "encode_lease_meta",
    "encode_released_message",
    "encode_session_meta",
    "encode_stored_message",
    "encode_value_message",
    "envelope_header",
    "fence_of",
    "fingerprints_conflict",
    "parse_grant",
    "wait_budget",
]

T = TypeVar("T")
ENVELOPE_MAGIC = b"SD2|"
ENVELOPE_MAGIC_V1 = b"SD1|"
"""The previous envelope format (a JSON header): still read, never written."""
_STATUS_CODES = {"ok": b"o", "error": b"e", "shared": b"s"}
_PLAIN_FIELD = re.compile(rb"[A-Za-z0-9._~@=+/:\-]+")

# Tags of the messages on a token's (or session's) channel.
MSG_VALUE = b"V"
MSG_STORED = b"S"
MSG_RELEASED = b"R"
MSG_APPENDED = b"A"
MSG_GRANT = b"G"
# Kinds of claim.lua's reply.
CLAIM_REPLAY = b"R"
CLAIM_CLAIMED = b"C"
CLAIM_BUSY = b"L"
# Kinds of a streamed attempt's entries (field ``k``).
STREAM_BEGIN = b"b"
STREAM_CHUNK = b"c"
STREAM_END = b"e"


class StreamTally:
    """The count and digest of an attempt's chunks, as its primary appended them and as a
    follower relayed them: SHA-256 over each chunk's length (8 bytes, big-endian) and bytes."""

    __slots__ = ("_hash", "count")

    def __init__(self) -> None:
        self.count = 0
        self._hash = hashlib.sha256()

    def add(self, data: bytes) -> None:
        self.count += 1
        self._hash.update(len(data).to_bytes(8, "big"))
        self._hash.update(data)

    def end_marker(self) -> bytes:
        """The data of the attempt's end marker."""
        return b"%d:%s" % (self.count, self._hash.hexdigest().encode())

    def matches(self, marker: bytes) -> bool | None:
        """Whether these chunks are the ones an end marker's data counts; None when it counts
        nothing (an end marker without a tally)."""
        count, sep, digest = marker.partition(b":")
        if not sep:
            return None
        return count == b"%d" % self.count and digest == self._hash.hexdigest().encode()


_HOST = socket.gethostname()
_HOST_JSON = json.dumps(_HOST)


class Role(enum.StrEnum):
    """How a caller got its outcome."""

    PRIMARY = "primary"
    """This caller claimed the token and ran the call."""
    WAITER = "waiter"
    """Another caller ran it; this one waited and got its result."""
    REPLAY = "replay"
    """The result was already stored; nothing ran."""
    TAKEOVER = "takeover"
    """This caller waited, found the primary gone, claimed the token and ran the call."""


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    """What `execute` returns: the value, how it was obtained, and the fence it was produced under.

    The fence increases with every claim of a token; pass it to downstream systems so they can
    refuse writes from an older attempt.
    """

    value: T
    role: Role
    fence: int


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A live lease held by some primary."""

    owner: str
    fence: int
    meta: dict[str, Any]
    pttl_ms: int

    @property
    def fingerprint(self) -> str | None:
        fp = self.meta.get("fp")
        return fp if isinstance(fp, str) else None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A stored (or shared) outcome of a primary."""

    owner: str
    fence: int
    ok: bool
    fingerprint: str | None
    serializer: str
    created_ms: int
    token: str
    scope: str
    payload: bytes = b""
    error_type: str = ""
    error_message: str = ""
    size: int = field(default=0)
    stored: bool = True
    """False for a value handed to the waiters of the moment only (`ShareOnly`)."""


@dataclass(frozen=True, slots=True)
class Replay:
    envelope: bytes


@dataclass(frozen=True, slots=True)
class Claimed:
    fence: int


@dataclass(frozen=True, slots=True)
class Busy:
    lease: LeaseInfo


ClaimReply = Replay | Claimed | Busy


class WakeUp(enum.Enum):
    """Events a waiting duplicate receives besides a result."""

    STORED = "stored"
    """The result is stored but too large for the message: read it."""
    RELEASED = "released"
    """The primary released the token without a result: re-read (one waiter takes over)."""
    RECONNECTED = "reconnected"
    """The shared subscriber reconnected: messages may have been lost, re-read."""
    MALFORMED = "malformed"
    """A message that is not ours arrived on the channel: re-read."""
    APPENDED = "appended"
    """A streaming primary appended chunks (followers read them; plain waiters keep waiting)."""


def encode_envelope(owner: str, header: dict[str, Any], payload: bytes) -> bytes:
    """The envelope of ``header`` (`envelope_header`) and ``payload``: each field once, in a
    ``|``-separated text header; what has no plain text form goes in a JSON ``extra``."""
    extra: dict[str, Any] = {}
    fp = header.get("fp")
    fp_field = b""
    if fp is not None:
        fp_bytes = str(fp).encode("utf-8", "surrogatepass")
        if _PLAIN_FIELD.fullmatch(fp_bytes):
            fp_field = fp_bytes
        else:
            extra["fp"] = fp
    ser = str(header.get("ser", "")).encode("utf-8", "surrogatepass")
    if ser and not _PLAIN_FIELD.fullmatch(ser):
        extra["ser"], ser = str(header.get("ser", "")), b""
    for name in ("tok", "sc", "et", "em"):
        if header.get(name):
            extra[name] = header[name]
    head = b"|".join(
        (
            owner.encode(),
            b"%d" % header["f"],
            _STATUS_CODES[header["st"]],
            ser,
            b"%d" % header.get("t", 0),
            fp_field,
            json.dumps(extra, separators=(",", ":"), ensure_ascii=True).encode() if extra else b"",
        )
    )
    return ENVELOPE_MAGIC + head + b"\n" + payload


_STATUS_NAMES = {code: name for name, code in _STATUS_CODES.items()}


def decode_envelope(data: bytes) -> Envelope:
    """Parse an envelope (this format or the previous one); raises ``ValueError`` on bytes that
    are not one. A token and scope the key names hold in clear decode as ``""``."""
    if data.startswith(ENVELOPE_MAGIC_V1):
        return _decode_envelope_v1(data)
    if not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("not a strands-dedup result envelope")
    head_end = data.index(b"\n")
    owner, fence, status, ser, created, fp, extra_json = data[len(ENVELOPE_MAGIC) : head_end].split(
        b"|", 6
    )
    extra = json.loads(extra_json) if extra_json else {}
    if not isinstance(extra, dict):
        raise ValueError("the envelope's extra fields are not a JSON object")
    return _envelope(
        owner.decode(),
        int(fence),
        _STATUS_NAMES[status],
        fp.decode() if fp else extra.get("fp"),
        ser.decode() if ser else extra.get("ser", ""),
        int(created),
        extra,
        data[head_end + 1 :],
    )


def _decode_envelope_v1(data: bytes) -> Envelope:
    """The previous format: ``SD1|<owner>|<header JSON>\\n<payload>``."""
    owner_end = data.index(b"|", len(ENVELOPE_MAGIC_V1))
    head_end = data.index(b"\n", owner_end)
    header = json.loads(data[owner_end + 1 : head_end])
    return _envelope(
        data[len(ENVELOPE_MAGIC_V1) : owner_end].decode(),
        int(header["f"]),
        header["st"],
        header.get("fp"),
        header.get("ser", ""),
        int(header.get("t", 0)),
        header,
        data[head_end + 1 :],
    )


def _envelope(
    owner: str,
    fence: int,
    status: str,
    fingerprint: str | None,
    serializer: str,
    created_ms: int,
    fields: dict[str, Any],
    payload: bytes,
) -> Envelope:
    """The `Envelope` of either format's fields (``fields``: the optional ones by short name:
    token, scope, error type and message)."""
    return Envelope(
        owner=owner,
        fence=fence,
        ok=status == "ok",
        fingerprint=fingerprint,
        serializer=serializer,
        created_ms=created_ms,
        token=fields.get("tok", ""),
        scope=fields.get("sc", ""),
        payload=payload,
        error_type=fields.get("et", ""),
        error_message=fields.get("em", ""),
        size=len(payload),
        stored=status != STATUS_SHARED,
    )


def decode_lease(value: bytes, pttl_ms: int) -> LeaseInfo:
    owner, fence, meta = value.split(b"|", 2)
    return LeaseInfo(owner.decode(), int(fence), decode_meta(meta), pttl_ms)


def encode_lease(owner: str, fence: int, meta: bytes) -> bytes:
    """A lease's value as claim.lua writes it (the renewer compares it)."""
    return f"{owner}|{fence}|".encode() + meta


def encode_stored_message(fence: int) -> bytes:
    return MSG_STORED + str(fence).encode()


def encode_released_message(fence: int) -> bytes:
    return MSG_RELEASED + str(fence).encode()


def encode_value_message(envelope: bytes) -> bytes:
    return MSG_VALUE + envelope


STATUS_SHARED = "shared"
"""Envelope status of a value handed to the waiters of the moment and never stored."""


def envelope_header(
    *,
    ok: bool,
    fence: int,
    fingerprint: str | None,
    serializer: str,
    created_ms: int,
    token: str,
    scope: str,
    error_type: str = "",
    error_message: str = "",
    shared_only: bool = False,
) -> dict[str, Any]:
    """The fields of a result envelope (`encode_envelope` writes them; `decode_envelope` reads
    them back). ``token`` and ``scope`` empty: the key names hold them in clear."""
    header: dict[str, Any] = {
        "st": STATUS_SHARED if shared_only else "ok" if ok else "error",
        "f": fence,
        "fp": fingerprint,
        "ser": serializer,
        "t": created_ms,
        "tok": token,
        "sc": scope,
    }
    if not ok:
        header["et"] = error_type
        header["em"] = error_message
    return header


def fence_of(stored: bytes) -> int | None:
    """The fence a stored result was written under (None when it is not a result envelope)."""
    try:
        return decode_envelope(stored).fence
    except (ValueError, KeyError, TypeError):
        return None


def encode_lease_meta(key_meta: str, fingerprint: str | None, now_ms: int) -> bytes:
    """A lease's metadata (JSON): fingerprint, the token's display fields (``key_meta``, from
    `TokenKeys.meta`), start time, host and pid."""
    fp = "null" if fingerprint is None else json.dumps(fingerprint)
    return f'{{"fp":{fp},{key_meta},"t":{now_ms},"h":{_HOST_JSON},"p":{os.getpid()}}}'.encode()


def encode_session_meta(session: str, seq: int | None, now_ms: int) -> str:
    """A session ticket's metadata (JSON): session name, host, pid, time, sequence number."""
    return json.dumps({"s": session, "h": _HOST, "p": os.getpid(), "t": now_ms, "q": seq})


def decode_meta(raw: bytes | str | None) -> dict[str, Any]:
    """Lease or ticket metadata as a dict (empty when missing or not JSON)."""
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def decode_message(data: bytes) -> Envelope | Grant | WakeUp:
    """Parse a wake-up message once for every waiter of the channel."""
    kind = data[:1]
    if kind == MSG_GRANT:
        try:
            ticket, _, grant = data[1:].decode().partition("|")
            return parse_grant(ticket, grant)
        except ValueError:
            return WakeUp.MALFORMED
    if kind == MSG_VALUE:
        try:
            return decode_envelope(data[1:])
        except (ValueError, KeyError):
            return WakeUp.MALFORMED
    if kind == MSG_STORED:
        return WakeUp.STORED
    if kind == MSG_RELEASED:
        return WakeUp.RELEASED
    if kind == MSG_APPENDED:
        return WakeUp.APPENDED
    return WakeUp.MALFORMED


@dataclass(frozen=True, slots=True)
class Grant:
    """An admission to a guarded session (see ``store/lua/session.lua``)."""

    ticket: str
    fence: int
    """The session's fence: grows with every admission, so downstream can refuse a stale holder."""
    skipped: tuple[int, int] | None
    """Sequence numbers given up on (inclusive range) to admit this holder after a gap."""
    late: bool
    """The holder's sequence number had already been passed (it arrived after a skip)."""
    conversation: dict[bytes, bytes] | None = None
    """The session's conversation hash as read right after the admission, when the admission
    came in the script's reply (None when it came as a message: read it then)."""


@dataclass(frozen=True, slots=True)
class Queued:
    ticket: str
    position: int
    depth: int
    wake_ms: int
    """Ask again within this many ms (a lease or a gap may expire then) unless woken first."""


@dataclass(frozen=True, slots=True)
class Taken:
    holders: int
    depth: int
    retry_ms: int


@dataclass(frozen=True, slots=True)
class QueueFull:
    holders: int
    depth: int


SessionReply = Grant | Queued | Taken | QueueFull


def parse_grant(ticket: str, grant: str) -> Grant:
    fence, skip_from, skip_to, late = grant.split("|")
    first, last = int(skip_from), int(skip_to)
    skipped = (first, last) if first >= 0 and last >= first else None
    return Grant(ticket, int(fence), skipped, late == "1")


def fingerprints_conflict(ours: str | None, theirs: str | None) -> bool:
    """True when both sides gave a fingerprint and they differ (a reused token)."""
    return ours is not None and theirs is not None and ours != theirs


def wait_budget(pttl_ms: int, grace: float, remaining: float) -> float:
    """How long a waiter listens before it re-reads the token.

    It re-reads when the lease it saw should have expired (a crashed primary) plus a grace, or
    when its own deadline comes, whichever is first. A lease without a TTL (never set by us) is
    re-read after one grace so a waiter never sleeps unboundedly on it.
    """
    lease_left = pttl_ms / 1000 if pttl_ms > 0 else 0.0
    return max(0.0, min(remaining, lease_left + grace))


class LeaveClaimed(Exception):
    """Raised by a primary's call that ends without a result while its side effects may still
    be under way elsewhere (an upstream that timed out may still be running): the token is neither
    released nor failed; its lease is no longer renewed and expires within one lease TTL, so no
    second execution starts before then."""


class Wake(enum.Enum):
    """What a waiter does after `Watch.next` returned (`after_wake`)."""

    REREAD = "reread"
    """Read the token (or session) again: the lease may have expired, or it was released."""
    RESUBSCRIBE = "resubscribe"
    """Wait for the subscription to be confirmed again, then read (messages may be lost)."""
    HEAR = "hear"
    """A message for the surface waiting: a value, a grant, a stored or appended notice."""


def after_wake(event: object) -> Wake:
    """A waiter's next step after a wake-up (``None``: its listening budget ran out)."""
    if event is None or event is WakeUp.RELEASED or event is WakeUp.MALFORMED:
        return Wake.REREAD
    if event is WakeUp.RECONNECTED:
        return Wake.RESUBSCRIBE
    return Wake.HEAR


class ShareOnly(Exception):
    """Raised by a primary's call whose value goes to the duplicates waiting at this moment but is
    not stored (``shared``: its bytes, or empty when too large to hand over; ``reason``: why).
    The token is released afterwards, so a later retry runs again. The waiters get `NotStored`."""

    def __init__(self, reason: str, shared: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.shared = shared
