"""`SyncDeduplicator`: the blocking facade over the asyncio core.

The core runs on one private event loop in a daemon thread (the *portal*), which owns the
facade's renewer and subscriber: leases are renewed there and duplicates wait there (a waiting
duplicate blocks only its own thread). The claim and the completion of a call are the engine's
own coroutines, run where they cost least: on an event loop of the calling thread's own (a
`_CallerLoop`, over a connection of its own) from the thread's second call on, so a call crosses
no thread; else (the first call of a thread, a cluster or Sentinel, a thread running an event
loop, more threads than ``max_connections``) handed to the portal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

import redis.asyncio as aredis

from ..config import DedupConfig
from ..errors import DedupError
from ..protocol import Outcome
from ..serialization import Serializer
from .call import primary_context
from .deduplicator import (
    UNSET,
    Deduplicator,
    Token,
    call_identity,
    normalize_fingerprint,
    return_type_of,
)
from .engine import Duplicate, Engine
from .observe import Health, PrometheusMetrics
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


class _CallerLoop:
    """An event loop of one calling thread's own, where that thread's claims and completions
    run (the engine's coroutines, over a connection of the thread's own): a call then crosses no
    thread. Its thread holds ``lock`` while the loop runs; closing takes it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        """A view of the core's engine (`Engine.over`) whose store is this loop's."""
        self.loop = asyncio.new_event_loop()
        self.thread = weakref.ref(threading.current_thread())
        self.lock = threading.Lock()

    @property
    def orphaned(self) -> bool:
        """Its thread has ended."""
        thread = self.thread()
        return thread is None or not thread.is_alive()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self.lock:
            if self.loop.is_closed():
                coro.close()
                raise DedupError("the deduplicator is closed")
            task = self.loop.create_task(coro)
            try:
                return self.loop.run_until_complete(task)
            except BaseException:
                if not task.done():  # interrupted (KeyboardInterrupt): let the task unwind
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        self.loop.run_until_complete(task)
                raise

    def close(self) -> None:
        """Close its connection and the loop (from a thread that runs no event loop)."""
        with self.lock:
            if self.loop.is_closed():
                return
            try:
                self.loop.run_until_complete(self.engine.store.aclose())
            except Exception as exc:  # closing must not fail: the socket goes with the loop
                log.debug("closing a caller loop's connection failed: %s", exc)
            finally:
                self.loop.close()


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
        self._setup(core)

    def _setup(self, core: Deduplicator) -> None:
        self.core = core
        """The asyncio deduplicator this facade drives on its portal loop."""
        self.portal = _Portal()
        """The event loop (in a daemon thread) the core runs on."""
        self._closed = False
        self._local = threading.local()
        self._callers: list[_CallerLoop] = []
        self._callers_lock = threading.Lock()
        self._copyable: bool | None = None
        """Whether the core's store can be copied for a caller's loop (None: not tried yet)."""

    @property
    def engine(self) -> Engine:
        """The core's engine (introspection only)."""
        return self.core.engine

    @property
    def caller_loops(self) -> int:
        """Threads whose calls claim and complete on a loop and connection of their own."""
        with self._callers_lock:
            return len(self._callers)

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
        self._setup(Deduplicator.from_url(url, serializer=serializer, metrics=metrics, **options))
        return self

    @property
    def config(self) -> DedupConfig:
        return self.core.config

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
        engine = self.core.engine
        keys = engine.keys.for_token(token, scope)
        rtype = return_type_of(call) if returns is UNSET else returns
        fp = normalize_fingerprint(fingerprint)
        caller = self._caller_loop()
        with engine.span(keys) as span:
            if caller is None:
                first = self.portal.call(engine.begin(keys, fp, rtype, wait_timeout, on_duplicate))
            else:
                engine.check_call(keys)  # in this thread's context (and closed or not)
                claimed = caller.run(
                    caller.engine.first_claim(keys, fp, rtype, on_duplicate, time.monotonic())
                )
                first = (
                    self.portal.call(engine.wait_duplicate(claimed, wait_timeout))
                    if isinstance(claimed, Duplicate)
                    else claimed
                )
            outcome = (
                first
                if isinstance(first, Outcome)
                else self._run_primary(first, call, rtype, caller)
            )
            if span is not None:
                span.set_attribute("strands_dedup.role", outcome.role.value)
                span.set_attribute("strands_dedup.fence", outcome.fence)
            return outcome

    def _run_primary(
        self, lease: HeldLease, call: Callable[[], T], rtype: Any, caller: _CallerLoop | None
    ) -> Outcome[T]:
        engine, run = (
            (self.core.engine, self.portal.call) if caller is None else (caller.engine, caller.run)
        )
        try:
            with primary_context(lease, engine.where):
                value = call()
        except BaseException as exc:
            run(engine.fail(lease, exc))
            raise
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            error = TypeError("SyncDeduplicator got an awaitable; use Deduplicator for async calls")
            run(engine.fail(lease, error))
            raise error
        return run(engine.complete(lease, value, rtype))

    def _caller_loop(self) -> _CallerLoop | None:
        """This thread's own loop for claims and completions, or None: use the portal."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return None  # a thread that runs an event loop cannot run another one
        local = self._local
        mine: _CallerLoop | None = getattr(local, "caller", None)
        if mine is not None:
            return None if mine.loop.is_closed() else mine
        # A thread's first call goes through the portal: a thread made for one call (a thread
        # per request) costs no loop and no connection.
        local.calls = calls = getattr(local, "calls", 0) + 1
        engine = self.core.engine
        if calls < 2 or self._copyable is False or self._closed or not engine.warm:
            return None
        with self._callers_lock:
            for orphan in [c for c in self._callers if c.orphaned]:
                self._callers.remove(orphan)
                orphan.close()
            if self._closed or len(self._callers) >= self.config.max_connections:
                return None
            store = engine.store.for_caller_thread()
            self._copyable = store is not None
            if store is None:
                return None
            mine = local.caller = _CallerLoop(engine.over(store))
            self._callers.append(mine)
        return mine

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
        return self.core.counters

    def health(self) -> Health:
        """See `Deduplicator.health`."""
        return self.portal.call(self.core.health())

    def close(self) -> None:
        """Close the core on its loop and stop the portal thread."""
        if self._closed:
            return
        self._closed = True
        with self._callers_lock:
            callers, self._callers = self._callers, []
        if callers:  # in a thread of its own: this one may be running an event loop

            def close_callers() -> None:
                for caller in callers:
                    caller.close()

            closer = threading.Thread(target=close_callers, name="strands-dedup-close")
            closer.start()
            closer.join()
        try:
            self.portal.call(self.core.aclose())
        finally:
            self.portal.stop()

    def __enter__(self) -> SyncDeduplicator:
        try:
            self.portal.call(self.core.engine.checked_store())
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
            self.core, self.portal = dedup.core, dedup.portal
        elif isinstance(dedup, Deduplicator):
            self.core, self.portal = dedup, None
        else:
            raise TypeError(
                f"{user} needs a Deduplicator or SyncDeduplicator, not {type(dedup).__name__}"
            )
        self.engine = self.core.engine

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
        loop = self.core.engine.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None or not loop.is_running() or running is loop:
            coro.close()
            raise RuntimeError(hint)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()
