"""The protocol's Redis commands without I/O: for each Lua script of ``lua/``, its keys and
arguments built from typed inputs, and its reply parsed into typed values.

A `Call` is what a shell sends (a `Script`, its keys and arguments) and how it reads the answer
(``parse``). The asyncio shell (`RedisStore`) and the blocking shell (`BlockingStore`) run the
same calls; they only move bytes, retry, and map driver errors (``failures.py``).

`Commands` binds the settings every call of one store shares (TTLs, the publish command);
each of its methods builds one script's call, next to the parser of that script's reply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, NamedTuple, TypeVar

from .._config import DedupConfig
from .._keys import SessionKeys, TokenKeys
from .._protocol import (
    CLAIM_BUSY,
    CLAIM_CLAIMED,
    CLAIM_REPLAY,
    MSG_VALUE,
    Busy,
    Claimed,
    ClaimReply,
    Grant,
    Queued,
    QueueFull,
    Replay,
    SessionReply,
    Taken,
    decode_lease,
    parse_grant,
)

__all__ = [
    "SCRIPTS",
    "BudgetReply",
    "Call",
    "Commands",
    "Committed",
    "CommitLost",
    "Read",
    "ConversationReply",
    "HeldLeaseRef",
    "HeldTicketRef",
    "Script",
    "Settled",
    "TooFull",
    "TurnMoved",
    "claim_again",
    "parse_budget",
    "parse_claim",
    "parse_conversation",
    "parse_flags",
    "parse_release",
    "parse_session",
    "parse_session_release",
    "parse_settle",
    "parse_stored",
    "parse_stream_append",
]

R = TypeVar("R")
Arg = bytes | str | int


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its name, source and SHA-1 (the name EVALSHA gives it)."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, *, prelude: str = "") -> Script:
        """The script ``lua/<name>.lua`` (with ``lua/<prelude>.lua`` in front of it)."""
        files = resources.files(__package__).joinpath("lua")
        source = files.joinpath(f"{name}.lua").read_text("utf-8")
        if prelude:
            source = files.joinpath(f"{prelude}.lua").read_text("utf-8") + "\n" + source
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())

    def evalsha(self, keys: Sequence[bytes], args: Sequence[Any]) -> tuple[Any, ...]:
        """The EVALSHA command that runs it."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    def eval(self, keys: Sequence[bytes], args: Sequence[Any]) -> tuple[Any, ...]:
        """The EVAL command that runs it (and has Redis cache it: after a NOSCRIPT)."""
        return ("EVAL", self.source, len(keys), *keys, *args)


SCRIPTS: dict[str, Script] = {
    name: Script.load(name, prelude="fence" if name in ("claim", "release") else "")
    for name in (
        "claim",
        "settle",
        "renew",
        "release",
        "session",
        "session_renew",
        "stream_append",
        "conversation",
        "budget",
    )
}
"""Every script, by name (claim and release carry fence.lua's ``next_fence`` in front)."""


@dataclass(frozen=True, slots=True)
class Call(Generic[R]):
    """One script run: what to send, and how to read its reply."""

    script: Script
    keys: tuple[bytes, ...]
    args: tuple[Any, ...]
    parse: Callable[[Any], R]

    def evalsha(self) -> tuple[Any, ...]:
        return self.script.evalsha(self.keys, self.args)

    def eval(self) -> tuple[Any, ...]:
        return self.script.eval(self.keys, self.args)


@dataclass(frozen=True, slots=True)
class Read(Generic[R]):
    """One plain command (no script) on ``key``'s slot: what to send, and how to read its
    reply. The shells send it the way they send scripts (auto-pipeline, node pipelines)."""

    key: bytes
    command: tuple[Any, ...]
    parse: Callable[[Any], R]


class HeldLeaseRef(NamedTuple):
    """What the renew script needs to know about one held lease."""

    keys: TokenKeys
    value: bytes


class HeldTicketRef(NamedTuple):
    """What the session renew script needs to know about one held or waiting ticket."""

    keys: SessionKeys
    ticket: str


class Settled(NamedTuple):
    """settle.lua's answer: accepted, or why not (``fence``: claimed again; ``owner``)."""

    ok: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Committed:
    """conversation.lua wrote: ``turn`` commits now; the holder's lease has ``lease_ms`` left
    (-1 for a write outside any turn)."""

    turn: int
    lease_ms: int


