"""What a primary's call knows about itself while it runs (`current_call`), and re-entry checks."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
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


_CURRENT_CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "strands_dedup_call", default=None
)
_RUNNING: contextvars.ContextVar[frozenset[tuple[str, bytes]]] = contextvars.ContextVar(
    "strands_dedup_running", default=frozenset()
)
"""The (store, lease key) of every primary running in this context: the current call and the
calls it runs inside of."""


def current_call() -> CallContext | None:
    """The primary call running in this context (its token and fence), or None outside one."""
    return _CURRENT_CALL.get()


def is_running(where: str, lease_key: bytes) -> bool:
    """True inside the primary call of this lease (a nested call on it would wait for itself)."""
    return (where, lease_key) in _RUNNING.get()


@contextlib.contextmanager
def primary_context(lease: HeldLease, where: str) -> Iterator[CallContext]:
    """Run a primary's call as `current_call()` (a nested call on its own token is refused)."""
    keys = lease.keys
    context = lease.context = CallContext(
        keys.token, keys.scope, lease.fence, lease.role, identity=keys.identity
    )
    call_token = _CURRENT_CALL.set(context)
    running_token = _RUNNING.set(_RUNNING.get() | {(where, keys.lease)})
    try:
        yield context
    finally:
        _RUNNING.reset(running_token)
        _CURRENT_CALL.reset(call_token)
