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

    namespace: str = Field(
        "strands-dedup",
        description="Prefix of every key: 1-64 characters from `A-Z a-z 0-9 . _ -`, with `:` "
        "between non-empty parts.",
    )
    lease_ttl: float = Field(
        30.0,
        ge=0.05,
        le=86400,
        description="Lease time to live: a crashed primary blocks its token at most this long.",
    )
    renew_interval: float | None = Field(
        None,
        gt=0,
        description="How often held leases are renewed (`None`: `lease_ttl / 3`); at most "
        "`lease_ttl / 2`.",
    )
    result_ttl: float = Field(
        86400.0, ge=0.001, description="How long a result is stored and replayed."
    )
    wait_timeout: float = Field(
        300.0,
        gt=0,
        description="Longest a duplicate waits before `WaitTimeout` (per call: `wait_timeout=`).",
    )
    on_duplicate: Literal["wait", "raise"] = Field(
        "wait",
        description='`"wait"` for the primary\'s result, or `"raise"` `DuplicateInFlight` at once '
        "(per call too).",
    )
    on_primary_error: Literal["share", "retry"] = Field(
        "share",
        description='`"share"` a failed primary\'s error with the duplicates waiting at that '
        'moment, or `"retry"`: one of them runs the call.',
    )
    on_lease_lost: Literal["continue", "cancel"] = Field(
        "continue",
        description='An async primary whose lease is lost keeps running (`"continue"`: its '
        'completion is then refused with `LeaseLost`), or is cancelled at once (`"cancel"`) and '
        "raises `LeaseLost`; blocking calls cannot be cancelled and always continue.",
    )
    cache_errors: bool = Field(
        False,
        description="Store failures for `result_ttl` and replay them (not with "
        '`on_primary_error="retry"`).',
    )
    max_result_bytes: int = Field(
        16 * MiB,
        gt=0,
        le=512 * MiB,
        description="Largest result stored: a larger one raises `ResultTooLarge`, nothing is "
        "stored and the token is released.",
    )
    max_stream_chunks: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="Most chunks one streamed call (`stream`) may produce; one more raises "
        "`ResultTooLarge`.",
    )
    max_stream_bytes: int = Field(
        16 * MiB,
        gt=0,
        le=512 * MiB,
        description="Most bytes one streamed call (`stream`) may produce; more raises "
        "`ResultTooLarge`.",
    )
    inline_result_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="Results up to this size travel inside the wake-up message (at most "
        "`max_result_bytes`).",
    )
    takeover_grace: float = Field(
        0.1, ge=0, le=60, description="Slack after a lease's TTL before a waiter re-reads it."
    )
    min_replicas: int = Field(
        0,
        ge=0,
        le=100,
        description="After each claim and completion, `WAIT` for this many replicas to "
        "acknowledge it (0: do not).",
    )
    replica_timeout: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Longest `WAIT` for `min_replicas` acknowledgements (a claim's: at most a "
        "quarter of `lease_ttl`).",
    )
    max_connections: int = Field(
        32,
        ge=2,
        le=10_000,
        description="Bound of the connection pool (plus one subscriber connection); "
        "`SyncDeduplicator`: also the most threads with a connection of their own.",
    )
    auto_pipeline: bool = Field(
        True,
        description="Concurrent calls' scripts leave in one write on one connection and their "
        "replies come back in order (on a cluster, one pipeline per primary); `False` runs each "
        "on a pooled connection.",
    )
    pool_timeout: float = Field(
        20.0, gt=0, description="Longest wait for a free pooled connection."
    )
    connect_timeout: float = Field(5.0, gt=0, description="Socket connect timeout.")
    socket_timeout: float = Field(
        5.0,
        gt=0,
        description="Socket read and write timeout; a pipelined batch not answered within it "
        "fails its callers only, who retry on a new connection.",
    )
    stats_interval: float = Field(
        5.0,
        ge=0.05,
        le=3600,
        description="How often a process publishes its counters (for the CLI's `stats` and "
        "`watch`).",
    )
    require_noeviction: bool = Field(
        False,
        description="Refuse to start (`StoreRefused`) unless Redis' `maxmemory-policy` is "
        "`noeviction`.",
    )
    retry_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Attempts in all of an operation that is safe to repeat, after transient "
        "Redis errors.",
    )
    retry_deadline: float = Field(
        10.0,
        gt=0,
        description="Longest a retried operation may take in all before `StoreUnavailable`.",
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
        """The fence counter outlives any lease of its token by a result TTL (a stored result,
        which carries its fence, deletes it)."""
        return self.result_ttl_ms + 2 * self.lease_ttl_ms