@dataclass(frozen=True, slots=True)
class CommitLost:
    """The ticket no longer holds the session with that fence: nothing written."""


@dataclass(frozen=True, slots=True)
class TurnMoved:
    """Another holder committed since this one loaded (``turn``: commits now): nothing written."""

    turn: int


@dataclass(frozen=True, slots=True)
class TooFull:
    """The writes would take the conversation past a bound (its size after them)."""

    messages: int
    bytes: int


ConversationReply = Committed | CommitLost | TurnMoved | TooFull


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _unexpected(script: str, reply: Any) -> ValueError:
    return ValueError(f"unexpected {script} reply {reply!r}")


# -- parsers (one per script) ------------------------------------------------------------------


def parse_claim(reply: Any) -> ClaimReply:
    """claim.lua's reply as a `Replay`, `Claimed` or `Busy`."""
    kind = reply[0] if isinstance(reply, list) and reply else None
    if kind == CLAIM_REPLAY:
        return Replay(reply[1])
    if kind == CLAIM_CLAIMED:
        return Claimed(int(reply[1]))
    if kind == CLAIM_BUSY:
        return Busy(decode_lease(reply[1], int(reply[2])))
    raise _unexpected("claim", reply)


def parse_stored(reply: Any) -> Replay | None:
    """A plain GET of the result key: the stored envelope as a `Replay`, or None."""
    if reply is None:
        return None
    return Replay(reply if isinstance(reply, bytes) else str(reply).encode())


def parse_settle(reply: Any) -> Settled:
    """settle.lua's reply."""
    if not isinstance(reply, list) or len(reply) < 2:
        raise _unexpected("settle", reply)
    return Settled(bool(reply[0]), _text(reply[1]))


def parse_flags(reply: Any) -> list[bool]:
    """renew.lua's and session_renew.lua's reply: one flag per item, True where still held."""
    if not isinstance(reply, list):
        raise _unexpected("renew", reply)
    return [bool(x) for x in reply]


def parse_release(reply: Any) -> bytes | None:
    """release.lua's reply: the released lease's value, or None (no lease was held)."""
    if not isinstance(reply, list) or not reply:
        raise _unexpected("release", reply)
    return bytes(reply[1]) if reply[0] else None


def parse_stream_append(reply: Any) -> bool:
    """stream_append.lua's reply: False when the lease is no longer the appender's."""
    return bool(reply)


def parse_session(reply: Any) -> SessionReply:
    """session.lua's acquire reply as a `Grant`, `Queued`, `Taken` or `QueueFull`."""
    kind = _text(reply[0]) if isinstance(reply, list) and reply else ""
    if kind == "H":
        grant = parse_grant(_text(reply[1]), _text(reply[2]))
        if len(reply) > 3:
            flat = [v if isinstance(v, bytes) else str(v).encode() for v in reply[3] or ()]
            conversation = dict(zip(flat[0::2], flat[1::2], strict=True))
            grant = Grant(grant.ticket, grant.fence, grant.skipped, grant.late, conversation)
        return grant
    if kind == "Q":
        return Queued(_text(reply[1]), int(reply[2]), int(reply[3]), int(reply[4]))
    if kind == "B":
        return Taken(int(reply[1]), int(reply[2]), int(reply[3]))
    if kind == "O":
        return QueueFull(int(reply[1]), int(reply[2]))
    raise _unexpected("session", reply)


def parse_session_release(reply: Any) -> bool:
    """session.lua's release reply: True when the ticket held or waited."""
    if not isinstance(reply, list) or len(reply) < 2 or _text(reply[0]) != "X":
        raise _unexpected("session release", reply)
    return bool(int(reply[1]))


BudgetReply = tuple[int, int, int, int]
"""budget.lua's reply: (granted keys, ms left in the key window, bytes stored, ms until the
oldest byte bucket stops counting)."""


def parse_budget(reply: Any) -> BudgetReply:
    """budget.lua's reply as four integers."""
    granted, key_ms, stored, byte_ms = (int(x) for x in reply)
    return granted, key_ms, stored, byte_ms


