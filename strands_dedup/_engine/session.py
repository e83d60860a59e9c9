"""`SessionGuard`: exclusive (or bounded) access to a session, across every replica.

Strands refuses a second concurrent call on one ``Agent`` object (``ConcurrencyException``), but
two replicas each build their own Agent for the same session id and both write its history.
A guard admits at most ``max_concurrent`` holders per session (and, optionally,
``max_concurrent_total`` across the fleet) wherever they run::

    guard = SessionGuard(dedup, mode="queue")
    async with guard.hold("session-42") as hold:   # `with` for a guard over a SyncDeduplicator
        ...                                        # hold.fence grows with every admission

- ``mode="throw"``: a caller that finds the session taken fails at once with `SessionBusy`.
- ``mode="queue"``: callers wait in arrival order (first come, first served across replicas;
  within one process, in the order they asked), up to ``max_queue`` waiters and
  ``queue_timeout`` seconds. The next in line is admitted by the script that frees the place and
  woken by a message on the session's channel, through the deduplicator's shared subscriber.
- ``seq=``: with per-session sequence numbers the queue admits callers in sequence order; a
  missing number is waited for ``gap_timeout`` seconds, then skipped (`SessionHold.skipped`, and
  a warning in the log).

Holders and waiters have leases renewed by the deduplicator's renewer, with its other leases:
a crashed holder, or a crashed caller waiting in the queue, blocks the others for at most one
lease TTL. A holder whose lease is lost (its process stalled past the TTL) sees
`SessionHold.lost` set, and leaving the block raises `LeaseLost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .._errors import BusyReason, DedupError, LeaseLost, SessionBusy
from .._keys import SessionKeys
from .._protocol import (
    Grant,
    Queued,
    QueueFull,
    SessionReply,
    Taken,
    encode_session_meta,
)
from .call import LostSignal
from .engine import Done, Listen
from .renewer import HeldTicket
from .sync import Bridge

if TYPE_CHECKING:
    from types import TracebackType

    from .deduplicator import Deduplicator
    from .sync import SyncDeduplicator

__all__ = ["SessionConfig", "SessionGuard", "SessionHold", "current_session"]

log = logging.getLogger("strands_dedup.session")
T = TypeVar("T")
_TOTAL_QUEUE = 1_000_000

_CURRENT_SESSION: contextvars.ContextVar[SessionHold | None] = contextvars.ContextVar(
    "strands_dedup_session", default=None
)


def current_session() -> SessionHold | None:
    """The session hold this code runs inside (`SessionGuard.hold`), or None."""
    return _CURRENT_SESSION.get()


class SessionConfig(BaseModel):
    """How a `SessionGuard` admits callers (durations in seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["throw", "queue"] = Field(
        "queue",
        description='`"throw"`: a caller finding the session taken fails at once with '
        '`SessionBusy` (reason `taken`, with `retry_after`); `"queue"`: callers wait their '
        "turn.",
    )
    max_concurrent: int = Field(1, ge=1, le=10_000, description="Holders of one session at once.")
    max_concurrent_total: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Holders of every session at once, fleet-wide (`None`: no bound).",
    )
    max_queue: int = Field(
        1000,
        ge=0,
        le=_TOTAL_QUEUE,
        description='Callers waiting per session (`mode="queue"` only); one more fails at once '
        "with `SessionBusy` (reason `queue_full`, with `depth`).",
    )
    queue_timeout: float | None = Field(
        None,
        gt=0,
        description="Longest wait in the queue, then `SessionBusy` (reason `queue_timeout`); "
        "`None`: the deduplicator's `wait_timeout`; per call: `hold(..., timeout=)`.",
    )
    gap_timeout: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="How long a missing sequence number is waited for before it is skipped.",
    )
    first_seq: int | None = Field(
        None,
        ge=0,
        description="The number a new session's sequence starts at (`None`: the first one seen).",
    )
    idle_ttl: float = Field(
        86400.0, gt=0, description="The keys of a session nobody enters for this long expire."
    )

    @model_validator(mode="after")
    def _max_queue_needs_queue_mode(self) -> SessionConfig:
        if self.mode == "throw" and "max_queue" in self.model_fields_set:
            raise ValueError("max_queue applies to mode='queue' only")
        return self


