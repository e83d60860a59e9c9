"""Seeing and repairing what is in flight: the data behind ``strands-dedup ls/show/...``.

`Inspector` reads leases and results with SCAN (never KEYS), pipelined reads and one
``PUBSUB NUMSUB`` per batch; it writes only when asked to (`release`, `forget`). Every view has
``to_json()`` with stable field names (documented in the README).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .._config import DedupConfig
from .._keys import KeySchema
from .._protocol import decode_envelope, decode_lease, decode_meta
from .._store import RedisStore, client_from_url
from .._store.connect import describe_url
from .._store.redis import Client, eviction_warning

__all__ = ["Inspector", "LeaseView", "ResultView", "SessionEntryView", "SessionView", "StatsView"]

_BATCH = 500


@dataclass(frozen=True, slots=True)
class LeaseView:
    """A token in flight: who holds it, since when, for how much longer, who listens."""

    token: str
    scope: str
    owner: str
    host: str
    pid: int | None
    fence: int
    age_s: float | None
    ttl_s: float
    listeners: int
    """Processes subscribed to the token's channel (each hosts one or more waiting duplicates)."""
    fingerprint: str | None
    key: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ResultView:
    """A stored result's metadata (and its payload only when asked for)."""

    token: str
    scope: str
    status: str
    fence: int
    size: int
    age_s: float | None
    ttl_s: float | None
    serializer: str
    error_type: str | None
    error_message: str | None
    key: str
    value: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class StatsView:
    """How much a namespace holds."""

    namespace: str
    in_flight: int
    results: int
    lease_bytes: int
    result_bytes: int
    counters: dict[str, int]
    """Fleet-wide event counters, summed over the live processes' published counters."""
    eviction_policy: str = "unknown"
    """Redis' ``maxmemory-policy`` (``"unknown"`` when CONFIG is disabled or not permitted)."""
    warnings: list[str] = field(default_factory=list)
    """What the guarantees need and do not get (an evicting ``maxmemory-policy``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class SessionEntryView:
    """A holder of a guarded session, or a caller waiting in its queue."""

    ticket: str
    host: str
    pid: int | None
    seq: int | None
    """The sequence number the caller gave, if any."""
    age_s: float | None
    """Since the caller asked to enter."""
    ttl_s: float
    """How long its lease lives unless renewed."""


@dataclass(frozen=True, slots=True)
class SessionView:
    """A guarded session (`SessionGuard`) with holders or waiters."""

    session: str
    holders: list[SessionEntryView]
    waiting: list[SessionEntryView]
    """In arrival order (sequenced callers are admitted by number, not by arrival)."""
    fence: int
    """Admissions so far."""
    next_seq: int | None
    """The sequence number the queue admits next, once sequence numbers are in use."""
    gap_s: float | None
    """How long the queue has been waiting for a missing sequence number."""
    key: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _entry_view(
    ticket: bytes, expiry: float, meta: bytes | None, now_ms: float
) -> SessionEntryView:
    data = decode_meta(meta)
    started = data.get("t")
    return SessionEntryView(
        ticket=_text(ticket),
        host=str(data.get("h", "?")),
        pid=data.get("p") if isinstance(data.get("p"), int) else None,
        seq=data.get("q") if isinstance(data.get("q"), int) else None,
        age_s=(now_ms - started) / 1000 if isinstance(started, (int, float)) else None,
        ttl_s=max(0.0, (expiry - now_ms) / 1000),
    )


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _ttl(pttl: int) -> float | None:
    return pttl / 1000 if pttl >= 0 else None


class Inspector:
    """Read (and, on request, repair) one namespace's tokens."""

    def __init__(
        self,
        client: Client,
        *,
        config: DedupConfig | None = None,
        where: str = "redis",
        owns_client: bool = False,
        **options: Any,
    ):
        self.config = config if config is not None else DedupConfig(**options)
        self._keys = KeySchema(self.config.namespace)
        self._store = RedisStore(client, self.config, where=where)
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Inspector:
        """Connect to ``url`` (see `Deduplicator.from_url`); options are `DedupConfig` fields."""
        config = DedupConfig(**options)
        client = client_from_url(url, config, client_name="strands-dedup-cli")
        return cls(client, config=config, where=describe_url(url), owns_client=True)

    async def check_connection(self) -> None:
        """One PING within ``connect_timeout``, not retried: `StoreUnavailable` naming the cause
        when the endpoint does not answer or answers something that is not Redis."""
        await self._store.check_connection()

    async def aclose(self) -> None:
        if self._owns_client:
            await self._store.aclose()

    async def __aenter__(self) -> Inspector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- reading ----------------------------------------------------------------------------

    def _scan(self, pattern: bytes) -> AsyncIterator[list[bytes]]:
        return self._store.scan(pattern)

    async def _lease_views(self, keys: list[bytes], now_ms: float | None = None) -> list[LeaseView]:
        replies = await self._store.values_with_ttl(keys)
        channels = [self._keys.channel_of(key) for key in keys]
        listeners = await self._store.listeners(channels)
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        views = []
        for i, key in enumerate(keys):
            value, pttl = replies[i]
            if value is None:
                continue  # released between SCAN and GET
            view = _lease_view(key, value, pttl, listeners.get(channels[i], 0), now_ms)
            if view is not None:
                views.append(view)
        return views

    async def leases(
        self, scope: str | bytes | None = None, older_than: float | None = None
    ) -> list[LeaseView]:
        """Every token in flight (optionally of one scope, or older than N s), oldest first."""
        views: list[LeaseView] = []
        now_ms = time.time() * 1000  # one clock for every batch, so ages compare
        async for batch in self._scan(self._keys.pattern("lease", scope)):
            for start in range(0, len(batch), _BATCH):
                views += await self._lease_views(batch[start : start + _BATCH], now_ms)
        if older_than is not None:
            views = [v for v in views if v.age_s is not None and v.age_s >= older_than]
        return sorted(views, key=lambda v: -(v.age_s or 0.0))

    async def sessions(self) -> list[SessionView]:
        """Every guarded session with holders or waiters, the longest queue first."""
        bases: set[bytes] = set()
        for part in ("holders", "qexp"):
            async for batch in self._scan(self._keys.session_pattern(part)):
                bases.update(key[: key.rindex(b"}:") + 2] for key in batch)
        views: list[SessionView] = []
        ordered = sorted(bases)
        for start in range(0, len(ordered), _BATCH):
            views += await self._session_views(ordered[start : start + _BATCH])
        return sorted(views, key=lambda v: (-len(v.waiting), -len(v.holders), v.session))

    async def _session_views(self, bases: list[bytes]) -> list[SessionView]:
        now_ms, states = await self._store.session_states(bases)  # Redis' clock sets the leases
        views = []
        for base, (holders, waiting, meta, state) in zip(bases, states, strict=True):
            live_holders = [(t, e) for t, e in holders if e > now_ms]
            live_waiting = sorted((t, e) for t, e in waiting if e > now_ms)
            if not live_holders and not live_waiting:
                continue
            name = next((decode_meta(raw).get("s") for raw in meta.values()), None)
            tag = _text(base[base.index(b"{") + 1 : base.rindex(b"}")])
            fence, next_seq, gap = state
            views.append(
                SessionView(
                    session=str(name) if name is not None else tag,
                    holders=[_entry_view(t, e, meta.get(t), now_ms) for t, e in live_holders],
                    waiting=[_entry_view(t, e, meta.get(t), now_ms) for t, e in live_waiting],
                    fence=int(fence or 0),
                    next_seq=int(next_seq) if next_seq is not None else None,
                    gap_s=(now_ms - int(gap)) / 1000 if gap is not None else None,
                    key=_text(base),
                )
            )
        return views

    async def lease(self, token: str | bytes, scope: str | bytes | None = None) -> LeaseView | None:
        views = await self._lease_views([self._keys.for_token(token, scope).lease])
        return views[0] if views else None

    async def result(
        self, token: str | bytes, scope: str | bytes | None = None, *, with_value: bool = False
    ) -> ResultView | None:
        """The stored result's metadata; its payload (as text) only with ``with_value``."""
        keys = self._keys.for_token(token, scope)
        [(data, pttl)] = await self._store.values_with_ttl([keys.result])
        if data is None:
            return None
        try:
            env = decode_envelope(data)
        except (ValueError, KeyError, TypeError, AttributeError):
            return ResultView(
                token=keys.token,
                scope=keys.scope,
                status="unreadable",
                fence=0,
                size=len(data),
                age_s=None,
                ttl_s=_ttl(int(pttl)),
                serializer="",
                error_type=None,
                error_message=None,
                key=_text(keys.result),
            )
        return ResultView(
            token=env.token or keys.token,
            scope=env.scope or keys.scope,
            status="ok" if env.ok else "error",
            fence=env.fence,
            size=env.size,
            age_s=max(0.0, time.time() - env.created_ms / 1000) if env.created_ms else None,
            ttl_s=_ttl(int(pttl)),
            serializer=env.serializer,
            error_type=env.error_type or None,
            error_message=env.error_message or None,
            key=_text(keys.result),
            value=env.payload.decode("utf-8", "backslashreplace") if with_value else None,
        )

    async def stats(self) -> StatsView:
        """Counts and memory of the namespace's leases and results, and fleet-wide counters."""
        totals = {"lease": [0, 0], "result": [0, 0]}
        for part, acc in totals.items():
            async for batch in self._scan(self._keys.pattern(part)):
                sizes = await self._store.memory_usage(batch)
                acc[0] += sum(1 for s in sizes if s is not None)
                acc[1] += sum(int(s) for s in sizes if s is not None)
        policy = await self._store.eviction_policy()
        warning = eviction_warning(policy, self._store.where)
        return StatsView(
            namespace=self.config.namespace,
            in_flight=totals["lease"][0],
            results=totals["result"][0],
            lease_bytes=totals["lease"][1],
            result_bytes=totals["result"][1],
            counters=await self.counters(),
            eviction_policy=policy,
            warnings=[warning] if warning is not None else [],
        )

    async def counters(self) -> dict[str, int]:
        """Event counters summed over every live process of the namespace."""
        total: dict[str, int] = {}
        async for batch in self._scan(self._keys.stats_pattern()):
            for mapping in await self._store.hashes(batch):
                for name, value in mapping.items():
                    field = name.decode() if isinstance(name, bytes) else str(name)
                    total[field] = total.get(field, 0) + int(value)
        return total

    # -- repairing --------------------------------------------------------------------------

    async def release(
        self, token: str | bytes, scope: str | bytes | None = None
    ) -> LeaseView | None:
        """Force-release the token's lease; its waiters re-read and one takes over.

        The fence moves on, so the released primary (if alive) can neither renew nor complete.
        Returns the lease that was released, or None if nothing held it.
        """
        keys = self._keys.for_token(token, scope)
        before = await self.lease(token, scope)  # whose lease, and the processes told
        if before is None:
            return None
        # that owner's lease only: a retry of the release after a waiter took over finds it gone
        value = await self._store.force_release(keys, before.owner)
        if value is None:
            return None
        listeners = before.listeners
        return _lease_view(keys.lease, value, 0, listeners, time.time() * 1000)

    async def forget(self, token: str | bytes, scope: str | bytes | None = None) -> bool:
        """Delete the stored result so the next call runs again; False if there was none."""
        keys = self._keys.for_token(token, scope)
        return await self._store.delete(keys.result)


def _lease_view(
    key: bytes, value: bytes, pttl: int, listeners: int, now_ms: float
) -> LeaseView | None:
    try:
        lease = decode_lease(value, pttl)
    except ValueError:
        return None  # not one of ours
    started = lease.meta.get("t")
    pid = lease.meta.get("p")
    return LeaseView(
        token=str(lease.meta.get("tok", "")),
        scope=str(lease.meta.get("sc", "")),
        owner=lease.owner,
        host=str(lease.meta.get("h", "")),
        pid=pid if isinstance(pid, int) else None,
        fence=lease.fence,
        age_s=max(0.0, (now_ms - started) / 1000) if isinstance(started, int) else None,
        ttl_s=max(0.0, pttl / 1000),
        listeners=listeners,
        fingerprint=lease.fingerprint,
        key=_text(key),
    )


def dumps(payload: Any) -> str:
    """JSON for ``--json`` output (stable, sorted keys)."""
    return json.dumps(payload, sort_keys=True, ensure_ascii=False)