def parse_conversation(reply: Any) -> ConversationReply:
    """conversation.lua's reply."""
    status = _text(reply[0]) if isinstance(reply, list) and reply else ""
    if status == "OK":
        return Committed(int(reply[1]), int(reply[2]))
    if status == "LOST":
        return CommitLost()
    if status == "TURN":
        return TurnMoved(int(reply[1]))
    if status == "FULL":
        return TooFull(int(reply[1]), int(reply[2]))
    raise _unexpected("conversation", reply)


def claim_again(started: float, now: float, renew_after: float) -> bool:
    """Whether a claim that won the lease must be sent again (same owner): it took a renewal
    period or more (retries, a slow WAIT), so part of the lease is gone and the renewer would
    only extend it one period from now. The repeat extends the lease if it is still ours, or
    reports who took the token after it ran out."""
    return now - started > renew_after


class ReadFirst:
    """Whether a claim reads the result key with a plain GET before it runs the claim script.

    Both orders are correct (the claim script replays a stored result too); they cost
    differently. Read first, a replay is one GET and no script, and a fresh call pays one round
    trip more; claim first, a fresh call is one round trip and a replay runs the script. So each
    store reads first while replays are common among its recent claims: more than one in ten, in
    a moving average over about the last 32 claims (from claim first, four replays in a row
    switch; after a run of replays, about 70 fresh calls in a row switch back).
    """

    __slots__ = ("rate",)

    SHARE = 0.1
    """The share of replays above which a claim reads first."""
    WEIGHT = 1 / 32
    """How much one claim's outcome moves the average."""

    def __init__(self) -> None:
        self.rate = 0.0

    def __bool__(self) -> bool:
        return self.rate >= self.SHARE

    def saw(self, replay: bool) -> None:
        """Count one claim's outcome: a stored result found (``replay``) or not."""
        self.rate += ((1.0 if replay else 0.0) - self.rate) * self.WEIGHT


# -- builders -------------------------------------------------------------------------------------