@dataclass(eq=False)
class SessionHold:
    """One admission to a session, for as long as the ``async with`` / ``with`` block runs."""

    session: str
    """Display form of the session name."""
    fence: int
    """Grows with every admission to the session: pass it downstream to refuse stale writers."""
    seq: int | None
    """The sequence number the caller gave, if any."""
    skipped: tuple[int, int] | None
    """Sequence numbers (inclusive range) given up on to admit this holder after a gap."""
    late: bool
    """The caller's sequence number had already been passed (it came after a skip)."""
    waited: float
    """Seconds spent waiting for admission."""
    lost: LostSignal = field(default_factory=LostSignal)
    """Set when the hold's lease is lost; another caller may be admitted. A ``threading.Event``
    so that code in other threads (a Strands agent's ``cancel_signal``) can watch it."""
    _tickets: list[HeldTicket] = field(default_factory=list, repr=False)
    _conversation: dict[bytes, bytes] | None = field(default=None, repr=False)
    """The session's conversation hash as the admission read it (None: not read with it)."""


def holder_ticket(hold: SessionHold) -> str:
    """The ticket a hold holds its session with (what fenced writes under it name)."""
    return hold._tickets[0].ticket


def admitted_conversation(hold: SessionHold) -> dict[bytes, bytes] | None:
    """The session's conversation hash as the admission read it, or None when the admission
    came as a message (after a wait in the queue) and did not read it."""
    return hold._conversation


def _lease_lost(hold: SessionHold) -> Any:
    def lost(ticket: HeldTicket) -> None:
        log.warning(
            "hold on session %r (fence %d) was lost: another caller may be admitted",
            hold.session,
            hold.fence,
        )
        hold.lost.set()

    return lost


class _Hold:
    """The context manager `SessionGuard.hold` returns (``async with`` and ``with``)."""

    __slots__ = ("_guard", "_hold", "_name", "_reset", "_seq", "_timeout")

    def __init__(
        self, guard: SessionGuard, name: str | bytes, seq: int | None, timeout: float | None
    ) -> None:
        self._guard, self._name, self._seq, self._timeout = guard, name, seq, timeout
        self._hold: SessionHold | None = None
        self._reset: contextvars.Token[SessionHold | None] | None = None

    async def __aenter__(self) -> SessionHold:
        hold = await self._guard._on_core(
            self._guard._acquire(self._name, self._seq, self._timeout)
        )
        self._hold, self._reset = hold, _CURRENT_SESSION.set(hold)
        return hold

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        hold = self._exit()
        await asyncio.shield(self._guard._on_core(self._guard._release(hold)))
        self._raise_if_lost(hold, exc)

    def __enter__(self) -> SessionHold:
        hold = self._guard._blocking(self._guard._acquire(self._name, self._seq, self._timeout))
        self._hold, self._reset = hold, _CURRENT_SESSION.set(hold)
        return hold

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        hold = self._exit()
        self._guard._blocking(self._guard._release(hold))
        self._raise_if_lost(hold, exc)

    def _exit(self) -> SessionHold:
        if self._hold is None:
            raise RuntimeError("the session hold was not entered")
        if self._reset is not None:
            with contextlib.suppress(ValueError):  # entered in another task's context
                _CURRENT_SESSION.reset(self._reset)
            self._reset = None
        return self._hold

    @staticmethod
    def _raise_if_lost(hold: SessionHold, exc: BaseException | None) -> None:
        if hold.lost.is_set() and exc is None:
            raise LeaseLost(
                f"the hold on session {hold.session!r} (fence {hold.fence}) was lost while the "
                "block ran: another caller may have been admitted meanwhile",
                token=None,
                fence=hold.fence,
            )


