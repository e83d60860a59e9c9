"""`DedupConfig`: every tunable of a deduplicator, validated once at construction."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._keys import validate_namespace

__all__ = ["DedupConfig"]

MiB = 1024 * 1024


class DedupConfig(BaseModel):
    """Configuration of a `Deduplicator` (durations in seconds).

    Unknown fields and invalid combinations are refused with a `pydantic.ValidationError`
    that names the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field("strands-dedup", description="Prefix of every key; validated.")
    lease_ttl: float = Field(30.0, ge=0.05, le=86400, description="Lease time to live.")
    renew_interval: float | None = Field(
        None, gt=0, description="How often held leases are renewed; default lease_ttl / 3."
    )
    result_ttl: float = Field(86400.0, ge=0.001, description="How long a result is replayed.")
    wait_timeout: float = Field(300.0, gt=0, description="Longest a duplicate waits.")
    on_duplicate: Literal["wait", "raise"] = Field(
        "wait", description="Duplicates wait for the primary, or fail with DuplicateInFlight."
    )
    on_primary_error: Literal["share", "retry"] = Field(
        "share",
        description="A failed primary's error goes to waiting duplicates, or one of them retries.",
    )
    on_lease_lost: Literal["continue", "cancel"] = Field(
        "continue",
        description="An async primary whose lease is lost keeps running or is cancelled.",
    )
    cache_errors: bool = Field(False, description="Store failures for result_ttl and replay them.")
    max_result_bytes: int = Field(16 * MiB, gt=0, le=512 * MiB, description="Result size bound.")
    max_stream_chunks: int = Field(
        100_000, ge=1, le=10_000_000, description="Most chunks one streamed call may produce."
    )
    max_stream_bytes: int = Field(
        16 * MiB, gt=0, le=512 * MiB, description="Most bytes one streamed call may produce."
    )
    inline_result_bytes: int = Field(
        64 * 1024, ge=0, description="Results up to this size travel inside the wake-up message."
    )
    takeover_grace: float = Field(
        0.1, ge=0, le=60, description="Slack after a lease's TTL before a waiter re-reads it."
    )
    min_replicas: int = Field(
        0,
        ge=0,
        le=100,
        description="After a claim and a completion, WAIT for this many replicas (0: do not).",
    )
    replica_timeout: float = Field(
        1.0, gt=0, le=60, description="Longest WAIT for min_replicas acknowledgements."
    )
    max_connections: int = Field(32, ge=2, le=10_000, description="Bound of the connection pool.")
    auto_pipeline: bool = Field(
        True,
        description="Concurrent calls' scripts leave in one write on one connection (on a "
        "cluster, one per primary).",
    )
    pool_timeout: float = Field(20.0, gt=0, description="Longest wait for a free connection.")
    connect_timeout: float = Field(5.0, gt=0, description="Socket connect timeout.")
    socket_timeout: float = Field(5.0, gt=0, description="Socket read/write timeout.")
    stats_interval: float = Field(
        5.0, ge=0.05, le=3600, description="How often a process publishes its counters."
    )
    require_noeviction: bool = Field(
        False,
        description="Refuse to start (StoreRefused) unless Redis' maxmemory-policy is noeviction.",
    )
    retry_attempts: int = Field(3, ge=1, le=20, description="Attempts for a safe operation.")
    retry_deadline: float = Field(
        10.0, gt=0, description="Total time a retried operation may take before StoreUnavailable."
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return validate_namespace(value)

    @model_validator(mode="after")
    def _combinations(self) -> DedupConfig:
        if self.renew_interval is not None and self.renew_interval > self.lease_ttl / 2:
            raise ValueError(
                f"renew_interval ({self.renew_interval}s) must be at most half of lease_ttl "
                f"({self.lease_ttl}s), or a lease can expire between two renewals"
            )
        if self.cache_errors and self.on_primary_error == "retry":
            raise ValueError(
                'cache_errors=True contradicts on_primary_error="retry": a cached failure would be '
                "replayed to the duplicates that were meant to retry"
            )
        if self.inline_result_bytes > self.max_result_bytes:
            raise ValueError("inline_result_bytes must not exceed max_result_bytes")
        return self

    @property
    def effective_renew_interval(self) -> float:
        """The renewal period: ``renew_interval`` or ``lease_ttl / 3``."""
        return self.renew_interval if self.renew_interval is not None else self.lease_ttl / 3

    @property
    def lease_ttl_ms(self) -> int:
        return max(1, int(self.lease_ttl * 1000))

    @property
    def result_ttl_ms(self) -> int:
        return max(1, int(self.result_ttl * 1000))

    @property
    def fence_ttl_ms(self) -> int:
        """The fence counter outlives any result and any lease of its token."""
        return self.result_ttl_ms + 2 * self.lease_ttl_ms
