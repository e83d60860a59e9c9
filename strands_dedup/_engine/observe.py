"""What a deduplicator reports about itself: counters, metrics, logs, spans and health.

- Counters (``claims``, ``replays``, ``waits``, ``takeovers``, ``lease_lost``,
  ``fingerprint_mismatch``, ``store_errors``, ``failures``) are kept per deduplicator and
  published every few seconds to ``<namespace>:stats:<process>`` (a hash that expires when the
  process stops), where ``strands-dedup watch`` and ``stats`` sum them across the fleet.
- Prometheus metrics, when ``prometheus-client`` is installed (the ``http`` and ``metrics``
  extras): the same counters, histograms of call and wait duration, gauges of in-flight calls and
  local waiters and, for HTTP surfaces, a histogram of request duration by role and status class
  and a counter of requests refused to protect shared capacity, by reason.
  Labels are bounded: the namespace, the role, the status class and the reason, never a token.
- Logs go to the ``strands_dedup`` logger (silent unless the application configures logging),
  each outcome at DEBUG with ``extra`` fields: ``token_digest``, ``role``, ``fence``, ``duration``.
- OpenTelemetry spans, when ``opentelemetry-api`` is installed: one span per call, with its role
  and fence.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .._keys import TokenKeys
    from .._protocol import Role
    from .._store import RedisStore

__all__ = [
    "EVENTS",
    "ROLE_STATE",
    "Health",
    "Observer",
    "PrometheusMetrics",
    "SessionLoad",
    "StatsPublisher",
]

log = logging.getLogger("strands_dedup")

_Scope = MutableMapping[str, Any]
_App = Callable[[_Scope, Any, Any], Awaitable[None]]

EVENTS = (
    "claims",
    "replays",
    "waits",
    "takeovers",
    "lease_lost",
    "fingerprint_mismatch",
    "store_errors",
    "failures",
)
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ROLE_STATE = "strands_dedup.role"
"""Key of the ASGI scope's ``state`` under which an HTTP surface leaves a request's role."""


@dataclass(frozen=True, slots=True)
class SessionLoad:
    """One guarded session's load (`Health.sessions`)."""

    session: str
    holders: int
    """Holders across the fleet (expired, not yet pruned, leases included)."""
    queue_depth: int
    """Callers waiting across the fleet."""
    held_here: int
    waiting_here: int


@dataclass(frozen=True, slots=True)
class Activity:
    """What one deduplicator is doing right now, read from memory (`Deduplicator.activity`): no
    round trip. For dashboards, logs and tests that wait for a state ("the duplicate waits")."""

    in_flight: int
    """Leases this deduplicator holds (calls it runs as primary) right now."""
    waiters: int
    """Duplicates registered with the shared subscriber right now."""
    listening: int
    """Of those, the ones subscribed, re-read and blocked on a message."""
    subscriber_connected: bool
    """The shared subscriber's connection (every shard's, on a cluster) is up."""
    subscriber_connects: int
    """Connections the shared subscriber opened so far (1 + its reconnects, per shard)."""
    subscriber_shards: int
    """Shards the subscriber listens on for the waiters it has now (1 off a cluster)."""
    sessions_held: int
    """Session holds (`SessionGuard`) this deduplicator's callers have right now."""
    sessions_waiting: int
    """Callers of this deduplicator waiting in a session's queue right now."""