class SessionGuard:
    """Exclusive (or bounded) access to named sessions across every replica sharing a Redis.

    ``dedup`` is a `Deduplicator` (enter holds with ``async with``) or a `SyncDeduplicator`
    (``with``, or ``async with`` from any event loop). Options are `SessionConfig` fields; every
    replica guarding the same sessions must use the same limits.
    """

    def __init__(self, dedup: Deduplicator | SyncDeduplicator, **options: Any) -> None:
        self.config = SessionConfig(**options)
        self._bridge = Bridge(dedup, "SessionGuard")
        self.engine = self._bridge.engine
        """The engine the guard's holds run on (the deduplicator's)."""
        self.dedup = dedup
        core_config = self.engine.config
        self._queue_timeout = (
            self.config.queue_timeout
            if self.config.queue_timeout is not None
            else core_config.wait_timeout
        )
        self._gap_ms = int(self.config.gap_timeout * 1000)
        self._idle_ms = int(self.config.idle_ttl * 1000)
        self._grace = core_config.takeover_grace
        self._enqueueing: dict[bytes, tuple[asyncio.Lock, list[int]]] = {}

    def hold(
        self, session: str | bytes, *, seq: int | None = None, timeout: float | None = None
    ) -> _Hold:
        """Enter ``session`` for the duration of a ``with`` / ``async with`` block.

        ``seq``: this caller's per-session sequence number (queue mode), admitted in order.
        ``timeout``: longest wait in the queue (default ``queue_timeout``). Raises `SessionBusy`
        when the session cannot be entered, `InvalidToken` for an unusable name.
        """
        if seq is not None:
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
                raise ValueError(f"seq must be a non-negative int, not {seq!r}")
            if self.config.mode == "throw":
                raise ValueError("seq= orders a queue; it has no meaning with mode='throw'")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.engine.keys.for_session(session)  # validate the name now, not inside the block
        return _Hold(self, session, seq, timeout)

    # -- running on the deduplicator's loop ---------------------------------------------------

    async def _on_core(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._bridge.run(coro)

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._bridge.block(
            coro,
            "this SessionGuard wraps an asyncio Deduplicator whose loop does not run in another "
            "thread: enter it with `async with`, or build the guard over a SyncDeduplicator",
        )

    # -- admission ------------------------------------------------------------------------------

    async def _acquire(
        self, name: str | bytes, seq: int | None, timeout: float | None
    ) -> SessionHold:
        keys = self.engine.keys.for_session(name)
        started = time.monotonic()
        deadline = started + (self._queue_timeout if timeout is None else timeout)
        cfg = self.config
        ticket, grant = await self._enter(
            keys, seq, deadline, cfg.mode, cfg.max_concurrent, cfg.max_queue
        )
        tickets = [ticket]
        try:
            if cfg.max_concurrent_total is not None:
                total, _ = await self._enter(
                    self.engine.keys.for_total(),
                    None,
                    deadline,
                    cfg.mode,
                    cfg.max_concurrent_total,
                    _TOTAL_QUEUE,
                )
                tickets.append(total)
        except BaseException:
            await asyncio.shield(self._leave(ticket))
            raise
        hold = SessionHold(
            keys.name,
            grant.fence,
            seq,
            grant.skipped,
            grant.late,
            time.monotonic() - started,
            _tickets=tickets,
            _conversation=grant.conversation,
        )
        for held in tickets:
            held.on_lost = _lease_lost(hold)
            if held.lost:  # lost between the admission and now
                hold.lost.set()
        if grant.skipped is not None:
            log.warning(
                "session %r: sequence numbers %d..%d did not come within %gs; skipped to admit %d",
                keys.name,
                grant.skipped[0],
                grant.skipped[1],
                cfg.gap_timeout,
                seq,
            )
        self.engine.sessions.change(keys, held=1)
        return hold

    async def _release(self, hold: SessionHold) -> None:
        for ticket in reversed(hold._tickets):
            await self._leave(ticket)
        self.engine.sessions.change(hold._tickets[0].keys, held=-1)

    async def _leave(self, ticket: HeldTicket) -> None:
        """Give the place up (holder or waiter); the script admits the next in line."""
        self.engine.renewer.discard_ticket(ticket)
        try:
            await self.engine.store.session_release(ticket.keys, ticket.ticket, self._idle_ms)
        except DedupError as exc:
            log.warning(
                "could not leave session %r (its place frees itself within lease_ttl): %s",
                ticket.keys.name,
                exc,
            )

    async def _ask(
        self,
        keys: SessionKeys,
        ticket: str,
        owner: str,
        mode: str,
        limit: int,
        max_queue: int,
        seq: int | None,
    ) -> SessionReply:
        """Join the session (``ticket`` ""), or ask again where ``ticket`` stands."""
        store = self.engine.store
        call = store.commands.session_acquire(
            keys,
            ticket=ticket,
            owner=owner,
            mode=mode,
            limit=limit,
            max_queue=max_queue,
            meta=encode_session_meta(keys.name, seq, int(time.time() * 1000)),
            seq=seq,
            gap_ms=self._gap_ms,
            first_seq=self.config.first_seq,
            idle_ttl_ms=self._idle_ms,
        )
        return await store.run(call)

    async def _enter(
        self,
        keys: SessionKeys,
        seq: int | None,
        deadline: float,
        mode: str,
        limit: int,
        max_queue: int,
    ) -> tuple[HeldTicket, Grant]:
        engine = self.engine
        owner = engine.new_owner()
        lock, users = self._enqueue_lock(keys)
        try:
            async with lock:  # callers of one process join the queue in the order they came
                reply = await self._ask(keys, "", owner, mode, limit, max_queue, seq)
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._enqueueing[keys.holders]
        if isinstance(reply, Taken):
            raise SessionBusy(
                f"session {keys.name!r} is taken ({reply.holders} holder(s), "
                f"{reply.depth} waiting)",
                session=keys.name,
                reason=BusyReason.TAKEN,
                holders=reply.holders,
                depth=reply.depth,
                retry_after=reply.retry_ms / 1000,
            )
        if isinstance(reply, QueueFull):
            raise self._queue_full(keys, reply)
        ticket = HeldTicket(keys, reply.ticket)
        engine.renewer.add_ticket(ticket)
        if isinstance(reply, Grant):
            return ticket, reply  # the uncontended path: no subscription at all
        engine.sessions.change(keys, waiting=1)
        queue = _QueueWait(self, keys, ticket, reply, (owner, mode, limit, max_queue, seq))
        try:
            # Registered after the caller joined the queue: once Redis confirms the
            # subscription, the first step asks again, so a grant published before is not missed.
            return ticket, await engine.wait_for(keys.channel, deadline, queue)
        except BaseException:
            await asyncio.shield(self._leave(ticket))
            raise
        finally:
            engine.sessions.change(keys, waiting=-1)

    def _enqueue_lock(self, keys: SessionKeys) -> tuple[asyncio.Lock, list[int]]:
        entry = self._enqueueing.get(keys.holders)
        if entry is None:
            entry = self._enqueueing[keys.holders] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        return entry[0], entry[1]

    def _queue_full(self, keys: SessionKeys, reply: QueueFull) -> SessionBusy:
        return SessionBusy(
            f"the queue of session {keys.name!r} is full ({reply.depth} waiting, max_queue="
            f"{self.config.max_queue})",
            session=keys.name,
            reason=BusyReason.QUEUE_FULL,
            holders=reply.holders,
            depth=reply.depth,
        )


class _QueueWait:
    """A caller waiting in a session's queue (`WaitHooks` of `Engine.wait`): admitted by a grant
    message naming its ticket, or by asking again when a lease or a gap may have expired (the
    reply says when) or the subscriber reconnected."""

    def __init__(
        self,
        guard: SessionGuard,
        keys: SessionKeys,
        ticket: HeldTicket,
        queued: Queued,
        ask: tuple[str, str, int, int, int | None],
    ) -> None:
        self.guard, self.keys, self.ticket, self.ask = guard, keys, ticket, ask
        self.depth = queued.depth

    async def read(self, not_before: float) -> Done[Grant] | Listen:
        guard, keys, ticket = self.guard, self.keys, self.ticket
        reply = await guard._ask(keys, ticket.ticket, *self.ask)
        if isinstance(reply, Grant):
            return Done(reply)
        if isinstance(reply, QueueFull):  # our entry had expired and the queue filled up
            raise guard._queue_full(keys, reply)
        if isinstance(reply, Taken):  # pragma: no cover - queue mode never answers this
            raise AssertionError(reply)
        renewer = guard.engine.renewer
        if reply.ticket != ticket.ticket or ticket.lost:
            log.warning(
                "session %r: a waiter's place had expired (was its process stalled?); it "
                "joined the queue again at the tail",
                keys.name,
            )
            renewer.discard_ticket(ticket)
            ticket.ticket, ticket.lost = reply.ticket, False
            renewer.add_ticket(ticket)
        self.depth = reply.depth
        return Listen(time.monotonic() + reply.wake_ms / 1000 + guard._grace)

    async def heard(self, event: Any, listening: Listen) -> Done[Grant] | Listen | None:
        if isinstance(event, Grant):
            if event.ticket == self.ticket.ticket:
                return Done(event)
            return listening  # somebody else's turn: the queue moved
        return None

    def expired(self) -> SessionBusy:
        return SessionBusy(
            f"not admitted to session {self.keys.name!r} before the queue timeout "
            f"({self.depth} waiting)",
            session=self.keys.name,
            reason=BusyReason.QUEUE_TIMEOUT,
            holders=None,
            depth=self.depth,
        )
