"""One renewer per deduplicator (so per event loop): every held lease, one round trip a period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._keys import SessionKeys, TokenKeys
from .._protocol import Role
from .._store import HeldLeaseRef, RedisStore
from .._store.redis import HeldTicketRef

if TYPE_CHECKING:
    from .call import CallContext

__all__ = ["HeldLease", "HeldTicket", "Renewer"]

log = logging.getLogger("strands_dedup.renewer")


@dataclass(eq=False, slots=True)
class HeldLease:
    """A lease this process holds while its primary runs."""

    keys: TokenKeys
    owner: str
    fence: int
    value: bytes
    role: Role
    fingerprint: str | None
    started: float = field(default_factory=time.monotonic)
    lost: bool = False
    ending: bool = False
    """Its completion or release is under way: a renewal refused now is no loss to report
    (the completion's own reply says whether the lease was still ours)."""
    task: asyncio.Task[Any] | None = None
    """The primary's task, set only when a lost lease should cancel it."""
    cancelling: bool = False
    context: CallContext | None = None
    """What the running call sees as `current_call()`; its ``lost`` is set with the lease."""


@dataclass(eq=False, slots=True)
class HeldTicket:
    """A session ticket this process holds, or waits in a session's queue with."""

    keys: SessionKeys
    ticket: str
    on_lost: Callable[[HeldTicket], None] | None = None
    lost: bool = False


class Renewer:
    """Renews all held leases together, every ``interval`` seconds, with one script call.

    Session tickets (held or queued, see `SessionGuard`) are renewed in the same period with one
    more script call. The task exists only while something is held. A lease found lost (another
    owner claimed the token, or a result is stored) is dropped and reported to ``on_lost``; a
    lost ticket to its own ``on_lost``.
    """

    def __init__(
        self, store: RedisStore, interval: float, on_lost: Callable[[HeldLease], None]
    ) -> None:
        self._store = store
        self._interval = interval
        self._on_lost = on_lost
        self._held: dict[str, HeldLease] = {}
        self._tickets: dict[HeldTicket, None] = {}
        self._task: asyncio.Task[None] | None = None
        self._inbox: list[tuple[bool, HeldLease]] = []
        """Leases added (True) and dropped (False) from other threads, taken in each period."""
        self._inbox_lock = threading.Lock()
        self._running = False
        """A renewal task runs, or is about to: it takes the inbox before it ends (both under
        ``_inbox_lock``), so a lease added from another thread needs no wake-up then."""
        self.last_renewal: float | None = None
        self.lag = 0.0
        """How late the last renewal finished after it was due (seconds)."""

    @property
    def running(self) -> bool:
        """Whether the renewal task runs (it ends once nothing is held)."""
        return self._task is not None and not self._task.done()

    @property
    def held(self) -> int:
        return len(self._current())

    @property
    def leases(self) -> list[HeldLease]:
        """The leases renewed right now."""
        return list(self._current().values())

    def _current(self) -> dict[str, HeldLease]:
        with self._inbox_lock:
            if not self._inbox:
                return self._held
            held = dict(self._held)
            for added, lease in self._inbox:
                if added:
                    held[lease.owner] = lease
                else:
                    held.pop(lease.owner, None)
            return held

    @property
    def tickets(self) -> int:
        return len(self._tickets)

    def add(self, lease: HeldLease) -> None:
        self._held[lease.owner] = lease
        self._start()

    def discard(self, lease: HeldLease) -> None:
        self._held.pop(lease.owner, None)

    def add_from_thread(self, lease: HeldLease, loop: asyncio.AbstractEventLoop) -> None:
        """`add` from a thread other than the one running ``loop`` (this renewer's). While
        the renewal task runs this costs a list append: the lease is renewed from the next
        period on, as one added on the loop is; otherwise the task is started on ``loop``."""
        with self._inbox_lock:
            self._inbox.append((True, lease))
            if self._running:
                return
            self._running = True
        loop.call_soon_threadsafe(self._start)

    def discard_from_thread(self, lease: HeldLease) -> None:
        """`discard` from another thread (taken at the next period)."""
        with self._inbox_lock:
            self._inbox.append((False, lease))

    def _take_inbox(self) -> None:
        """Apply what other threads added and dropped (holding ``_inbox_lock``)."""
        for added, lease in self._inbox:
            if added:
                self._held[lease.owner] = lease
            else:
                self._held.pop(lease.owner, None)
        self._inbox.clear()

    def add_ticket(self, ticket: HeldTicket) -> None:
        self._tickets[ticket] = None
        self._start()

    def discard_ticket(self, ticket: HeldTicket) -> None:
        self._tickets.pop(ticket, None)

    def _start(self) -> None:
        if self._task is None or self._task.done():
            with self._inbox_lock:
                self._running = True
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="strands-dedup-renewer"
            )

    async def _run(self) -> None:
        try:
            await self._periods()
        finally:
            with self._inbox_lock:
                self._running = False

    async def _periods(self) -> None:
        while True:
            due = time.monotonic() + self._interval
            await asyncio.sleep(self._interval)
            with self._inbox_lock:
                self._take_inbox()
                if not self._held and not self._tickets:
                    self._running = False
                    return
            leases = list(self._held.values())
            tickets = list(self._tickets)
            # Bounded by one period, retries included: a store (or, on a cluster, a shard) that
            # does not answer must not hold up the next period's renewals.
            within = self._interval
            renewed = await asyncio.gather(
                self._store.renew([HeldLeaseRef(x.keys, x.value) for x in leases], within),
                self._store.renew_tickets(
                    [HeldTicketRef(x.keys, x.ticket) for x in tickets], within
                ),
                return_exceptions=True,
            )
            failed = False
            for what, reply in zip(("lease", "session"), renewed, strict=True):
                if isinstance(reply, BaseException):  # keep renewing: the next period may work
                    if not isinstance(reply, Exception):
                        raise reply
                    log.warning("%s renewal failed: %s", what, reply)
                    failed = True
                elif None in reply:  # a shard did not answer (logged by the store)
                    failed = True
            if not failed:
                self.last_renewal = time.monotonic()
                self.lag = max(0.0, self.last_renewal - due)
            if isinstance(renewed[0], list):
                for lease, ok in zip(leases, renewed[0], strict=True):
                    if (
                        ok is False
                        and not lease.ending
                        and self._held.pop(lease.owner, None) is not None
                    ):
                        lease.lost = True
                        self._on_lost(lease)
            if isinstance(renewed[1], list):
                for ticket, ok in zip(tickets, renewed[1], strict=True):
                    if ok is False and ticket in self._tickets:
                        del self._tickets[ticket]
                        ticket.lost = True
                        if ticket.on_lost is not None:
                            ticket.on_lost(ticket)

    async def aclose(self) -> None:
        self._held.clear()
        self._tickets.clear()
        with self._inbox_lock:
            self._inbox.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
