"""`SyncDeduplicator`: the blocking facade, a thin shell over the same protocol.

A call claims and settles in the caller's thread through the blocking shell (`BlockingStore`:
a blocking redis-py client sending the same script calls as the asyncio shell), with no event
loop of its own; what a claim's reply means and what a completion or failure sends are the
engine's decisions, shared with the asyncio facade. A private event loop in a daemon thread
(the *portal*) runs only what needs one: the shared subscriber that duplicates wait on (a
waiting duplicate blocks only its own thread), and the renewer (leases are handed to it
thread-safely).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal, Protocol, TypeVar

import redis
import redis.asyncio as aredis
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from .._config import DedupConfig
from .._errors import DedupError, StoreRefused, StoreUnavailable
from .._keys import SessionKeys, TokenKeys
from .._protocol import ClaimReply, Outcome
from .._serialization import Serializer
from .._store import RedisStore
from .._store.blocking import BlockingStore
from .._store.commands import Settled
from .._store.connect import blocking_client_from_url, describe_url
from .call import primary_context
from .deduplicator import (
    UNSET,
    Deduplicator,
    Token,
    call_identity,
    client_name,
    engine_of,
    normalize_fingerprint,
    return_type_of,
)
from .engine import Duplicate, retry_read_back
from .observe import Activity, Health, PrometheusMetrics
from .renewer import HeldLease

__all__ = ["Bridge", "SyncDeduplicator"]

T = TypeVar("T")
log = logging.getLogger("strands_dedup")


class _Portal:
    """An event loop in a daemon thread that blocking callers hand coroutines to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="strands-dedup-portal", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncDeduplicator cannot be called from its own portal thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class _Settler(Protocol):
    """What the facade sends from the caller's thread: a claim, a settle, a result read."""

    def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> ClaimReply: ...

    def settle(
        self, keys: TokenKeys, owner: str, fence: int, stored: bytes, message: bytes
    ) -> Settled: ...

    def get_result(self, keys: TokenKeys) -> bytes | None: ...

    def close(self) -> None: ...


class _ThroughPortal:
    """The asyncio shell's claim and settle run on the portal: for a facade handed an asyncio
    client (it has no blocking twin to build), and for a cluster that waits for replicas."""

    def __init__(self, store: RedisStore, portal: _Portal) -> None:
        self._store = store
        self._portal = portal

    def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> ClaimReply:
        return self._portal.call(self._store.claim(keys, owner, meta))

    def settle(
        self, keys: TokenKeys, owner: str, fence: int, stored: bytes, message: bytes
    ) -> Settled:
        return self._portal.call(self._store.settle(keys, owner, fence, stored, message))

    def get_result(self, keys: TokenKeys) -> bytes | None:
        return self._portal.call(self._store.get_result(keys))

    def close(self) -> None:
        pass  # the core closes its store


def _blocking_store(url: str, config: DedupConfig) -> BlockingStore | None:
    """The blocking shell for ``url`` (None: a cluster that waits for replicas, whose WAIT
    must follow the write on the same node connection: the asyncio shell does that)."""
    client, on_close = blocking_client_from_url(url, config, client_name=client_name())
    if isinstance(client, redis.RedisCluster) and config.min_replicas:
        client.close()
        return None
    return BlockingStore(client, config, where=describe_url(url), on_close=on_close)


