"""What a primary's call knows about itself while it runs (`current_call`), and re-entry checks."""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._protocol import Role

if TYPE_CHECKING:
    from .renewer import HeldLease

__all__ = ["CallContext", "LostSignal", "current_call", "is_running", "primary_context"]

log = logging.getLogger("strands_dedup")


class LostSignal(threading.Event):
    """A ``threading.Event`` set when a lease is lost, that can also run callbacks then.

    Hand it (or an event linked to it) to code that polls for cancellation, such as a Strands
    agent's ``cancel_signal``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the signal is set (at once if it already is)."""
        self._callbacks.append(callback)
        if self.is_set():
            callback()

    def set(self) -> None:
        if self.is_set():
            return
        super().set()
        for callback in self._callbacks:
            try:
                callback()
            except Exception:  # a callback must not break the renewer that reports the loss
                log.exception("a lease-lost callback failed")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a primary's call can know about itself (`current_call`)."""

    token: str
    """Display form of the token."""
    scope: str
    fence: int
    """The token's fence: pass it downstream so a store there can refuse a stale writer."""
    role: Role
    """`Role.PRIMARY`, or `Role.TAKEOVER` when this call replaces a failed or crashed one."""
    lost: LostSignal = field(default_factory=LostSignal)
    """Set when the lease is lost (the call should stop: its result will be refused). A
    ``threading.Event``, so it can be handed to code in other threads (a Strands agent's
    ``cancel_signal``)."""
    identity: bytes = b""
    """The call's name across attempts and replicas: ``<namespace>:{<scope>:<token>}`` as
    Redis holds it (what outgoing requests derive their idempotency keys from)."""


class _Running:
    """A primary call running in this context: its lease, its store, and the call it runs
    inside of (None at the outermost)."""

    __slots__ = ("lease", "outer", "where")

    def __init__(self, lease: HeldLease, where: str, outer: _Running | None) -> None:
        self.lease = lease
        self.where = where
        self.outer = outer


_RUNNING: contextvars.ContextVar[_Running | None] = contextvars.ContextVar(
    "strands_dedup_running", default=None
)
"""The primary calls running in this context: the current call, then the calls it runs inside
of (one context variable, set and reset once per call)."""
_CREATE = threading.Lock()
"""Makes a call's `CallContext` once, whichever thread of the call asks first."""


def current_call() -> CallContext | None:
    """The primary call running in this context (its token and fence), or None outside one."""
    running = _RUNNING.get()
    if running is None:
        return None
    lease = running.lease
    context = lease.context
    if context is None:  # made when first asked for: most calls never ask
        with _CREATE:
            context = lease.context
            if context is None:
                keys = lease.keys
                context = CallContext(
                    keys.token, keys.scope, lease.fence, lease.role, identity=keys.identity
                )
                lease.context = context
        # The renewer marks the lease lost before it looks for a context to signal: a loss it
        # reported before this context existed is seen here.
        if lease.lost:
            context.lost.set()
    return context


def is_running(where: str, lease_key: bytes) -> bool:
    """True inside the primary call of this lease (a nested call on it would wait for itself)."""
    running = _RUNNING.get()
    while running is not None:
        if running.lease.keys.lease == lease_key and running.where == where:
            return True
        running = running.outer
    return False


class primary_context:
    """Run a primary's call as `current_call()` (a nested call on its own token is refused)."""

    __slots__ = ("_reset", "_running")

    def __init__(self, lease: HeldLease, where: str) -> None:
        self._running = _Running(lease, where, _RUNNING.get())
        self._reset: contextvars.Token[_Running | None] | None = None

    def __enter__(self) -> None:
        self._reset = _RUNNING.set(self._running)

    def __exit__(self, *exc: object) -> None:
        assert self._reset is not None
        _RUNNING.reset(self._reset)