@dataclass(frozen=True, slots=True)
class Health:
    """A deduplicator's view of itself (`Deduplicator.health`)."""

    ok: bool
    """Store reachable and, if anybody waits, the subscriber connected."""
    store_reachable: bool
    store_latency_ms: float | None
    subscriber_connected: bool
    in_flight: int
    """Calls this deduplicator runs as primary right now."""
    waiters: int
    """Duplicates waiting in this deduplicator right now."""
    renewal_lag_s: float
    """How late the last lease renewal finished after it was due."""
    error: str | None = None
    sessions_held: int = 0
    """Session holds (`SessionGuard`) this deduplicator's callers have right now."""
    sessions_waiting: int = 0
    """Callers of this deduplicator waiting in a session's queue right now."""
    sessions: list[SessionLoad] = field(default_factory=list)
    """Every session this deduplicator's callers hold or wait for, as Redis sees it now."""
    store_writable: bool | None = None
    """Redis took a small write (False: it refuses writes, see ``error``; None: unreachable)."""
    eviction_policy: str | None = None
    """Redis' ``maxmemory-policy`` (``"unknown"`` when CONFIG is refused; None: unreachable)."""
    warnings: list[str] = field(default_factory=list)
    """What the guarantees need and do not get (an evicting ``maxmemory-policy``)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PrometheusMetrics:
    """The deduplicator's Prometheus collectors, registered once per registry.

    `PrometheusMetrics.default()` registers them in prometheus-client's default registry the first
    time it is asked (deduplicators share them, labelled by namespace).
    """

    _default: ClassVar[PrometheusMetrics | None] = None

    def __init__(self, registry: Any = None, prefix: str = "strands_dedup") -> None:
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        registry = REGISTRY if registry is None else registry
        self.events = {
            name: Counter(
                f"{prefix}_{name}",
                f"strands-dedup {name.replace('_', ' ')}",
                ["namespace"],
                registry=registry,
            )
            for name in EVENTS
        }
        self.call_seconds = Histogram(
            f"{prefix}_call_duration_seconds",
            "Duration of calls run as primary or takeover",
            ["namespace", "role"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.wait_seconds = Histogram(
            f"{prefix}_wait_duration_seconds",
            "Time duplicates waited for a result",
            ["namespace"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "Duration of HTTP requests, by role (none: no deduplicated outcome) and status class",
            ["namespace", "role", "status"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.http_refusals = Counter(
            f"{prefix}_http_refusals",
            "HTTP requests refused or cut off to protect shared capacity, by reason: "
            "key-budget, byte-budget (429), body-timeout (408), send-timeout (connection cut)",
            ["namespace", "reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_in_flight",
            "Calls running as primary in this process",
            ["namespace"],
            registry=registry,
        )
        self.waiters = Gauge(
            f"{prefix}_waiters",
            "Duplicates waiting in this process",
            ["namespace"],
            registry=registry,
        )

    @classmethod
    def default(cls) -> PrometheusMetrics | None:
        """Collectors in the default registry, or None without prometheus-client."""
        if cls._default is None:
            try:
                cls._default = cls()
            except ImportError:
                return None
        return cls._default


def _tracer() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_tracer("strands_dedup")


class Observer:
    """Collects what one deduplicator does; cheap when no metrics or tracing are installed."""

    def __init__(self, namespace: str, metrics: PrometheusMetrics | None) -> None:
        self.namespace = namespace
        self.counters = dict.fromkeys(EVENTS, 0)
        self.changed = False
        self._lock = threading.Lock()  # blocking callers count from their own threads
        self._metrics = metrics
        self.tracer = _tracer()
        """The OpenTelemetry tracer spans come from (None without opentelemetry-api)."""
        self._off: tuple[Any, float] = (None, 0.0)
        """A tracer found off, and until when that verdict holds."""
        if metrics is not None:
            self._events = {name: c.labels(namespace) for name, c in metrics.events.items()}

    def watch_gauges(self, in_flight: Any, waiters: Any) -> None:
        """Have the Prometheus gauges read the live counts when scraped."""
        if self._metrics is not None:
            self._metrics.in_flight.labels(self.namespace).set_function(in_flight)
            self._metrics.waiters.labels(self.namespace).set_function(waiters)

    def count(self, event: str) -> None:
        with self._lock:
            self.counters[event] += 1
            self.changed = True
        if self._metrics is not None:
            self._events[event].inc()

    def refused(self, reason: str) -> None:
        """An HTTP surface refused a request or cut a client off (``reason``: a bounded name)."""
        if self._metrics is not None:
            self._metrics.http_refusals.labels(self.namespace, reason).inc()

    def claimed(self, role: Role) -> None:
        """A claim took the token (as primary, or as a takeover)."""
        self.count("claims")
        if role == "takeover":  # a StrEnum: compared as the text it is
            self.count("takeovers")

    def received(self, keys: TokenKeys, role: Role, fence: int, duration: float) -> None:
        """A duplicate got the stored value: replayed at once, or after waiting."""
        self.count("replays" if role == "replay" else "waits")
        self.outcome(keys, role, fence, duration)

    async def timed(self, app: _App, scope: _Scope, receive: Any, send: Any) -> None:
        """Serve one HTTP request through ``app``, observing its duration by role and status.

        The role is what ``app`` left in ``scope["state"][ROLE_STATE]`` ("none" without one);
        the status class is the response's (``2xx``, ...; "none" if none was started).
        """
        if self._metrics is None:
            await app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0

        async def observed(message: _Scope) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await app(scope, receive, observed)
        finally:
            role = str(scope.get("state", {}).get(ROLE_STATE, "none"))
            status_class = f"{status // 100}xx" if status else "none"
            self._metrics.request_seconds.labels(self.namespace, role, status_class).observe(
                time.monotonic() - started
            )

    def outcome(self, keys: TokenKeys, role: Role, fence: int, duration: float) -> None:
        """A call ended with a value (or, for a primary, stored one)."""
        if self._metrics is not None:
            if role in ("primary", "takeover"):
                self._metrics.call_seconds.labels(self.namespace, role.value).observe(duration)
            elif role == "waiter":
                self._metrics.wait_seconds.labels(self.namespace).observe(duration)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s fence=%d in %.3fs",
                role.value,
                digest(keys),
                fence,
                duration,
                extra={
                    "token_digest": digest(keys),
                    "role": role.value,
                    "fence": fence,
                    "duration": duration,
                    "namespace": self.namespace,
                },
            )

    def active_tracer(self) -> Any:
        """The tracer, unless tracing is off: no opentelemetry-api, or no provider configured
        (a no-op span still costs tens of microseconds per call). Tracing found off is looked
        at again a second later (a provider installed after the first call is seen then)."""
        tracer = self.tracer
        if tracer is None:
            return None
        now = time.monotonic()
        off, until = self._off
        if off is tracer and now < until:
            return None
        from opentelemetry import trace

        if isinstance(tracer, trace.NoOpTracer) or (
            isinstance(tracer, trace.ProxyTracer)
            and isinstance(
                trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
            )
        ):
            self._off = (tracer, now + 1.0)
            return None
        return tracer

    def span(
        self, keys: TokenKeys, *, current: bool = True
    ) -> contextlib.AbstractContextManager[Any]:
        """An OpenTelemetry span around one call (None unless tracing is configured); the
        current span of its context unless ``current=False``."""
        tracer = self.active_tracer()
        if tracer is None:
            return _NO_SPAN
        return self._span(tracer, keys, current)

    @contextlib.contextmanager
    def _span(self, tracer: Any, keys: TokenKeys, current: bool) -> Iterator[Any]:
        if not current:
            span = tracer.start_span("strands_dedup.call")
            try:
                span.set_attribute("strands_dedup.namespace", self.namespace)
                span.set_attribute("strands_dedup.token_digest", digest(keys))
                yield span
            finally:
                span.end()
            return
        with tracer.start_as_current_span("strands_dedup.call") as span:
            span.set_attribute("strands_dedup.namespace", self.namespace)
            span.set_attribute("strands_dedup.token_digest", digest(keys))
            yield span

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            self.changed = False
            return dict(self.counters)


class StatsPublisher:
    """Publishes one deduplicator's counters to ``key`` for the CLI, every ``interval`` seconds
    while they change (best effort: counters are not part of the protocol)."""

    def __init__(
        self, observer: Observer, store: RedisStore, key: bytes, interval: float, timeout: float
    ) -> None:
        self._observer = observer
        self._store = store
        self._key = key
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.started = False
        """Publishing began (it runs until `aclose`)."""

    def start(self) -> None:
        """Start publishing on the running loop (once; never after `aclose`)."""
        if not self.started and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._publish(), name="strands-dedup-stats"
            )
            self.started = True

    async def _publish(self) -> None:
        # The hash outlives a few missed publications, not the process.
        ttl_ms = int(self._interval * 4 * 1000)
        observer = self._observer
        while not self._closed:
            try:
                counts = observer.snapshot() if observer.changed else None
                async with asyncio.timeout(self._timeout):
                    alive = await self._store.publish_stats(self._key, counts, ttl_ms)
                if not alive and counts is None:
                    # the hash expired while nothing changed (a refresh came late): write the
                    # counts again now, or the CLI would not see this process until one changes
                    observer.changed = True
                    continue
            except Exception as exc:
                log.debug("could not publish counters: %s", exc)
                observer.changed = True
            if self._closed:  # closed meanwhile: the driver may have swallowed the cancel
                return
            await asyncio.sleep(self._interval)

    async def aclose(self) -> None:
        """Stop publishing."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()
"""What `Observer.span` gives when tracing is off (reusable: it holds nothing)."""


def digest(keys: TokenKeys) -> str:
    """A short, stable, non-reversible name of a token for logs and spans."""
    return hashlib.sha256(keys.lease).hexdigest()[:12]