class SyncDeduplicator:
    """The same API as `Deduplicator` for blocking code; the call runs in the caller's thread.

    Safe to share between threads, and usable inside a running event loop (it blocks that loop's
    thread while it waits, like any blocking call).
    """

    def __init__(
        self,
        client: aredis.Redis | aredis.RedisCluster | None = None,
        *,
        config: DedupConfig | None = None,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> None:
        core = Deduplicator(
            client, config=config, serializer=serializer, metrics=metrics, **options
        )
        self._setup(core, _blocking_store("memory://", core.config) if client is None else None)

    def _setup(self, core: Deduplicator, blocking: BlockingStore | None) -> None:
        self._core = core
        """The asyncio deduplicator whose subscriber and renewer run on the portal loop."""
        self._portal = _Portal()
        """The event loop (in a daemon thread) the core's background work runs on."""
        self._closed = False
        self._store: _Settler = (
            blocking
            if blocking is not None
            else _ThroughPortal(engine_of(core).store, self._portal)
        )

    @classmethod
    def from_url(
        cls,
        url: str = "memory://",
        *,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> SyncDeduplicator:
        """See `Deduplicator.from_url`."""
        self = cls.__new__(cls)
        core = Deduplicator.from_url(url, serializer=serializer, metrics=metrics, **options)
        self._setup(core, _blocking_store(url, core.config))
        return self

    @property
    def config(self) -> DedupConfig:
        return self._core.config

    def execute(
        self,
        token: Token,
        call: Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> Outcome[T]:
        """See `Deduplicator.execute`; ``call`` is a blocking callable run in this thread."""
        if not callable(call):
            raise TypeError(f"call must be callable, not {type(call).__name__}")
        engine = engine_of(self._core)
        keys = engine.keys.for_token(token, scope)
        rtype = return_type_of(call) if returns is UNSET else returns
        fp = normalize_fingerprint(fingerprint)
        engine.ensure_call_allowed(keys)  # in this thread's context (and closed or not)
        if not engine.is_ready:  # the first call: bind the core to the portal, read the store
            self._portal.call(engine.ready())
        with engine.observer.span(keys) as span:
            first = self._first(keys, fp, rtype, wait_timeout, on_duplicate)
            outcome = first if isinstance(first, Outcome) else self._run_primary(first, call, rtype)
            if span is not None:
                span.set_attribute("strands_dedup.role", outcome.role.value)
                span.set_attribute("strands_dedup.fence", outcome.fence)
            return outcome

    def _first(
        self,
        keys: TokenKeys,
        fingerprint: str | None,
        rtype: Any,
        wait_timeout: float | None,
        on_duplicate: str | None,
    ) -> Outcome[Any] | HeldLease:
        """Claim in this thread; a duplicate waits on the portal (the shared subscriber)."""
        engine = engine_of(self._core)
        started = time.monotonic()
        owner = engine.new_owner()
        meta = engine.lease_meta(keys, fingerprint)
        try:
            reply = self._store.claim(keys, owner, meta)
        except StoreUnavailable as exc:
            engine.count_error(exc)
            raise
        first = engine.after_first_claim(
            reply, keys, owner, meta, fingerprint, rtype, on_duplicate, started, from_thread=True
        )
        if isinstance(first, Duplicate):
            return self._portal.call(engine.wait_duplicate(first, wait_timeout))
        return first

    def _run_primary(self, lease: HeldLease, call: Callable[[], T], rtype: Any) -> Outcome[T]:
        try:
            with primary_context(lease, engine_of(self._core).store.where):
                value = call()
        except BaseException as exc:
            self._fail(lease, exc)
            raise
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            error = TypeError("SyncDeduplicator got an awaitable; use Deduplicator for async calls")
            self._fail(lease, error)
            raise error
        return self._complete(lease, value, rtype)

    def _fail(self, lease: HeldLease, exc: BaseException | None) -> None:
        """`Engine.fail`, sent from this thread."""
        engine = engine_of(self._core)
        engine.drop(lease, from_thread=True)
        sent = engine.failure(lease, exc)
        if sent is None:
            return
        try:
            self._store.settle(lease.keys, lease.owner, lease.fence, *sent)
        except DedupError as error:
            engine.not_released(lease, error)

    def _complete(self, lease: HeldLease, value: T, rtype: Any) -> Outcome[T]:
        """`Engine.complete`, sent from this thread."""
        engine = engine_of(self._core)
        try:
            envelope, message = engine.completion(lease, value, rtype)
        except DedupError as error:
            self._fail(lease, error)
            raise
        lease.ending = True
        try:
            accepted = self._store.settle(lease.keys, lease.owner, lease.fence, envelope, message)
        except StoreRefused:
            engine.observer.count("store_errors")
            raise
        except StoreUnavailable as lost:
            engine.reply_lost(lease, lost)
            accepted = self._settle_again(lease, envelope, message)
        finally:
            engine.drop(lease, from_thread=True)
        return engine.settled(lease, value, accepted)

    def _settle_again(self, lease: HeldLease, envelope: bytes, message: bytes) -> Settled:
        """`Engine`'s read-back after a lost completion reply, from this thread."""
        engine = engine_of(self._core)
        retrying = Retrying(
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(retry_read_back),
            stop=stop_after_delay(engine.config.wait_timeout),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    verdict = engine.read_back(lease, self._store.get_result(lease.keys))
                    if verdict is not None:
                        return verdict
                    return self._store.settle(
                        lease.keys, lease.owner, lease.fence, envelope, message
                    )
        except StoreRefused:
            raise
        except StoreUnavailable as exc:
            raise engine.outcome_unknown(lease, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def run(
        self,
        token: Token,
        call: Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> T:
        """Like `execute`, returning just the value."""
        return self.execute(
            token,
            call,
            scope=scope,
            fingerprint=fingerprint,
            returns=returns,
            wait_timeout=wait_timeout,
            on_duplicate=on_duplicate,
        ).value

    def idempotent(
        self,
        key: Callable[..., Token] | None = None,
        *,
        scope: Callable[..., Token | None] | None = None,
        fingerprint: bool | Callable[..., str | bytes] = True,
        returns: Any = UNSET,
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """See `Deduplicator.idempotent`, for blocking functions."""

        def decorate(func: Callable[..., T]) -> Callable[..., T]:
            if inspect.iscoroutinefunction(inspect.unwrap(func)):
                raise TypeError(f"{func.__qualname__} is async; use Deduplicator.idempotent")
            rtype = return_type_of(func) if returns is UNSET else returns

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> T:
                token, sc, fp = call_identity(func, key, scope, fingerprint, args, kwargs)
                return self.execute(
                    token, lambda: func(*args, **kwargs), scope=sc, fingerprint=fp, returns=rtype
                ).value

            return wrapper

        return decorate

    @property
    def counters(self) -> dict[str, int]:
        """See `Deduplicator.counters`."""
        return self._core.counters

    def activity(self) -> Activity:
        """What this deduplicator does right now, read from memory (see `Deduplicator.activity`)."""
        return self._core.activity()

    def token_keys(self, token: Token, scope: Token | None = None) -> TokenKeys:
        """The Redis keys of ``token`` within ``scope`` (see `Deduplicator.token_keys`)."""
        return self._core.token_keys(token, scope)

    def session_keys(self, session: str) -> SessionKeys:
        """The Redis keys of a guarded session and its conversation (see
        `Deduplicator.session_keys`)."""
        return self._core.session_keys(session)

    def health(self) -> Health:
        """See `Deduplicator.health`."""
        return self._portal.call(self._core.health())

    def close(self) -> None:
        """Close the blocking connections, the core on its loop, and stop the portal thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._store.close()
        except Exception as exc:  # closing must not fail
            log.debug("closing the blocking connections failed: %s", exc)
        try:
            self._portal.call(self._core.aclose())
        finally:
            self._portal.stop()

    def __enter__(self) -> SyncDeduplicator:
        try:
            self._portal.call(engine_of(self._core).ready())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Bridge:
    """Runs coroutines on a deduplicator's event loop, from any loop or thread.

    The surfaces built over either facade (`SessionGuard`, `DedupAgent`) use it: over a
    `SyncDeduplicator` the core lives on the portal loop; over a `Deduplicator`, on the loop
    that uses it.
    """

    def __init__(self, dedup: Deduplicator | SyncDeduplicator, user: str) -> None:
        self.portal: _Portal | None
        if isinstance(dedup, SyncDeduplicator):
            self.core, self.portal = dedup._core, dedup._portal
        elif isinstance(dedup, Deduplicator):
            self.core, self.portal = dedup, None
        else:
            raise TypeError(
                f"{user} needs a Deduplicator or SyncDeduplicator, not {type(dedup).__name__}"
            )
        self.engine = engine_of(self.core)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the core's loop from the current one."""
        portal = self.portal
        if portal is None or asyncio.get_running_loop() is portal.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, portal.loop))

    def block(self, coro: Coroutine[Any, Any, T], hint: str) -> T:
        """Run ``coro`` on the core's loop and block this thread until it is done.

        Over an asyncio `Deduplicator` that needs its loop running in another thread; else
        ``RuntimeError`` with ``hint`` (what to do instead).
        """
        if self.portal is not None:
            return self.portal.call(coro)
        loop = engine_of(self.core).loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or not loop.is_running() or running is loop:
            coro.close()
            raise RuntimeError(hint)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()
