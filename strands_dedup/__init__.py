"""strands-dedup: distributed idempotency and dedup for AI-agent calls, backed by Redis.

A call keyed by an idempotency token runs once across every process sharing a Redis; every
duplicate gets the primary's result; a crashed primary is replaced within one lease TTL.
"""

import logging

from ._version import __version__
from .config import DedupConfig
from .engine.call import CallContext, current_call
from .engine.deduplicator import Deduplicator
from .engine.observe import Health, PrometheusMetrics, SessionLoad
from .engine.session import SessionConfig, SessionGuard, SessionHold, current_session
from .engine.streaming import StreamReset
from .engine.sync import SyncDeduplicator
from .errors import (
    BusyReason,
    ConversationError,
    DedupError,
    DuplicateInFlight,
    FingerprintMismatch,
    InvalidToken,
    LeaseLost,
    NotStored,
    OutcomeUnknown,
    PrimaryFailed,
    ReentrantCall,
    ResultTooLarge,
    SerializationError,
    SessionBusy,
    StoreRefused,
    StoreUnavailable,
    UnkeyedRequest,
    WaitTimeout,
)
from .protocol import Outcome, Role
from .serialization import JsonSerializer, Serializer, SignedPickleSerializer

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BusyReason",
    "CallContext",
    "ConversationError",
    "DedupConfig",
    "DedupError",
    "Deduplicator",
    "DuplicateInFlight",
    "FingerprintMismatch",
    "Health",
    "InvalidToken",
    "JsonSerializer",
    "LeaseLost",
    "Outcome",
    "NotStored",
    "OutcomeUnknown",
    "PrimaryFailed",
    "PrometheusMetrics",
    "ReentrantCall",
    "ResultTooLarge",
    "Role",
    "SerializationError",
    "Serializer",
    "SessionBusy",
    "SessionConfig",
    "SessionGuard",
    "SessionHold",
    "SessionLoad",
    "SignedPickleSerializer",
    "StoreRefused",
    "StoreUnavailable",
    "StreamReset",
    "SyncDeduplicator",
    "UnkeyedRequest",
    "WaitTimeout",
    "__version__",
    "current_call",
    "current_session",
]