class Commands:
    """The calls of one store: each script's keys and arguments, with the store's settings."""

    __slots__ = ("fence_ttl", "lease_ttl", "lease_ttl_ms", "publish", "result_ttl")

    def __init__(self, config: DedupConfig, *, cluster: bool) -> None:
        self.lease_ttl_ms = config.lease_ttl_ms
        self.lease_ttl = str(config.lease_ttl_ms).encode()
        self.result_ttl = str(config.result_ttl_ms).encode()
        self.fence_ttl = str(config.fence_ttl_ms).encode()
        self.publish = "SPUBLISH" if cluster else "PUBLISH"
        """Notifications use sharded pub/sub on a cluster."""

    def stored(self, keys: TokenKeys) -> Read[Replay | None]:
        """A plain GET of the result key: a replay costs no script. Sent before claim.lua
        while replays are common (`ReadFirst`); the script still replays a result stored in
        between."""
        return Read(keys.result, ("GET", keys.result), parse_stored)

    def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> Call[ClaimReply]:
        """claim.lua: replay, take the lease under ``owner``, or report who holds it."""
        return Call(
            SCRIPTS["claim"],
            (keys.lease, keys.fence, keys.result),
            (owner, self.lease_ttl, meta, self.fence_ttl),
            parse_claim,
        )

    def settle(
        self, keys: TokenKeys, owner: str, fence: int, stored: bytes, message: bytes
    ) -> Call[Settled]:
        """settle.lua: store ``stored`` (unless empty), drop the lease, publish ``message``
        (sent as ``''`` when it is the stored envelope's value message: the script builds it)."""
        if (
            len(message) == len(stored) + 1
            and message.startswith(MSG_VALUE)
            and message.endswith(stored)
        ):
            message = b""
        return Call(
            SCRIPTS["settle"],
            (keys.lease, keys.fence, keys.result),
            (owner, str(fence), stored, self.result_ttl, keys.channel, message, self.publish),
            parse_settle,
        )

    def renew(self, leases: Sequence[HeldLeaseRef]) -> Call[list[bool]]:
        """renew.lua: extend every lease of ``leases`` (their keys share one hash slot)."""
        keys: list[bytes] = []
        args: list[bytes] = [self.lease_ttl, self.fence_ttl]
        for ref in leases:
            keys += (ref.keys.lease, ref.keys.fence, ref.keys.result)
            args.append(ref.value)
        return Call(SCRIPTS["renew"], tuple(keys), tuple(args), parse_flags)

    def release(self, keys: TokenKeys, owner: str = "") -> Call[bytes | None]:
        """release.lua: delete the lease (``owner``'s, or whoever's when empty), wake waiters."""
        return Call(
            SCRIPTS["release"],
            (keys.lease, keys.fence),
            (keys.channel, self.publish, self.fence_ttl, owner),
            parse_release,
        )

    def stream_append(
        self,
        keys: TokenKeys,
        owner: str,
        fence: int,
        items: Sequence[tuple[bytes, bytes]],
        ttl_ms: int,
        seq: int,
    ) -> Call[bool]:
        """stream_append.lua: append (kind, data) items, the first numbered ``seq``, fenced."""
        args: list[Arg] = [owner, fence, ttl_ms, keys.channel, self.publish, seq]
        for kind, data in items:
            args += (kind, data)
        return Call(
            SCRIPTS["stream_append"],
            (keys.lease, keys.fence, keys.stream),
            tuple(args),
            parse_stream_append,
        )

    def _session(
        self, keys: SessionKeys, args: Sequence[Arg], idle_ttl_ms: int, parse: Callable[[Any], R]
    ) -> Call[R]:
        return Call(
            SCRIPTS["session"],
            (*keys.all, keys.conversation),
            (*args, keys.channel, self.publish, idle_ttl_ms),
            parse,
        )

    def session_acquire(
        self,
        keys: SessionKeys,
        *,
        ticket: str,
        owner: str,
        mode: str,
        limit: int,
        max_queue: int,
        meta: str,
        seq: int | None,
        gap_ms: int,
        first_seq: int | None,
        idle_ttl_ms: int,
    ) -> Call[SessionReply]:
        """session.lua ``acquire``: join (or ask again with ``ticket``) the holders or queue."""
        args: list[Arg] = [
            "acquire",
            ticket,
            owner,
            mode,
            limit,
            max_queue,
            self.lease_ttl_ms,
            meta,
            "" if seq is None else seq,
            gap_ms,
            "" if first_seq is None else first_seq,
        ]
        return self._session(keys, args, idle_ttl_ms, parse_session)

    def session_release(self, keys: SessionKeys, ticket: str, idle_ttl_ms: int) -> Call[bool]:
        """session.lua ``release``: give a place up (holder or waiter); the next is admitted."""
        args: list[Arg] = ["release", ticket, "", "queue", 1, 0, self.lease_ttl_ms, "", "", 0, ""]
        return self._session(keys, args, idle_ttl_ms, parse_session_release)

    def session_renew(self, tickets: Sequence[HeldTicketRef]) -> Call[list[bool]]:
        """session_renew.lua: extend every ticket of ``tickets`` (one hash slot)."""
        keys: list[bytes] = []
        args: list[Arg] = [self.lease_ttl]
        for ref in tickets:
            keys += (ref.keys.holders, ref.keys.qexp)
            args.append(ref.ticket)
        return Call(SCRIPTS["session_renew"], tuple(keys), tuple(args), parse_flags)

    def budget(self, keys: Sequence[bytes], args: Sequence[int]) -> Call[BudgetReply]:
        """budget.lua: reserve new keys for one identity and report the bytes it stored
        (``keys`` from `KeySchema.for_budget`)."""
        return Call(SCRIPTS["budget"], tuple(keys), tuple(args), parse_budget)

    def conversation(
        self,
        keys: SessionKeys,
        items: Sequence[tuple[str, bytes]],
        *,
        ticket: str,
        fence: int,
        turn: int,
        idle_ttl_ms: int,
        max_messages: int,
        max_bytes: int,
    ) -> Call[ConversationReply]:
        """conversation.lua: set ``items`` (a turn's commit when ``ticket`` is a holder's,
        fenced; else a write outside any turn)."""
        args: list[Arg] = [ticket, fence, turn, idle_ttl_ms, max_messages, max_bytes]
        for field, value in items:
            args += (field, value)
        return Call(
            SCRIPTS["conversation"],
            (keys.conversation, keys.holders, keys.state),
            tuple(args),
            parse_conversation,
        )
