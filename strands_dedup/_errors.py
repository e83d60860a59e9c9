"""Errors raised by strands-dedup.

Every error the library raises on purpose derives from one root::

    DedupError
    ├── DuplicateInFlight     another caller holds the token and on_duplicate="raise"
    ├── WaitTimeout           a duplicate waited longer than its wait_timeout
    ├── FingerprintMismatch   the token was first used for a different request (HTTP 422)
    ├── LeaseLost             a late primary: its completion was refused (fenced off)
    ├── PrimaryFailed         the primary raised; the failure was shared with this duplicate
    │   └── NotStored         the primary's value was handed to the duplicates waiting then,
    │                         but not stored (``shared``); a later retry runs again
    ├── StoreUnavailable      Redis could not be reached in bounded time
    │   ├── StoreRefused      Redis answered with a refusal: credentials or a permission
    │   │                     (NOAUTH, WRONGPASS, NOPERM), out of memory (OOM), a read-only
    │   │                     replica (READONLY), a busy script (BUSY), a script it cannot load
    │   │                     (NOSCRIPT after a reload) or an eviction policy refused by
    │   │                     require_noeviction (``server_message``)
    │   └── OutcomeUnknown    a completion was sent but whether Redis applied it cannot be known
    ├── ResultTooLarge        the serialized result exceeds max_result_bytes
    ├── SerializationError    the result could not be serialized or deserialized
    ├── InvalidToken          the token or scope cannot be used (also a ValueError)
    ├── ReentrantCall         a call on the token of a primary that is running in this context
    ├── SessionBusy           a guarded session is taken (mode "throw"), its queue is full, or
    │                         the wait in its queue passed queue_timeout (see ``reason``)
    ├── UnkeyedRequest        an outgoing unsafe request could not be given an idempotency key
    │                         (a streamed body over the bound; outside a call, when strict):
    │                         nothing was sent
    └── ConversationError     a session's stored conversation does not parse, or a write would
                              take it past its bounds (messages, bytes); nothing was written

Each error carries the display form of the token it is about (``token``) where there is one.
"""

from __future__ import annotations

import enum

__all__ = [
    "BusyReason",
    "ConversationError",
    "DedupError",
    "DuplicateInFlight",
    "FingerprintMismatch",
    "InvalidToken",
    "LeaseLost",
    "NotStored",
    "OutcomeUnknown",
    "PrimaryFailed",
    "ReentrantCall",
    "ResultTooLarge",
    "SerializationError",
    "SessionBusy",
    "StoreRefused",
    "StoreUnavailable",
    "UnkeyedRequest",
    "WaitTimeout",
]


class DedupError(Exception):
    """Root of every error strands-dedup raises on purpose."""

    def __init__(self, message: str, *, token: str | None = None) -> None:
        super().__init__(message)
        self.token = token


class DuplicateInFlight(DedupError):
    """The token is held by a live primary and ``on_duplicate="raise"`` was asked for."""

    def __init__(
        self, message: str, *, token: str | None, owner: str, fence: int, retry_after: float
    ) -> None:
        super().__init__(message, token=token)
        self.owner = owner
        self.fence = fence
        self.retry_after = retry_after


class WaitTimeout(DedupError):
    """A duplicate waited ``wait_timeout`` seconds without getting a result."""

    def __init__(self, message: str, *, token: str | None, waited: float) -> None:
        super().__init__(message, token=token)
        self.waited = waited


class FingerprintMismatch(DedupError):
    """The token is already in use (in flight or completed) for a different request."""


class LeaseLost(DedupError):
    """The primary lost its lease: another caller claimed the token, so this result is refused."""

    def __init__(self, message: str, *, token: str | None, fence: int) -> None:
        super().__init__(message, token=token)
        self.fence = fence


class PrimaryFailed(DedupError):
    """The primary raised; its failure is handed to this duplicate (or replayed when cached)."""

    def __init__(
        self, message: str, *, token: str | None, error_type: str, error_message: str, fence: int
    ) -> None:
        super().__init__(message, token=token)
        self.error_type = error_type
        self.error_message = error_message
        self.fence = fence


class NotStored(PrimaryFailed):
    """The primary's value was not stored (its caller chose so: an HTTP response too large to
    keep, or with a status that is not kept); the duplicates waiting at that moment get this,
    with the value's bytes in ``shared`` when the primary handed them over (else empty)."""

    def __init__(self, message: str, *, token: str | None, reason: str, shared: bytes, fence: int):
        super().__init__(
            message, token=token, error_type="not-stored", error_message=reason, fence=fence
        )
        self.reason = reason
        self.shared = shared


class StoreUnavailable(DedupError):
    """Redis could not be reached in bounded time, or refused what was asked (`StoreRefused`)."""


class StoreRefused(StoreUnavailable):
    """Redis answered, with a refusal: retrying the same thing will not help until its cause
    (credentials, permissions, memory, a replica taken for the primary, ...) is fixed."""

    def __init__(self, message: str, *, server_message: str, token: str | None = None) -> None:
        super().__init__(message, token=token)
        self.server_message = server_message
        """What Redis said (for example ``OOM command not allowed when used memory > ...``)."""


class OutcomeUnknown(StoreUnavailable):
    """A primary's completion was sent, but Redis did not answer within the wait budget: its
    result may or may not be stored (a later call on the token replays it, or runs again)."""

    def __init__(self, message: str, *, token: str | None, fence: int) -> None:
        super().__init__(message, token=token)
        self.fence = fence


class ResultTooLarge(DedupError):
    """The serialized result is larger than ``max_result_bytes``; nothing was stored."""

    def __init__(self, message: str, *, token: str | None, size: int, limit: int) -> None:
        super().__init__(message, token=token)
        self.size = size
        self.limit = limit


class SerializationError(DedupError):
    """A result could not be serialized, or stored bytes could not be turned back into a value."""


class InvalidToken(DedupError, ValueError):
    """A token or scope is empty, of the wrong type, or too long to be used."""


class ReentrantCall(DedupError):
    """A call on a (scope, token) whose primary is running in this very context (the call
    would wait for itself): raised at once."""


class BusyReason(enum.StrEnum):
    """Why a `SessionBusy` was raised."""

    TAKEN = "taken"
    """mode="throw" and the session has ``max_concurrent`` holders (or callers queued)."""
    QUEUE_FULL = "queue_full"
    """mode="queue" and ``max_queue`` callers already wait."""
    QUEUE_TIMEOUT = "queue_timeout"
    """The caller waited ``queue_timeout`` seconds in the queue without being admitted."""


class SessionBusy(DedupError):
    """A guarded session could not be entered: the distributed form of Strands'
    ``ConcurrencyException``."""

    def __init__(
        self,
        message: str,
        *,
        session: str,
        reason: BusyReason,
        holders: int | None,
        depth: int,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.session = session
        self.reason = reason
        self.holders = holders
        """Holders of the session when it was refused (None when not known)."""
        self.depth = depth
        """Callers waiting in the session's queue when it was refused."""
        self.retry_after = retry_after


class UnkeyedRequest(DedupError):
    """An outgoing unsafe request (``strands_dedup.http._outgoing``) that could not be given an
    idempotency key was refused before any of it was sent: its streamed body is larger than the
    bound, or it was made outside a primary call by a strict transport."""

    def __init__(self, message: str, *, method: str, url: str) -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class ConversationError(DedupError):
    """A session's stored conversation cannot be used: what is stored does not parse, or a write
    would take it past its bounds. Nothing was written; what was stored is kept as it was."""

    def __init__(self, message: str, *, session: str) -> None:
        super().__init__(message)
        self.session = session
        """Display form of the session id."""
