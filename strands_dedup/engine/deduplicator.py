"""`Deduplicator`: the asyncio core (claim, wait, complete, fail, take over)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_type_hints

import pydantic_core
import redis.asyncio as aredis
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential

from ..config import DedupConfig
from ..errors import (
    DedupError,
    DuplicateInFlight,
    FingerprintMismatch,
    LeaseLost,
    OutcomeUnknown,
    PrimaryFailed,
    ReentrantCall,
    ResultTooLarge,
    SerializationError,
    StoreRefused,
    StoreUnavailable,
    WaitTimeout,
)
from ..keys import KeySchema, SessionKeys, TokenKeys
from ..protocol import (
    Busy,
    Claimed,
    Envelope,
    LeaseInfo,
    LeaveClaimed,
    Outcome,
    Replay,
    Role,
    WakeUp,
    decode_envelope,
    decode_message,
    encode_envelope,
    encode_released_message,
    encode_stored_message,
    encode_value_message,
    fingerprints_conflict,
    parse_claim_reply,
    wait_budget,
)
from ..serialization import JsonSerializer, Serializer
from ..store import Client, RedisStore, ShardedSubscriber, Subscriber, Watch, client_from_url
from ..store.connect import describe_url
from ..store.redis import describe_error, eviction_warning, warn_evicting
from .observe import Health, Observer, PrometheusMetrics, SessionLoad
from .renewer import HeldLease, Renewer

__all__ = [
    "CallContext",
    "Deduplicator",
    "LostSignal",
    "call_identity",
    "current_call",
    "primary_context",
    "return_type_of",
]

log = logging.getLogger("strands_dedup")
T = TypeVar("T")
Token = str | bytes
_UNSET: Any = object()
_MAX_ERROR_TEXT = 2000
_HOST = socket.gethostname()
# A waiter's re-read in flight: when it was issued, and (reply, issuer owner, issuer fingerprint).
_Reread = tuple[float, "asyncio.Future[tuple[Replay | Claimed | Busy, str, str | None]]"]


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


@contextlib.contextmanager
def primary_context(lease: HeldLease, where: str) -> Iterator[CallContext]:
    """Run a primary's call as `current_call()` (a nested call on its own token is refused)."""
    keys = lease.keys
    context = lease.context = CallContext(keys.token, keys.scope, lease.fence, lease.role)
    call_token = _CURRENT_CALL.set(context)
    running_token = _RUNNING.set(_RUNNING.get() | {(where, keys.lease)})
    try:
        yield context
    finally:
        _RUNNING.reset(running_token)
        _CURRENT_CALL.reset(call_token)


_HINTS: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def return_type_of(func: Callable[..., Any]) -> Any:
    """The declared return type of ``func`` (the awaited type for ``async def``), else `Any`.

    Resolved once per function object (a lambda has no annotations and costs nothing).
    """
    target = inspect.unwrap(func)
    annotations = getattr(target, "__annotations__", None)
    if not annotations or "return" not in annotations:
        return Any
    try:
        return _HINTS[target]
    except (KeyError, TypeError):
        pass
    try:
        hint = get_type_hints(target).get("return", Any)
    except Exception:  # partials, callable objects, unresolved forward references
        hint = Any
    origin = getattr(hint, "__origin__", None)
    if origin is not None and getattr(origin, "__name__", "") in {"Awaitable", "Coroutine"}:
        hint = hint.__args__[-1]
    with contextlib.suppress(TypeError):
        _HINTS[target] = hint
    return hint


def _fence_of(stored: bytes) -> int | None:
    """The fence a stored result was written under (None when it is not a result envelope)."""
    try:
        return decode_envelope(stored).fence
    except (ValueError, KeyError):
        return None


def _normalize_fingerprint(fingerprint: str | bytes | None) -> str | None:
    if fingerprint is None:
        return None
    if isinstance(fingerprint, bytes):
        return hashlib.sha256(fingerprint).hexdigest()
    if isinstance(fingerprint, str):
        return (
            fingerprint
            if len(fingerprint) <= 128
            else hashlib.sha256(fingerprint.encode()).hexdigest()
        )
    raise TypeError(f"fingerprint must be str or bytes, not {type(fingerprint).__name__}")


def call_identity(
    func: Callable[..., Any],
    key: Callable[..., Token] | None,
    scope: Callable[..., Token | None] | None,
    fingerprint: bool | Callable[..., str | bytes],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Token, Token | None, str | None]:
    """Token, scope and fingerprint of one call of an ``idempotent`` function."""
    name = f"{func.__module__}.{func.__qualname__}"
    digest: str | None = None
    if key is None or fingerprint is True:
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            encoded = pydantic_core.to_json([name, bound.arguments])
        except (TypeError, pydantic_core.PydanticSerializationError) as exc:
            raise SerializationError(
                f"arguments of {name} cannot be fingerprinted as JSON ({exc}); pass key= and "
                "fingerprint= (a callable or False)"
            ) from exc
        digest = hashlib.sha256(encoded).hexdigest()
    token: Token = key(*args, **kwargs) if key is not None else f"{name}:{digest}"
    if callable(fingerprint):
        fp: str | None = _normalize_fingerprint(fingerprint(*args, **kwargs))
    else:
        fp = digest if fingerprint else None
    return token, (scope(*args, **kwargs) if scope is not None else None), fp


