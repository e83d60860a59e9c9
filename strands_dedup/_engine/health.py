"""A deduplicator's health: Redis' eviction policy read at the first call, the sessions its
callers hold or wait for, and the bounded probes `Deduplicator.health` answers with."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .._config import DedupConfig
from .._errors import StoreRefused, StoreUnavailable
from .._keys import SessionKeys
from .._store import RedisStore
from .._store.redis import describe_error, eviction_warning, warn_evicting
from .observe import Activity, Health, SessionLoad

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["SessionActivity", "StorePolicy", "read_health"]

log = logging.getLogger("strands_dedup")


class StorePolicy:
    """Redis' eviction policy, read once per engine before its first call: warned about (once
    per process) when it can evict our keys, refused with `StoreRefused` when
    ``require_noeviction`` is set. An unreachable Redis is read again at the next call."""

    def __init__(self, store: RedisStore, config: DedupConfig) -> None:
        self._store = store
        self._config = config
        self._read: asyncio.Future[None] | None = None
        self.accepted = False
        """The policy was read and accepted (so a call need not wait for the read)."""

    async def read_once(self) -> None:
        """Read the policy unless it was read already; `StoreRefused` when it is refused (every
        time it is asked again)."""
        read = self._read
        if read is not None and read.done():
            read.result()  # require_noeviction refused this Redis
            return
        if read is None:
            self._read = read = asyncio.ensure_future(self._read_policy())
        await asyncio.shield(read)

    async def _read_policy(self) -> None:
        try:
            async with asyncio.timeout(self._config.connect_timeout):
                policy = await self._store.eviction_policy()
        except (StoreUnavailable, TimeoutError) as exc:
            log.debug("could not read the eviction policy yet: %s", exc)
            self._read = None
            return
        warn_evicting(policy, self._store.where)
        if self._config.require_noeviction and policy != "noeviction":
            detail = eviction_warning(policy, self._store.where) or policy
            raise StoreRefused(
                f"require_noeviction is set and {detail}",
                server_message=f"maxmemory-policy {policy}",
            )
        self.accepted = True


class SessionActivity:
    """The sessions one deduplicator's callers hold or wait for (`SessionGuard` counts them,
    `read_health` reports them)."""

    def __init__(self) -> None:
        self._sessions: dict[SessionKeys, list[int]] = {}
        """[held, waiting] per session."""

    def change(self, keys: SessionKeys, *, held: int = 0, waiting: int = 0) -> None:
        """Count a hold of ``keys`` (or a wait in its queue) starting (+1) or ending (-1)."""
        entry = self._sessions.setdefault(keys, [0, 0])
        entry[0] += held
        entry[1] += waiting
        if entry == [0, 0]:
            del self._sessions[keys]

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def held(self) -> int:
        return sum(x[0] for x in self._sessions.values())

    @property
    def waiting(self) -> int:
        return sum(x[1] for x in self._sessions.values())

    def local(self, limit: int) -> list[tuple[SessionKeys, int, int]]:
        """Up to ``limit`` sessions with (held, waiting) here."""
        return [(keys, held, waiting) for keys, (held, waiting) in self._sessions.items()][:limit]


def read_activity(engine: Engine) -> Activity:
    """What the engine does right now, from memory (no round trip)."""
    subscriber = engine.subscriber
    waiters = subscriber.waiters
    shards = getattr(subscriber, "shards", 1 if waiters else 0)
    return Activity(
        in_flight=engine.renewer.held,
        waiters=waiters,
        listening=subscriber.listening,
        subscriber_connected=subscriber.connected,
        subscriber_connects=subscriber.connects,
        subscriber_shards=shards,
        sessions_held=engine.sessions.held,
        sessions_waiting=engine.sessions.waiting,
    )


async def read_health(engine: Engine) -> Health:
    """Store reachable (one PING, bounded) and accepting writes (one small SET), subscriber
    connected, local load, renewal lag, Redis' eviction policy."""
    engine.bind_loop()
    store = engine.store
    timeout = engine.config.connect_timeout
    started = time.monotonic()
    error = None
    policy: str | None = None
    try:
        async with asyncio.timeout(timeout):
            await store.probe()
        latency: float | None = (time.monotonic() - started) * 1000
    except Exception as exc:
        latency, error = None, f"{type(exc).__name__}: {describe_error(exc)}"
    if error is None:
        try:
            async with asyncio.timeout(timeout):
                policy = await store.eviction_policy()
        except Exception as exc:  # health must answer; the policy is a bonus
            log.debug("could not read the eviction policy: %s", exc)
        try:
            async with asyncio.timeout(timeout):
                await store.probe_write(engine.keys.probe)
            writable: bool | None = True
        except Exception as exc:
            writable, error = False, f"{type(exc).__name__}: {describe_error(exc)}"
    else:
        writable = None
    warning = eviction_warning(policy, store.where) if policy is not None else None
    waiters = engine.subscriber.waiters
    connected = engine.subscriber.connected
    activity = engine.sessions
    sessions: list[SessionLoad] = []
    if error is None and len(activity):
        sessions = await _session_loads(engine)
    return Health(
        ok=error is None and (connected or waiters == 0),
        store_reachable=writable is not None,
        store_writable=writable,
        store_latency_ms=latency,
        subscriber_connected=connected,
        in_flight=engine.renewer.held,
        waiters=waiters,
        renewal_lag_s=engine.renewer.lag,
        error=error,
        sessions_held=activity.held,
        sessions_waiting=activity.waiting,
        sessions=sessions,
        eviction_policy=policy,
        warnings=[warning] if warning is not None else [],
    )


async def _session_loads(engine: Engine, limit: int = 100) -> list[SessionLoad]:
    local = engine.sessions.local(limit)
    try:
        async with asyncio.timeout(engine.config.connect_timeout):
            counts = await engine.store.session_loads([keys for keys, _, _ in local])
    except Exception as exc:  # health must answer; the counts are a bonus
        log.debug("could not read session loads: %s", exc)
        return []
    return [
        SessionLoad(keys.name, holders, queued, held, waiting)
        for (keys, held, waiting), (holders, queued) in zip(local, counts, strict=True)
    ]
