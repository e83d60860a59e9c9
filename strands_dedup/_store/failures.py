"""What a driver error means, in one table: retried or not, and which of the library's errors
it becomes (``errors.py``). Both shells (asyncio and blocking), the health check and the probes
read it; nothing else looks at redis-py's exception types.

The first row whose exception type (and, for an error reply, whose prefix) matches wins. A
transient error is retried while the operation is safe to repeat (every script recognises a
repeated call by its owner id), then becomes what its row says: `StoreUnavailable`, or
`StoreRefused` for READONLY (a replica that retries did not get past). A refusal (credentials,
NOPERM, OOM, BUSY, NOSCRIPT after a reload, any other error reply) is not retried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rex
from tenacity import retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential
from tenacity import wait_random as _jitter

from .._config import DedupConfig
from .._errors import StoreRefused, StoreUnavailable

__all__ = [
    "FAILURES",
    "Failure",
    "Verdict",
    "classify",
    "describe_error",
    "is_driver_error",
    "is_transient",
    "retry_policy",
    "store_error",
]


class Verdict(enum.Enum):
    """What a driver error becomes once it is not (or no longer) retried."""

    CREDENTIALS = "credentials"
    """`StoreRefused`: Redis refused the credentials."""
    REFUSED = "refused"
    """`StoreRefused`: Redis refused the command (its message kept)."""
    NOT_REDIS = "not redis"
    """`StoreUnavailable`: what answers at the address does not speak Redis."""
    UNAVAILABLE = "unavailable"
    """`StoreUnavailable`: Redis cannot be reached or did not answer."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One row of the table."""

    types: tuple[type[BaseException], ...]
    retry: bool
    verdict: Verdict
    prefixes: tuple[str, ...] = ()
    """Error-reply codes (``NOAUTH`` ...) the row is limited to; empty: any."""


FAILURES: tuple[Failure, ...] = (
    # credentials: AUTH refused (redis-py raises some as ConnectionError: never retried)
    Failure((rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError), False,
            Verdict.CREDENTIALS),
    Failure((rex.ResponseError,), False, Verdict.CREDENTIALS, ("NOAUTH", "WRONGPASS")),
    Failure((rex.NoPermissionError,), False, Verdict.REFUSED),  # NOPERM: an ACL rule
    # a replica answered (a failover in progress): retried; refused once retries are over
    Failure((rex.ReadOnlyError,), True, Verdict.REFUSED),
    # the server is starting, resharding or failing over; a slot moved
    Failure((rex.BusyLoadingError, rex.TryAgainError, rex.ClusterDownError, rex.AskError,
             rex.SlotNotCoveredError), True, Verdict.UNAVAILABLE),
    # the connection failed or timed out (TimeoutError, a subclass of OSError, included)
    Failure((rex.ConnectionError, rex.TimeoutError, OSError), True, Verdict.UNAVAILABLE),
    Failure((rex.InvalidResponse,), False, Verdict.NOT_REDIS),
    # OOM, BUSY (a script runs too long), NOSCRIPT after its reload, any other error reply
    Failure((rex.ResponseError,), False, Verdict.REFUSED),
    Failure((rex.RedisError,), False, Verdict.UNAVAILABLE),
)  # fmt: skip
"""The table (first match wins)."""


def classify(exc: BaseException) -> Failure | None:
    """The row for ``exc``; None for an error that is not the driver's (raised as it is). A
    cluster client's "cannot be connected" is judged by its cause (no node answered)."""
    if isinstance(exc, rex.RedisClusterException) and exc.__cause__ is not None:
        return classify(exc.__cause__)
    text = str(exc)
    for row in FAILURES:
        if isinstance(exc, row.types) and (not row.prefixes or text.startswith(row.prefixes)):
            return row
    return None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the connection failed or timed out, or the server is not ready."""
    row = classify(exc)
    return row is not None and row.retry


def describe_error(exc: BaseException) -> str:
    """An exception's message, or its class name when it has none (``TimeoutError()``); a
    Redis error with the code redis-py took off its message put back (``OOM ...``)."""
    text = str(exc).strip()
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code and not text.startswith(code):
        text = f"{code} {text}"
    return text or type(exc).__name__


def store_error(exc: BaseException, where: str) -> StoreUnavailable:
    """The library's error for a driver error from the Redis at ``where``: `StoreRefused` when
    Redis refused (its message kept), else `StoreUnavailable`."""
    cause = describe_error(exc)
    row = classify(exc)
    verdict = Verdict.UNAVAILABLE if row is None else row.verdict
    error: StoreUnavailable
    if verdict is Verdict.CREDENTIALS:
        message = f"Redis at {where} refused the credentials: {cause}"
        error = StoreRefused(message, server_message=cause)
    elif verdict is Verdict.REFUSED:
        message = f"Redis at {where} refused the command: {cause}"
        error = StoreRefused(message, server_message=cause)
    elif verdict is Verdict.NOT_REDIS:
        error = StoreUnavailable(
            f"Redis at {where} is unavailable: what answers there is not Redis ({cause})"
        )
    else:
        error = StoreUnavailable(f"Redis at {where} is unavailable: {cause}")
    error.__cause__ = exc
    return error


def is_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the driver's (or the socket's): `store_error` translates it."""
    return isinstance(exc, (rex.RedisError, OSError)) or is_transient(exc)


def retry_policy(config: DedupConfig) -> dict[str, Any]:
    """tenacity's arguments for retrying after a first transient failure (both shells):
    up to ``retry_attempts`` attempts in all within ``retry_deadline``, with jittered
    exponential backoff, transient errors only."""
    return {
        "stop": stop_after_attempt(config.retry_attempts - 1)
        | stop_after_delay(config.retry_deadline),
        "wait": wait_exponential(multiplier=0.05, max=1.0) + _jitter(0, 0.05),
        "retry": retry_if_exception(is_transient),
        "reraise": True,
    }
