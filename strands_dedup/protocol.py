"""The protocol's data and decisions, as plain functions of data (no I/O).

Wire formats (all bytes):

- lease value:   ``<owner>|<fence>|<meta JSON>``; owner ids are hex, so Lua splits on ``|``.
- result envelope: ``SD1|<owner>|<header JSON>\\n<payload>``; the owner prefix lets a retried
  completion recognise its own result inside the script.
- wake-up message on the token's channel: ``V<envelope>`` (the result or shared failure travels
  inside), ``S<fence>`` (stored, too large to travel: read the result key) or ``R<fence>``
  (released without a result: re-read, and one waiter takes over).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = [
    "Busy",
    "Claimed",
    "ClaimReply",
    "Envelope",
    "Grant",
    "LeaseInfo",
    "LeaveClaimed",
    "Outcome",
    "QueueFull",
    "Queued",
    "Replay",
    "Role",
    "SessionReply",
    "Taken",
    "WakeUp",
    "decode_envelope",
    "decode_lease",
    "decode_message",
    "encode_envelope",
    "fingerprints_conflict",
    "parse_claim_reply",
    "parse_grant",
    "parse_session_reply",
    "wait_budget",
]

T = TypeVar("T")
ENVELOPE_MAGIC = b"SD1|"


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
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    return ENVELOPE_MAGIC + owner.encode() + b"|" + head + b"\n" + payload


def decode_envelope(data: bytes) -> Envelope:
    """Parse an envelope; raises ``ValueError`` on bytes that are not one."""
    if not data.startswith(ENVELOPE_MAGIC):
        raise ValueError("not a strands-dedup result envelope")
    owner_end = data.index(b"|", len(ENVELOPE_MAGIC))
    head_end = data.index(b"\n", owner_end)
    header = json.loads(data[owner_end + 1 : head_end])
    payload = data[head_end + 1 :]
    return Envelope(
        owner=data[len(ENVELOPE_MAGIC) : owner_end].decode(),
        fence=int(header["f"]),
        ok=header["st"] == "ok",
        fingerprint=header.get("fp"),
        serializer=header.get("ser", ""),
        created_ms=int(header.get("t", 0)),
        token=header.get("tok", ""),
        scope=header.get("sc", ""),
        payload=payload,
        error_type=header.get("et", ""),
        error_message=header.get("em", ""),
        size=len(payload),
    )


def decode_lease(value: bytes, pttl_ms: int) -> LeaseInfo:
    owner, fence, meta = value.split(b"|", 2)
    try:
        parsed = json.loads(meta) if meta else {}
    except ValueError:
        parsed = {}
    return LeaseInfo(
        owner.decode(), int(fence), parsed if isinstance(parsed, dict) else {}, pttl_ms
    )


def parse_claim_reply(reply: list[Any]) -> ClaimReply:
    """Turn the claim script's reply into a `Replay`, `Claimed` or `Busy`."""
    kind = reply[0]
    if kind == b"R":
        return Replay(reply[1])
    if kind == b"C":
        return Claimed(int(reply[1]))
    if kind == b"L":
        return Busy(decode_lease(reply[1], int(reply[2])))
    raise ValueError(f"unexpected claim reply {reply!r}")


def encode_stored_message(fence: int) -> bytes:
    return b"S" + str(fence).encode()


def encode_released_message(fence: int) -> bytes:
    return b"R" + str(fence).encode()


def encode_value_message(envelope: bytes) -> bytes:
    return b"V" + envelope


def decode_message(data: bytes) -> Envelope | Grant | WakeUp:
    """Parse a wake-up message once for every waiter of the channel."""
    kind = data[:1]
    if kind == b"G":
        try:
            ticket, _, grant = data[1:].decode().partition("|")
            return parse_grant(ticket, grant)
        except ValueError:
            return WakeUp.MALFORMED
    if kind == b"V":
        try:
            return decode_envelope(data[1:])
        except (ValueError, KeyError):
            return WakeUp.MALFORMED
    if kind == b"S":
        return WakeUp.STORED
    if kind == b"R":
        return WakeUp.RELEASED
    if kind == b"A":
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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_grant(ticket: str, grant: str) -> Grant:
    fence, skip_from, skip_to, late = grant.split("|")
    first, last = int(skip_from), int(skip_to)
    skipped = (first, last) if first >= 0 and last >= first else None
    return Grant(ticket, int(fence), skipped, late == "1")


def parse_session_reply(reply: list[Any]) -> SessionReply:
    """Turn the session script's acquire reply into a typed value."""
    kind = _text(reply[0])
    if kind == "H":
        return parse_grant(_text(reply[1]), _text(reply[2]))
    if kind == "Q":
        return Queued(_text(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))
    if kind == "B":
        return Taken(int(reply[1]), int(reply[2]), int(reply[3]))
    if kind == "O":
        return QueueFull(int(reply[1]), int(reply[2]))
    raise ValueError(f"unexpected session reply {reply!r}")


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