class Deduplicator:
    """Runs each call keyed by an idempotency token once across every process sharing a Redis.

    >>> dedup = Deduplicator.from_url("redis://127.0.0.1:6379/0", namespace="billing")
    >>> result = await dedup.run("req-8f3a", lambda: agent.invoke_async(prompt), scope=tenant)

    One instance belongs to one event loop (its connections, renewer and subscriber live there);
    a process may hold several. Close it with ``await dedup.aclose()`` or ``async with``.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        config: DedupConfig | None = None,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("pass either config= or keyword options, not both")
        self.config = config if config is not None else DedupConfig(**options)
        if client is not None and not isinstance(client, (aredis.Redis, aredis.RedisCluster)):
            raise TypeError(
                "client must be a redis.asyncio.Redis or RedisCluster (for blocking code use "
                "SyncDeduplicator); "
                f"got {type(client).__name__}"
            )
        self._owns_client = client is None
        self._client_name = f"strands-dedup:{_HOST}:{os.getpid()}"
        if client is None:
            client = client_from_url("memory://", self.config, client_name=self._client_name)
        where = describe_url("memory://") if self._owns_client else "redis"
        self._init(client, where, serializer, metrics)

    def _init(
        self,
        client: Client,
        where: str,
        serializer: Serializer | None,
        metrics: PrometheusMetrics | bool | None,
    ) -> None:
        cfg = self.config
        self._keys = KeySchema(cfg.namespace)
        self._store = RedisStore(client, cfg, where=where)
        self._serializer: Serializer = serializer if serializer is not None else JsonSerializer()
        subscriber_options: dict[str, Any] = {
            "decode": decode_message,
            "connect_timeout": cfg.connect_timeout,
            "give_up_after": cfg.retry_deadline,
        }
        self._subscriber: Subscriber | ShardedSubscriber = (
            Subscriber(self._store.new_subscriber_connection, **subscriber_options)
            if self._store.cluster is None
            else ShardedSubscriber(self._store, **subscriber_options)
        )
        self._renewer = Renewer(self._store, cfg.effective_renew_interval, self._lease_lost)
        self._owner_prefix = os.urandom(6).hex()
        self._owner_seq = itertools.count(1)
        self._meta_tail = f',"h":{json.dumps(_HOST)},"p":{os.getpid()}'
        self._fetches: dict[bytes, asyncio.Future[bytes | None]] = {}
        self._rereads: dict[bytes, _Reread] = {}
        self._closed = False
        if metrics is None or metrics is True:
            metrics = PrometheusMetrics.default()
        self._observer = Observer(cfg.namespace, metrics or None)
        self._observer.watch_gauges(lambda: self._renewer.held, lambda: self._subscriber.waiters)
        self._stats_key = self._keys.stats_key(f"{_HOST}:{os.getpid()}:{self._owner_prefix}")
        self._publisher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[SessionKeys, list[int]] = {}
        self._store_check: asyncio.Future[None] | None = None
        """Reads Redis' eviction policy once, at the first call (`_check_store`)."""
        self._background: set[asyncio.Task[Any]] = set()
        """Streaming primaries whose callers may have stopped listening (see `stream`)."""
        """Sessions this deduplicator's callers hold or wait for: [held, waiting]."""
        """The event loop this deduplicator serves (known from its first call)."""

    @classmethod
    def from_url(
        cls,
        url: str = "memory://",
        *,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> Deduplicator:
        """Connect to ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://``,
        ``redis+cluster://`` or the embedded ``memory://``.

        Keyword options are `DedupConfig` fields (``namespace``, ``lease_ttl``, ...).
        ``metrics``: Prometheus collectors to report to (default: prometheus-client's default
        registry when it is installed; False for none).
        """
        self = cls.__new__(cls)
        self.config = DedupConfig(**options)
        self._owns_client = True
        self._client_name = f"strands-dedup:{_HOST}:{os.getpid()}"
        client = client_from_url(url, self.config, client_name=self._client_name)
        self._init(client, describe_url(url), serializer, metrics)
        return self

    # -- public API ---------------------------------------------------------------------------

    async def execute(
        self,
        token: Token,
        call: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = _UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> Outcome[T]:
        """Run ``call`` once for ``token`` (within ``scope``) and say how the value was obtained.

        ``call`` takes no arguments and returns a value or an awaitable. ``fingerprint``
        identifies the request: reusing the token for another fingerprint raises
        `FingerprintMismatch`. ``returns`` is the type stored results are read back as (default:
        ``call``'s return annotation).
        """
        if not callable(call):
            raise TypeError(f"call must be callable, not {type(call).__name__}")
        keys = self._keys.for_token(token, scope)
        rtype = return_type_of(call) if returns is _UNSET else returns
        with self._observer.span(keys) as span:
            first = await self._begin(
                keys, _normalize_fingerprint(fingerprint), rtype, wait_timeout, on_duplicate
            )
            if isinstance(first, Outcome):
                outcome = cast(Outcome[T], first)
            else:
                outcome = await self._run_primary(first, call, rtype)
            if span is not None:
                span.set_attribute("strands_dedup.role", outcome.role.value)
                span.set_attribute("strands_dedup.fence", outcome.fence)
            return outcome

    async def run(
        self,
        token: Token,
        call: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = _UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> T:
        """Like `execute`, returning just the value."""
        outcome = await self.execute(
            token,
            call,
            scope=scope,
            fingerprint=fingerprint,
            returns=returns,
            wait_timeout=wait_timeout,
            on_duplicate=on_duplicate,
        )
        return outcome.value

    async def stream(
        self,
        token: Token,
        make_stream: Callable[[], AsyncIterable[Any]],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        wait_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Stream ``make_stream()`` once for ``token``; duplicates get the same chunks.

        ``make_stream`` returns an async iterable of JSON-able chunks. The primary's caller gets
        them as produced; a duplicate (in any process) gets them from the start, then live as
        the primary produces them; a retry after completion (within ``result_ttl``) gets the
        stored list of chunks. Duplicates get the chunks as JSON data (dicts, lists, ...).

        A duplicate that was following an attempt whose primary died gets a `StreamReset`, then
        the new attempt's chunks from the start. Leaving the loop early does not stop the
        primary: it completes, and its followers and retries get the whole stream.
        Bounded by ``max_stream_chunks`` and ``max_stream_bytes`` (`ResultTooLarge`).
        """
        from .streaming import Chunk, Final, stream_events

        if not callable(make_stream):
            raise TypeError(f"make_stream must be callable, not {type(make_stream).__name__}")
        keys = self._keys.for_token(token, scope)

        async def produce(emit: Callable[..., None]) -> list[Any]:
            chunks: list[Any] = []
            async for chunk in make_stream():
                try:
                    data = pydantic_core.to_json(chunk)
                except pydantic_core.PydanticSerializationError as exc:
                    raise SerializationError(
                        f"a chunk of token {keys.token!r} is not JSON-serializable: {exc}",
                        token=keys.token,
                    ) from exc
                emit(data, chunk)
                chunks.append(chunk)
            return chunks

        received = 0
        async for event in stream_events(
            self,
            keys,
            produce,
            rtype=list[Any],
            fingerprint=_normalize_fingerprint(fingerprint),
            wait_timeout=wait_timeout,
        ):
            if isinstance(event, Chunk):
                received += 1
                yield event.original if event.original is not None else json.loads(event.data)
            elif isinstance(event, Final):
                for chunk in event.outcome.value[received:]:  # a replay, or chunks we missed
                    yield chunk
            else:
                received = 0
                yield event

    def idempotent(
        self,
        key: Callable[..., Token] | None = None,
        *,
        scope: Callable[..., Token | None] | None = None,
        fingerprint: bool | Callable[..., str | bytes] = True,
        returns: Any = _UNSET,
    ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
        """Decorate an ``async def`` so each call runs once per token.

        ``key`` maps the call's arguments to its token (default: a digest of the function's name
        and arguments); ``scope`` maps them to a tenant or session; by default the arguments are
        fingerprinted, so a token reused with other arguments raises `FingerprintMismatch`.
        """

        def decorate(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
            if not inspect.iscoroutinefunction(inspect.unwrap(func)):
                raise TypeError(
                    f"{func.__qualname__} is not async; use SyncDeduplicator.idempotent for "
                    "blocking functions"
                )
            rtype = return_type_of(func) if returns is _UNSET else returns

            @functools.wraps(func)
            async def wrapper(*args: Any, **kwargs: Any) -> T:
                token, sc, fp = call_identity(func, key, scope, fingerprint, args, kwargs)

                def bound() -> Awaitable[T]:
                    return func(*args, **kwargs)

                outcome: Outcome[T] = await self.execute(
                    token, bound, scope=sc, fingerprint=fp, returns=rtype
                )
                return outcome.value

            return wrapper

        return decorate

    async def aclose(self) -> None:
        """Stop the renewer and the subscriber and close the connections (if this owns them)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.connect_timeout)
        if self._publisher is not None and not self._publisher.done():
            self._publisher.cancel()
            with contextlib.suppress(BaseException):
                await self._publisher
        await self._renewer.aclose()
        await self._subscriber.aclose()
        if self._owns_client:
            await self._store.aclose()

    async def __aenter__(self) -> Deduplicator:
        try:
            await self._checked_store()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def namespace(self) -> str:
        return self.config.namespace

    @property
    def counters(self) -> dict[str, int]:
        """Events so far: claims, replays, waits, takeovers, lease_lost, ... (see `observe`)."""
        return dict(self._observer.counters)

    async def health(self) -> Health:
        """Store reachable (one PING, bounded) and accepting writes (one small SET), subscriber
        connected, local load, renewal lag, Redis' eviction policy."""
        self._bind_loop()
        started = time.monotonic()
        error = None
        policy: str | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await self._store.probe()
            latency: float | None = (time.monotonic() - started) * 1000
        except Exception as exc:
            latency, error = None, f"{type(exc).__name__}: {describe_error(exc)}"
        if error is None:
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    policy = await self._store.eviction_policy()
            except Exception as exc:  # health must answer; the policy is a bonus
                log.debug("could not read the eviction policy: %s", exc)
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    await self._store.probe_write(self._keys.probe)
                writable: bool | None = True
            except Exception as exc:
                writable, error = False, f"{type(exc).__name__}: {describe_error(exc)}"
        else:
            writable = None
        warning = eviction_warning(policy, self._store.where) if policy is not None else None
        waiters = self._subscriber.waiters
        connected = self._subscriber.connected
        sessions: list[SessionLoad] = []
        if error is None and self._sessions:
            sessions = await self._session_loads()
        return Health(
            ok=error is None and (connected or waiters == 0),
            store_reachable=writable is not None,
            store_writable=writable,
            store_latency_ms=latency,
            subscriber_connected=connected,
            in_flight=self._renewer.held,
            waiters=waiters,
            renewal_lag_s=self._renewer.lag,
            error=error,
            sessions_held=sum(x[0] for x in self._sessions.values()),
            sessions_waiting=sum(x[1] for x in self._sessions.values()),
            sessions=sessions,
            eviction_policy=policy,
            warnings=[warning] if warning is not None else [],
        )

    def _bind_loop(self, keys: TokenKeys | None = None) -> None:
        """Remember the event loop of the first use; refuse any other one with a `DedupError`
        (a raw driver error would follow: "Event loop is closed", "attached to a different
        loop")."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            state = "closed" if self._loop.is_closed() else "still open"
            raise DedupError(
                f"this Deduplicator belongs to the event loop it was first used on "
                f"({self._loop!r}, {state}), not to the running one ({loop!r}): its connections, "
                "renewer and subscriber live on that loop. Create one Deduplicator per event "
                "loop (for each asyncio.run, or each thread's loop), or use SyncDeduplicator "
                "from blocking code and threads",
                token=keys.token if keys is not None else None,
            )

    async def _checked_store(self) -> None:
        """Read Redis' eviction policy once: warn (once per process) when it can evict our keys,
        refuse with `StoreRefused` when ``require_noeviction`` is set. An unreachable Redis is
        checked again at the next call."""
        self._bind_loop()
        if self._store_check is None:
            self._store_check = asyncio.ensure_future(self._check_store())
        await asyncio.shield(self._store_check)

    async def _check_store(self) -> None:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                policy = await self._store.eviction_policy()
        except (StoreUnavailable, TimeoutError) as exc:
            log.debug("could not read the eviction policy yet: %s", exc)
            self._store_check = None
            return
        warn_evicting(policy, self._store.where)
        if self.config.require_noeviction and policy != "noeviction":
            detail = eviction_warning(policy, self._store.where) or policy
            raise StoreRefused(
                f"require_noeviction is set and {detail}",
                server_message=f"maxmemory-policy {policy}",
            )

    async def _session_loads(self, limit: int = 100) -> list[SessionLoad]:
        local = list(self._sessions.items())[:limit]
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                async with self._store.client.pipeline(transaction=False) as pipe:
                    for keys, _ in local:
                        pipe.zcard(keys.holders)
                        pipe.zcard(keys.qexp)
                    counts = await pipe.execute()
        except Exception as exc:  # health must answer; the counts are a bonus
            log.debug("could not read session loads: %s", exc)
            return []
        return [
            SessionLoad(keys.name, int(counts[2 * i]), int(counts[2 * i + 1]), held, waiting)
            for i, (keys, (held, waiting)) in enumerate(local)
        ]

    def _session_activity(self, keys: SessionKeys, *, held: int = 0, waiting: int = 0) -> None:
        entry = self._sessions.setdefault(keys, [0, 0])
        entry[0] += held
        entry[1] += waiting
        if entry == [0, 0]:
            del self._sessions[keys]

    def _start_publisher(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(
                self._publish_counters(), name="strands-dedup-stats"
            )

    async def _publish_counters(self) -> None:
        """Publish this process's counters for the CLI, every few seconds while they change."""
        client = self._store.client
        interval = self.config.stats_interval
        ttl_ms = int(interval * 4 * 1000)  # outlives a few missed publications, not the process
        while not self._closed:
            try:
                async with (
                    asyncio.timeout(self.config.socket_timeout),
                    client.pipeline(transaction=False) as pipe,
                ):
                    if self._observer.changed:
                        counts = self._observer.snapshot()
                        pipe.hset(self._stats_key, mapping=counts)  # type: ignore[arg-type]
                    pipe.pexpire(self._stats_key, ttl_ms)
                    await pipe.execute()
            except Exception as exc:  # best effort: counters are not part of the protocol
                log.debug("could not publish counters: %s", exc)
                self._observer.changed = True
            if self._closed:  # closed meanwhile: the driver may have swallowed the cancel
                return
            await asyncio.sleep(interval)

    # -- the protocol (shared with SyncDeduplicator) -----------------------------------------

    def _new_owner(self) -> str:
        """A fresh owner id (hex): unique per claim attempt, so a retried claim knows its lease."""
        return f"{self._owner_prefix}{next(self._owner_seq):x}"

    def _lease_meta(self, keys: TokenKeys, fingerprint: str | None) -> bytes:
        fp = "null" if fingerprint is None else json.dumps(fingerprint)
        now = int(time.time() * 1000)
        return f'{{"fp":{fp},{keys.meta},"t":{now}{self._meta_tail}}}'.encode()

    async def _begin(
        self,
        keys: TokenKeys,
        fingerprint: str | None,
        rtype: Any,
        wait_timeout: float | None,
        on_duplicate: str | None,
    ) -> Outcome[Any] | HeldLease:
        """Claim the token: a replayed `Outcome`, a `HeldLease` to run the call under, or wait."""
        started = time.monotonic()
        observer = self._observer
        self._bind_loop(keys)
        if self._publisher is None and not self._closed:
            self._start_publisher()
        if self._store_check is None or not self._store_check.done():
            await self._checked_store()
        elif self._store_check.exception() is not None:
            self._store_check.result()  # require_noeviction refused this Redis
        try:
            first = await self._claim_or_wait(keys, fingerprint, rtype, wait_timeout, on_duplicate)
        except FingerprintMismatch:
            observer.count("fingerprint_mismatch")
            raise
        except StoreUnavailable:
            observer.count("store_errors")
            raise
        if isinstance(first, Outcome):
            observer.count("replays" if first.role is Role.REPLAY else "waits")
            observer.outcome(keys, first.role, first.fence, time.monotonic() - started)
        else:
            observer.count("claims")
            if first.role is Role.TAKEOVER:
                observer.count("takeovers")
        return first

    async def _claim_or_wait(
        self,
        keys: TokenKeys,
        fingerprint: str | None,
        rtype: Any,
        wait_timeout: float | None,
        on_duplicate: str | None,
    ) -> Outcome[Any] | HeldLease:
        if self._closed:
            raise DedupError("the deduplicator is closed", token=keys.token)
        if (self._store.where, keys.lease) in _RUNNING.get():
            scope = f" in scope {keys.scope!r}" if keys.scope else ""
            raise ReentrantCall(
                f"token {keys.token!r}{scope} is called from inside its own primary call: it "
                "would wait for itself (use another token for the inner call)",
                token=keys.token,
            )
        owner = self._new_owner()
        meta = self._lease_meta(keys, fingerprint)
        # Listening already (other local waiters on this token)? Then this read needs no repeat.
        watch = self._subscriber.attach_if_subscribed(keys.channel)
        handed_over = False
        try:
            reply = parse_claim_reply(await self._store.claim(keys, owner, meta))
            if isinstance(reply, Replay):
                return self._from_envelope(reply.envelope, Role.REPLAY, keys, fingerprint, rtype)
            if isinstance(reply, Claimed):
                return self._hold(keys, owner, reply.fence, meta, Role.PRIMARY, fingerprint)
            self._check_lease(reply.lease, keys, fingerprint)
            if (on_duplicate or self.config.on_duplicate) == "raise":
                raise self._in_flight(keys, reply.lease)
            timeout = self.config.wait_timeout if wait_timeout is None else wait_timeout
            handed_over = True  # from here on _wait owns the watch and closes it
            return await self._wait(keys, owner, meta, fingerprint, rtype, timeout, watch, reply)
        finally:
            if watch is not None and not handed_over:
                watch.close()

    def _hold(
        self,
        keys: TokenKeys,
        owner: str,
        fence: int,
        meta: bytes,
        role: Role,
        fingerprint: str | None,
    ) -> HeldLease:
        value = f"{owner}|{fence}|".encode() + meta
        lease = HeldLease(keys, owner, fence, value, role, fingerprint)
        self._renewer.add(lease)
        return lease

    @staticmethod
    def _in_flight(keys: TokenKeys, lease: LeaseInfo) -> DuplicateInFlight:
        return DuplicateInFlight(
            f"token {keys.token!r} is in flight (fence {lease.fence}, "
            f"{lease.pttl_ms} ms left on its lease)",
            token=keys.token,
            owner=lease.owner,
            fence=lease.fence,
            retry_after=max(0.001, lease.pttl_ms / 1000),
        )

    def _check_lease(self, lease: LeaseInfo, keys: TokenKeys, fingerprint: str | None) -> None:
        if fingerprints_conflict(fingerprint, lease.fingerprint):
            raise FingerprintMismatch(
                f"token {keys.token!r} is in flight for a different request (fingerprint differs)",
                token=keys.token,
            )

    async def _wait(
        self,
        keys: TokenKeys,
        owner: str,
        meta: bytes,
        fingerprint: str | None,
        rtype: Any,
        timeout: float,
        watch: Watch | None,
        busy: Busy,
    ) -> Outcome[Any] | HeldLease:
        """Wait as a duplicate until a result arrives or the token is free to take over.

        Subscribe-before-read: ``busy`` counts as a read made while listening only if ``watch``
        was attached before it; otherwise subscribe, wait for Redis to confirm, and read again.
        """
        started = time.monotonic()
        deadline = started + timeout
        current: Busy | None = busy
        not_before = 0.0
        if watch is None:
            watch = self._subscriber.register(keys.channel)
            current = None
        try:
            if current is None:
                await watch.ready(max(0.0, deadline - time.monotonic()))
                not_before = watch.mark
            while True:
                if current is None:
                    if time.monotonic() >= deadline:
                        raise WaitTimeout(
                            f"gave up waiting for token {keys.token!r} after {timeout:g}s",
                            token=keys.token,
                            waited=time.monotonic() - started,
                        )
                    reply = await self._read_again(keys, owner, meta, fingerprint, not_before)
                    if isinstance(reply, Replay):
                        return self._from_envelope(
                            reply.envelope, Role.WAITER, keys, fingerprint, rtype
                        )
                    if isinstance(reply, Claimed):
                        return self._hold(
                            keys, owner, reply.fence, meta, Role.TAKEOVER, fingerprint
                        )
                    self._check_lease(reply.lease, keys, fingerprint)
                    current = reply
                reread_at = time.monotonic() + wait_budget(
                    current.lease.pttl_ms, self.config.takeover_grace, deadline - time.monotonic()
                )
                current = None  # whatever wakes us, the next step reads the token again
                event = await watch.next(max(0.0, reread_at - time.monotonic()))
                while event is WakeUp.APPENDED:  # a streaming primary is alive: keep waiting
                    event = await watch.next(max(0.0, reread_at - time.monotonic()))
                # A shared read must postdate what woke us; after a timeout any read in flight
                # is fresh enough (it only has to show whether the lease is still there).
                not_before = watch.mark if event is not None else 0.0
                if event is None or event is WakeUp.RELEASED or event is WakeUp.MALFORMED:
                    continue  # lease expired, released, or a message that is not ours
                if event is WakeUp.RECONNECTED:
                    await watch.ready(max(0.0, deadline - time.monotonic()))
                    not_before = watch.mark
                    continue
                if event is WakeUp.STORED:
                    stored = await self._fetch_shared(keys)
                    if stored is None:
                        continue
                    return self._from_envelope(stored, Role.WAITER, keys, fingerprint, rtype)
                return self._from_decoded(event, Role.WAITER, keys, fingerprint, rtype)
        finally:
            watch.close()

    async def _read_again(
        self, keys: TokenKeys, owner: str, meta: bytes, fingerprint: str | None, not_before: float
    ) -> Replay | Claimed | Busy:
        """A waiter's re-read (a claim), shared by this process's waiters of the token.

        One claim is in flight per token; a waiter joins it if it was issued at or after
        ``not_before``, else issues its own. When the shared claim wins the token, only its
        issuer takes over; the others see the issuer's fresh lease and keep waiting.
        """
        pending = self._rereads.get(keys.lease)
        if pending is not None and pending[0] >= not_before:
            try:
                reply, issuer, issuer_fp = await asyncio.shield(pending[1])
            except Exception as exc:  # the issuer's read failed: read on our own below
                log.debug("shared re-read of %r failed: %s", keys.token, exc)
            else:
                if isinstance(reply, Claimed):
                    shared = {"fp": issuer_fp} if issuer_fp is not None else {}
                    return Busy(LeaseInfo(issuer, reply.fence, shared, self.config.lease_ttl_ms))
                return reply
        entry: _Reread = (time.monotonic(), asyncio.get_running_loop().create_future())
        self._rereads[keys.lease] = entry
        try:
            reply = parse_claim_reply(await self._store.claim(keys, owner, meta))
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else DedupError("the read was cancelled")
            entry[1].set_exception(error)
            entry[1].exception()  # marked retrieved: there may be no joiner
            raise
        finally:
            if self._rereads.get(keys.lease) is entry:
                del self._rereads[keys.lease]
        entry[1].set_result((reply, owner, fingerprint))
        return reply

    async def _fetch_shared(self, keys: TokenKeys) -> bytes | None:
        """Read a large stored result once per process for all of its waiters."""
        pending = self._fetches.get(keys.result)
        if pending is None:
            pending = asyncio.ensure_future(self._store.get_result(keys))
            self._fetches[keys.result] = pending
            pending.add_done_callback(lambda _: self._fetches.pop(keys.result, None))
        return await asyncio.shield(pending)

    def _from_envelope(
        self, data: bytes, role: Role, keys: TokenKeys, fingerprint: str | None, rtype: Any
    ) -> Outcome[Any]:
        try:
            envelope = decode_envelope(data)
        except (ValueError, KeyError) as exc:
            raise SerializationError(
                f"the value stored for token {keys.token!r} is not a strands-dedup result",
                token=keys.token,
            ) from exc
        return self._from_decoded(envelope, role, keys, fingerprint, rtype)

    def _from_decoded(
        self, envelope: Envelope, role: Role, keys: TokenKeys, fingerprint: str | None, rtype: Any
    ) -> Outcome[Any]:
        if fingerprints_conflict(fingerprint, envelope.fingerprint):
            raise FingerprintMismatch(
                f"token {keys.token!r} was used for a different request (fingerprint differs)",
                token=keys.token,
            )
        if not envelope.ok:
            raise PrimaryFailed(
                f"the primary for token {keys.token!r} failed: "
                f"{envelope.error_type}: {envelope.error_message}",
                token=keys.token,
                error_type=envelope.error_type,
                error_message=envelope.error_message,
                fence=envelope.fence,
            )
        if envelope.serializer != self._serializer.name:
            raise SerializationError(
                f"the result for token {keys.token!r} was written with serializer "
                f"{envelope.serializer!r}; this deduplicator reads {self._serializer.name!r}",
                token=keys.token,
            )
        try:
            value = self._serializer.loads(envelope.payload, rtype)
        except SerializationError as exc:
            exc.token = keys.token
            raise
        except Exception as exc:
            raise SerializationError(
                f"the result for token {keys.token!r} could not be read: {exc}", token=keys.token
            ) from exc
        return Outcome(value, role, envelope.fence)

    async def _run_primary(
        self, lease: HeldLease, call: Callable[[], Awaitable[T]] | Callable[[], T], rtype: Any
    ) -> Outcome[T]:
        task = asyncio.current_task()
        if self.config.on_lease_lost == "cancel":
            lease.task = task
        try:
            with primary_context(lease, self._store.where):
                result = call()
                if inspect.isawaitable(result):
                    result = await result
        except asyncio.CancelledError:
            lease.task = None
            if lease.cancelling and task is not None:
                task.uncancel()
                self._renewer.discard(lease)
                raise self._lost_error(lease, "the call was cancelled") from None
            await asyncio.shield(self._abandon(lease, None))
            raise
        except BaseException as exc:
            lease.task = None
            await self._abandon(lease, exc)
            raise
        lease.task = None
        return await self._complete(lease, cast(T, result), rtype)

    def _lease_lost(self, lease: HeldLease) -> None:
        log.warning(
            "lease lost for token %r (fence %d): another caller may run it",
            lease.keys.token,
            lease.fence,
        )
        if lease.context is not None:
            lease.context.lost.set()
        if lease.task is not None and not lease.task.done():
            lease.cancelling = True
            lease.task.cancel("strands-dedup: lease lost")

    def _lost_error(self, lease: HeldLease, detail: str) -> LeaseLost:
        self._observer.count("lease_lost")
        return LeaseLost(
            f"lease on token {lease.keys.token!r} (fence {lease.fence}) was lost: {detail}",
            token=lease.keys.token,
            fence=lease.fence,
        )

    def _header(self, lease: HeldLease, ok: bool) -> dict[str, Any]:
        return {
            "st": "ok" if ok else "error",
            "f": lease.fence,
            "fp": lease.fingerprint,
            "ser": self._serializer.name,
            "t": int(time.time() * 1000),
            "tok": lease.keys.token,
            "sc": lease.keys.scope,
        }

    async def _complete(self, lease: HeldLease, value: T, rtype: Any) -> Outcome[T]:
        """Serialize and store the result, fenced; wake the waiters."""
        try:
            payload = self._serializer.dumps(value, rtype)
        except Exception as exc:
            error = (
                exc
                if isinstance(exc, SerializationError)
                else SerializationError(f"result could not be serialized: {exc}")
            )
            error.token = lease.keys.token
            await self._abandon(lease, error)
            raise error from (exc if error is not exc else None)
        limit = self.config.max_result_bytes
        if len(payload) > limit:
            too_large = ResultTooLarge(
                f"result for token {lease.keys.token!r} is {len(payload)} bytes; "
                f"max_result_bytes is {limit}",
                token=lease.keys.token,
                size=len(payload),
                limit=limit,
            )
            await self._abandon(lease, too_large)
            raise too_large
        envelope = encode_envelope(lease.owner, self._header(lease, True), payload)
        message = (
            encode_value_message(envelope)
            if len(envelope) <= self.config.inline_result_bytes
            else encode_stored_message(lease.fence)
        )
        try:
            ok, reason = await self._store.settle(
                lease.keys, lease.owner, lease.fence, envelope, message
            )
        except StoreRefused:
            self._observer.count("store_errors")
            raise
        except StoreUnavailable as lost:
            self._observer.count("store_errors")
            ok, reason = await self._settle_again(lease, envelope, message, lost)
        finally:
            self._renewer.discard(lease)
        if not ok:
            raise self._lost_error(lease, f"its completion was refused ({reason})")
        self._observer.outcome(
            lease.keys, lease.role, lease.fence, time.monotonic() - lease.started
        )
        return Outcome(value, lease.role, lease.fence)

    async def _settle_again(
        self, lease: HeldLease, envelope: bytes, message: bytes, lost: StoreUnavailable
    ) -> tuple[bool, str]:
        """The completion was sent but its reply was lost (Redis stalled or the connection
        broke): within the wait budget, once Redis answers, read the token. A stored result
        with this primary's fence is ours; no result: send the completion again (it is fenced,
        so it is refused if the token was claimed since). `OutcomeUnknown` if Redis does not
        answer in time."""
        keys = lease.keys
        log.warning(
            "the completion of token %r (fence %d) got no reply (%s): reading the token again",
            keys.token,
            lease.fence,
            lost,
        )
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(
                lambda exc: isinstance(exc, StoreUnavailable) and not isinstance(exc, StoreRefused)
            ),
            reraise=True,
        )
        try:
            async with asyncio.timeout(self.config.wait_timeout):
                async for attempt in retrying:
                    with attempt:
                        stored = await self._store.get_result(keys)
                        if stored is None:
                            return await self._store.settle(
                                keys, lease.owner, lease.fence, envelope, message
                            )
                        fence = _fence_of(stored)
                        if fence == lease.fence:
                            return True, "ok"
                        return False, f"a result of fence {fence} is stored"
        except StoreRefused:
            raise
        except (StoreUnavailable, TimeoutError) as exc:
            raise OutcomeUnknown(
                f"the completion of token {keys.token!r} (fence {lease.fence}) was sent, but "
                f"Redis at {self._store.where} did not answer within "
                f"{self.config.wait_timeout:g}s (wait_timeout): whether the result is stored "
                "cannot be known",
                token=keys.token,
                fence=lease.fence,
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _abandon(self, lease: HeldLease, exc: BaseException | None) -> None:
        """The primary did not produce a result: share its failure, or release the token.

        ``exc`` is None (or not an ``Exception``) when the call was cancelled or interrupted:
        the token is released and one waiter takes over.
        """
        self._renewer.discard(lease)
        if isinstance(exc, LeaveClaimed):
            log.warning(
                "token %r stays claimed until its lease expires (within %gs): %s",
                lease.keys.token,
                self.config.lease_ttl,
                exc,
            )
            return
        if isinstance(exc, Exception):
            self._observer.count("failures")
        if lease.lost:
            return  # somebody else holds the token now; nothing of ours may be written
        release = not isinstance(exc, Exception) or self.config.on_primary_error == "retry"
        stored = b""
        if release:
            message = encode_released_message(lease.fence)
        else:
            header = self._header(lease, False)
            header["et"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
            header["em"] = str(exc)[:_MAX_ERROR_TEXT]
            envelope = encode_envelope(lease.owner, header, b"")
            stored = envelope if self.config.cache_errors else b""
            message = encode_value_message(envelope)
        try:
            await self._store.settle(lease.keys, lease.owner, lease.fence, stored, message)
        except DedupError as error:
            log.warning(
                "could not release token %r (it frees itself within lease_ttl): %s",
                lease.keys.token,
                error,
            )
