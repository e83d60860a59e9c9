"""strands-dedup: distributed idempotency and dedup for AI-agent calls, backed by Redis.

A call keyed by an idempotency token runs once across every process sharing a Redis; every
duplicate gets the primary's result; a crashed primary is replaced within one lease TTL.
"""

import logging

from ._config import DedupConfig
from ._engine.call import CallContext, current_call
from ._engine.deduplicator import Deduplicator
from ._engine.observe import Activity, Health, PrometheusMetrics, SessionLoad
from ._engine.session import SessionConfig, SessionGuard, SessionHold, current_session
from ._engine.streaming import StreamReset
from ._engine.sync import SyncDeduplicator
from ._errors import (
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
from ._protocol import Outcome, Role
from ._serialization import JsonSerializer, Serializer, SignedPickleSerializer
from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "Activity",
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
