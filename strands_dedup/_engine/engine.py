"""`Engine`: the protocol of one token, the one implementation every surface runs its calls
through.

One engine per deduplicator (and so per event loop) holds the parts a call needs: the store, the
shared subscriber, the renewer, the observer, the serializer. Its methods are the protocol: claim
(`begin`; `after_first_claim` says what a first claim's reply means), the one waiter loop
(`wait`, with hooks for stream followers and session queues; a duplicate's `wait_duplicate`),
`run_primary`, then `complete`, `fail` or `release` (what they send is decided by `completion`,
`failure`, `settled` and `read_back`, shared with the blocking shell, which sends it itself) and
a stream's fenced `append`. It counts every outcome, so every surface is observed alike.

What is not the protocol lives beside it: health, Redis' eviction policy and the sessions held
(`health`), the stats publisher (`observe`), decoding a stored result (`serialization`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import socket
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from tenacity import AsyncRetrying, retry_if_exception, wait_exponential

from .._config import DedupConfig
from .._errors import (
    DedupError,
    DuplicateInFlight,
    FingerprintMismatch,
    LeaseLost,
    OutcomeUnknown,
    ReentrantCall,
    ResultTooLarge,
    SerializationError,
    StoreRefused,
    StoreUnavailable,
    WaitTimeout,
)
from .._keys import KeySchema, TokenKeys
from .._protocol import (
    Busy,
    Claimed,
    ClaimReply,
    Envelope,
    LeaseInfo,
    LeaveClaimed,
    Outcome,
    Replay,
    Role,
    ShareOnly,
    Wake,
    WakeUp,
    after_wake,
    decode_message,
    encode_envelope,
    encode_lease,
    encode_lease_meta,
    encode_released_message,
    encode_stored_message,
    encode_value_message,
    envelope_header,
    fence_of,
    fingerprints_conflict,
    wait_budget,
)
from .._serialization import Serializer, outcome_from_bytes, outcome_from_envelope
from .._store import Client, RedisStore, ShardedSubscriber, Subscriber, Watch
from .._store.commands import Settled
from .call import is_running, primary_context
from .health import SessionActivity, StorePolicy
from .observe import Observer, PrometheusMetrics, StatsPublisher
from .renewer import HeldLease, Renewer

__all__ = ["Done", "Duplicate", "Engine", "Listen", "WaitHooks"]

log = logging.getLogger("strands_dedup")
T = TypeVar("T")
_MAX_ERROR_TEXT = 2000
_HOST = socket.gethostname()
# A waiter's re-read in flight: when it was issued, and (reply, issuer owner, issuer fingerprint).
_Reread = tuple[float, "asyncio.Future[tuple[ClaimReply, str, str | None]]"]


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """A waiter's end: ``value`` is what its surface waited for."""

    value: T


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A first claim that found the token in flight: what `Engine.wait_duplicate` needs."""

    keys: TokenKeys
    owner: str
    meta: bytes
    fingerprint: str | None
    rtype: Any
    reply: Busy
    started: float


@dataclass(frozen=True, slots=True)
class Listen:
    """Keep listening until ``until`` (monotonic seconds) unless woken; hand ``items`` (a stream
    follower's chunks) to the caller first."""

    until: float
    items: Sequence[Any] = ()


class WaitHooks(Protocol[T]):
    """What one kind of waiter does inside `Engine.wait`."""

    async def read(self, not_before: float) -> Done[T] | Listen:
        """Read the token (or session) again; ``not_before``: a shared read issued earlier than
        this (monotonic) may not be joined."""
        ...

    async def heard(self, event: Any, listening: Listen) -> Done[T] | Listen | None:
        """A message for this waiter (`Wake.HEAR`): done, keep listening, or None: read again."""
        ...

    def expired(self) -> BaseException:
        """The error raised when the deadline passes."""
        ...


def retry_read_back(exc: BaseException) -> bool:
    """Errors after which a lost completion's read-back is tried again (Redis not answering;
    a refusal is final)."""
    return isinstance(exc, StoreUnavailable) and not isinstance(exc, StoreRefused)


class Engine:
    """The protocol of one deduplicator on one event loop (see the module docstring)."""

    def __init__(
        self,
        client: Client,
        config: DedupConfig,
        *,
        where: str,
        owns_client: bool,
        serializer: Serializer,
        metrics: PrometheusMetrics | bool | None,
    ) -> None:
        self.config = config
        self.keys = KeySchema(config.namespace)
        self.store = RedisStore(client, config, where=where)
        self.serializer = serializer
        subscriber_options: dict[str, Any] = {
            "decode": decode_message,
            "connect_timeout": config.connect_timeout,
            "give_up_after": config.retry_deadline,
        }
        self.subscriber: Subscriber | ShardedSubscriber = (
            Subscriber(self.store.new_subscriber_connection, **subscriber_options)
            if self.store.cluster is None
            else ShardedSubscriber(self.store, **subscriber_options)
        )
        self.renewer = Renewer(self.store, config.effective_renew_interval, self._lease_lost)
        if metrics is None or metrics is True:
            metrics = PrometheusMetrics.default()
        self.observer = Observer(config.namespace, metrics or None)
        self.observer.watch_gauges(lambda: self.renewer.held, lambda: self.subscriber.waiters)
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        """The event loop this engine serves (known from its first call)."""
        self._owns_client = owns_client
        self._owner_prefix = os.urandom(6).hex()
        self._owner_seq = itertools.count(1)
        self._fetches: dict[bytes, asyncio.Future[bytes | None]] = {}
        self._rereads: dict[bytes, _Reread] = {}
        self.store_policy = StorePolicy(self.store, config)
        """Redis' eviction policy, read before the first call."""
        self.publisher = StatsPublisher(
            self.observer,
            self.store,
            self.keys.stats_key(f"{_HOST}:{os.getpid()}:{self._owner_prefix}"),
            config.stats_interval,
            config.socket_timeout,
        )
        """Publishes the counters for the CLI from the first call on."""
        self.sessions = SessionActivity()
        """The sessions this engine's callers hold or wait for (`SessionGuard` counts them)."""
        self._background: set[asyncio.Task[Any]] = set()
        """Streaming primaries whose callers may have stopped listening."""

    # -- ids and bookkeeping ----------------------------------------------------------------------

    def new_owner(self) -> str:
        """A fresh owner id (hex): unique per claim attempt, so a retried claim knows its lease."""
        return f"{self._owner_prefix}{next(self._owner_seq):x}"

    def lease_meta(self, keys: TokenKeys, fingerprint: str | None) -> bytes:
        """The metadata a claim records in its lease."""
        return encode_lease_meta(keys.meta, fingerprint, int(time.time() * 1000))

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``coro`` in a task the engine cancels when it closes (a stream's primary)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- claim ------------------------------------------------------------------------------------

    async def begin(
        self,
        keys: TokenKeys,
        fingerprint: str | None,
        rtype: Any,
        wait_timeout: float | None,
        on_duplicate: str | None,
    ) -> Outcome[Any] | HeldLease:
        """Claim the token: a replayed `Outcome`, a `HeldLease` to run the call under, or wait."""
        started = time.monotonic()
        await self.ready(keys)
        # Listening already (other local waiters on this token)? Then the claim's read needs no
        # repeat once subscribed.
        watch = self.subscriber.attach_if_subscribed(keys.channel)
        try:
            first = await self._first_claim(keys, fingerprint, rtype, on_duplicate, started)
            if not isinstance(first, Duplicate):
                return first
            handed, watch = watch, None  # from here on `wait` owns the watch and closes it
            return await self.wait_duplicate(first, wait_timeout, watch=handed)
        finally:
            if watch is not None:
                watch.close()

    async def ready(self, keys: TokenKeys | None = None) -> None:
        """Before a call (of ``keys``) or ``async with``: bound to the running loop, the
        counters published, Redis' eviction policy read (and accepted), the call allowed."""
        self.bind_loop(keys)
        if not self.publisher.started and not self.closed:
            self.publisher.start()
        if not self.store_policy.accepted:
            await self.store_policy.read_once()
        if keys is not None:
            self.ensure_call_allowed(keys)

    def ensure_call_allowed(self, keys: TokenKeys) -> None:
        """`DedupError` once closed; `ReentrantCall` inside the primary call of the same token
        (read from the caller's context)."""
        if self.closed:
            raise DedupError("the deduplicator is closed", token=keys.token)
        if is_running(self.store.where, keys.lease):
            scope = f" in scope {keys.scope!r}" if keys.scope else ""
            raise ReentrantCall(
                f"token {keys.token!r}{scope} is called from inside its own primary call: "
                "it would wait for itself (use another token for the inner call)",
                token=keys.token,
            )

    @property
    def is_ready(self) -> bool:
        """Ready for calls from another thread (the blocking shell's): bound to its loop,
        publishing its counters, the store's policy read and accepted."""
        return self.loop is not None and self.publisher.started and self.store_policy.accepted

    def _keep(self, lease: HeldLease, *, from_thread: bool) -> None:
        """Have the renewer renew ``lease`` (on the engine's own loop)."""
        if not from_thread:
            self.renewer.add(lease)
        else:
            assert self.loop is not None
            self.renewer.add_from_thread(lease, self.loop)

    def drop(self, lease: HeldLease, *, from_thread: bool = False) -> None:
        """Stop renewing ``lease`` (``from_thread``: called outside the engine's loop)."""
        if not from_thread:
            self.renewer.discard(lease)
        else:
            self.renewer.discard_from_thread(lease)

    async def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> ClaimReply:
        """One claim (claim.lua): a replay, the lease, or who holds it."""
        return await self.store.claim(keys, owner, meta)

    async def _first_claim(
        self,
        keys: TokenKeys,
        fingerprint: str | None,
        rtype: Any,
        on_duplicate: str | None,
        started: float,
    ) -> Outcome[Any] | HeldLease | Duplicate:
        """A call's first claim: the replayed `Outcome`, the `HeldLease` to run under, or the
        `Duplicate` to wait as (`wait_duplicate`); `DuplicateInFlight` when told not to wait."""
        owner = self.new_owner()
        meta = self.lease_meta(keys, fingerprint)
        try:
            reply = await self.claim(keys, owner, meta)
        except StoreUnavailable as exc:
            self.count_error(exc)
            raise
        return self.after_first_claim(
            reply, keys, owner, meta, fingerprint, rtype, on_duplicate, started
        )

    def after_first_claim(
        self,
        reply: ClaimReply,
        keys: TokenKeys,
        owner: str,
        meta: bytes,
        fingerprint: str | None,
        rtype: Any,
        on_duplicate: str | None,
        started: float,
        *,
        from_thread: bool = False,
    ) -> Outcome[Any] | HeldLease | Duplicate:
        """What a call's first claim means (both shells): a stored result is replayed, a won
        lease is renewed from now on (``from_thread``: claimed outside the engine's loop), a
        lease held by another caller is waited for (`Duplicate`) unless told not to wait
        (`DuplicateInFlight`) or the request differs (`FingerprintMismatch`)."""
        first: Outcome[Any] | HeldLease
        try:
            if isinstance(reply, Replay):
                first = outcome_from_bytes(
                    reply.envelope, Role.REPLAY, keys, fingerprint, rtype, self.serializer
                )
            elif isinstance(reply, Claimed):
                first = self.take_lease(
                    keys, owner, reply.fence, meta, Role.PRIMARY, fingerprint,
                    from_thread=from_thread,
                )  # fmt: skip
            else:
                self.ensure_same_request(reply.lease, keys, fingerprint)
                if (on_duplicate or self.config.on_duplicate) == "raise":
                    raise self.in_flight(keys, reply.lease)
                return Duplicate(keys, owner, meta, fingerprint, rtype, reply, started)
        except FingerprintMismatch as exc:
            self.count_error(exc)
            raise
        self._count_first(keys, first, started)
        return first

    async def wait_duplicate(
        self, duplicate: Duplicate, wait_timeout: float | None, *, watch: Watch | None = None
    ) -> Outcome[Any] | HeldLease:
        """Wait as a duplicate for the value (or take over); on this engine's loop. ``watch``:
        attached before the claim's read, so that read's verdict counts."""
        keys = duplicate.keys
        timeout = self.config.wait_timeout if wait_timeout is None else wait_timeout
        hooks = _TokenWaiter(
            self,
            keys,
            duplicate.owner,
            duplicate.meta,
            duplicate.fingerprint,
            duplicate.rtype,
            timeout,
        )
        listening = None if watch is None else hooks.listen(duplicate.reply)
        try:
            first: Outcome[Any] | HeldLease = await self.wait_for(
                keys.channel, hooks.deadline, hooks, watch=watch, listening=listening
            )
        except (FingerprintMismatch, StoreUnavailable) as exc:
            self.count_error(exc)
            raise
        self._count_first(keys, first, duplicate.started)
        return first

    def count_error(self, exc: Exception) -> None:
        """Count a failed call: a reused token, or a store error."""
        self.observer.count(
            "fingerprint_mismatch" if isinstance(exc, FingerprintMismatch) else "store_errors"
        )

    def _count_first(
        self, keys: TokenKeys, first: Outcome[Any] | HeldLease, started: float
    ) -> None:
        if isinstance(first, Outcome):
            self.observer.received(keys, first.role, first.fence, time.monotonic() - started)
        else:
            self.observer.claimed(first.role)

    def take_lease(
        self,
        keys: TokenKeys,
        owner: str,
        fence: int,
        meta: bytes,
        role: Role,
        fingerprint: str | None,
        *,
        from_thread: bool = False,
    ) -> HeldLease:
        """A lease just claimed, renewed from now on until it is completed, failed or released."""
        lease = HeldLease(keys, owner, fence, encode_lease(owner, fence, meta), role, fingerprint)
        self._keep(lease, from_thread=from_thread)
        return lease

    @staticmethod
    def in_flight(keys: TokenKeys, lease: LeaseInfo) -> DuplicateInFlight:
        """The error of a duplicate that does not wait."""
        return DuplicateInFlight(
            f"token {keys.token!r} is in flight (fence {lease.fence}, "
            f"{lease.pttl_ms} ms left on its lease)",
            token=keys.token,
            owner=lease.owner,
            fence=lease.fence,
            retry_after=max(0.001, lease.pttl_ms / 1000),
        )

    @staticmethod
    def ensure_same_request(lease: LeaseInfo, keys: TokenKeys, fingerprint: str | None) -> None:
        """`FingerprintMismatch` when the token is in flight for another request."""
        if fingerprints_conflict(fingerprint, lease.fingerprint):
            raise FingerprintMismatch(
                f"token {keys.token!r} is in flight for a different request (fingerprint differs)",
                token=keys.token,
            )

    # -- the waiter loop ----------------------------------------------------------------------

    async def wait(
        self,
        channel: bytes,
        deadline: float,
        hooks: WaitHooks[T],
        *,
        watch: Watch | None = None,
        listening: Listen | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The one waiter loop: yields the items each step hands over, and last a `Done`.

        Subscribe-before-read: ``listening`` (a read's verdict) counts only if ``watch`` was
        attached before that read; otherwise subscribe, wait for Redis to confirm, and read.
        Then: listen until the step's ``until`` (or the deadline), and do what `after_wake`
        says; a lost message costs a re-read, never a hang.
        """
        not_before = 0.0
        if watch is None:
            watch = self.subscriber.register(channel)
            listening = None
        try:
            if listening is None:
                await watch.ready(max(0.0, deadline - time.monotonic()))
                not_before = watch.mark
            while True:
                if listening is None:
                    if time.monotonic() >= deadline:
                        raise hooks.expired()
                    step = await hooks.read(not_before)
                    if isinstance(step, Done):
                        yield step
                        return
                    listening = step
                    for item in step.items:
                        yield item
                assert listening is not None
                event = await watch.next(
                    max(0.0, min(deadline, listening.until) - time.monotonic())
                )
                action = after_wake(event)
                # A shared read must postdate what woke us; after a timeout any read in flight
                # is fresh enough (it only has to show whether the lease is still there).
                not_before = watch.mark if event is not None else 0.0
                if action is Wake.RESUBSCRIBE:
                    await watch.ready(max(0.0, deadline - time.monotonic()))
                    not_before = watch.mark
                if action is not Wake.HEAR:
                    listening = None
                    continue
                heard = await hooks.heard(event, listening)
                if isinstance(heard, Done):
                    yield heard
                    return
                listening = heard
                if heard is not None:
                    for item in heard.items:
                        yield item
        finally:
            watch.close()

    async def wait_for(
        self,
        channel: bytes,
        deadline: float,
        hooks: WaitHooks[T],
        *,
        watch: Watch | None = None,
        listening: Listen | None = None,
    ) -> T:
        """`wait` for a waiter whose steps hand over nothing: its `Done` value."""
        async with contextlib.aclosing(
            self.wait(channel, deadline, hooks, watch=watch, listening=listening)
        ) as steps:
            async for step in steps:
                if isinstance(step, Done):
                    return cast(T, step.value)
        raise AssertionError("the waiter loop ended without a value")  # pragma: no cover

    async def _read_again(
        self, keys: TokenKeys, owner: str, meta: bytes, fingerprint: str | None, not_before: float
    ) -> ClaimReply:
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
            reply = await self.claim(keys, owner, meta)
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
            pending = asyncio.ensure_future(self.store.get_result(keys))
            self._fetches[keys.result] = pending
            pending.add_done_callback(lambda _: self._fetches.pop(keys.result, None))
        return await asyncio.shield(pending)

    # -- the primary --------------------------------------------------------------------------

    async def run_primary(
        self, lease: HeldLease, call: Callable[[], Awaitable[T]] | Callable[[], T], rtype: Any
    ) -> Outcome[T]:
        """Run ``call`` as the primary of ``lease`` (on this loop) and settle the token."""
        if self.config.on_lease_lost == "cancel":
            lease.task = asyncio.current_task()
        try:
            with primary_context(lease, self.store.where):
                result = call()
                if inspect.isawaitable(result):
                    result = await result
        except asyncio.CancelledError:
            task, lease.task = lease.task, None  # set only when a lost lease cancels the call
            if lease.cancelling and task is not None:
                task.uncancel()
                self.drop(lease)
                raise self._lost_error(lease, "the call was cancelled") from None
            await asyncio.shield(self.fail(lease, None))
            raise
        except BaseException as exc:
            lease.task = None
            await self.fail(lease, exc)
            raise
        lease.task = None
        return await self.complete(lease, cast(T, result), rtype)

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
        self.observer.count("lease_lost")
        return LeaseLost(
            f"lease on token {lease.keys.token!r} (fence {lease.fence}) was lost: {detail}",
            token=lease.keys.token,
            fence=lease.fence,
        )

    def _envelope(self, lease: HeldLease, payload: bytes, exc: BaseException | None) -> bytes:
        """The primary's result (``exc`` None) or shared failure, as an envelope."""
        header = envelope_header(
            ok=exc is None,
            fence=lease.fence,
            fingerprint=lease.fingerprint,
            serializer=self.serializer.name,
            created_ms=int(time.time() * 1000),
            # the key names hold the token and scope unless they are digests
            token=lease.keys.token if lease.keys.digested else "",
            scope=lease.keys.scope if lease.keys.digested else "",
            error_type="" if exc is None else f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message="" if exc is None else str(exc)[:_MAX_ERROR_TEXT],
            shared_only=isinstance(exc, ShareOnly),
        )
        return encode_envelope(lease.owner, header, payload)

    # -- settling: what to send (both shells), then sending it (this shell) ----------------------

    def completion(self, lease: HeldLease, value: Any, rtype: Any) -> tuple[bytes, bytes]:
        """The envelope to store and the message to publish for ``value``. `SerializationError`
        or `ResultTooLarge` when it cannot be stored: the caller fails the lease with it."""
        try:
            payload = self.serializer.dumps(value, rtype)
        except SerializationError as exc:
            exc.token = lease.keys.token
            raise
        except Exception as exc:
            raise SerializationError(
                f"result could not be serialized: {exc}", token=lease.keys.token
            ) from exc
        limit = self.config.max_result_bytes
        if len(payload) > limit:
            raise ResultTooLarge(
                f"result for token {lease.keys.token!r} is {len(payload)} bytes; "
                f"max_result_bytes is {limit}",
                token=lease.keys.token,
                size=len(payload),
                limit=limit,
            )
        envelope = self._envelope(lease, payload, None)
        message = (
            encode_value_message(envelope)
            if len(envelope) <= self.config.inline_result_bytes
            else encode_stored_message(lease.fence)
        )
        return envelope, message

    def failure(self, lease: HeldLease, exc: BaseException | None) -> tuple[bytes, bytes] | None:
        """What a primary that did not produce a result sends: (stored, message), or None when
        nothing may be written (left claimed, or the lease is lost). ``exc`` None (or not an
        ``Exception``): cancelled or interrupted, the token is released."""
        lease.ending = True
        if isinstance(exc, LeaveClaimed):
            log.warning(
                "token %r stays claimed until its lease expires (within %gs): %s",
                lease.keys.token,
                self.config.lease_ttl,
                exc,
            )
            return None
        if isinstance(exc, Exception) and not isinstance(exc, ShareOnly):
            self.observer.count("failures")
        if lease.lost:
            return None  # somebody else holds the token now; nothing of ours may be written
        release = not isinstance(exc, Exception) or self.config.on_primary_error == "retry"
        stored = b""
        if isinstance(exc, ShareOnly):  # handed to the waiters of the moment, never stored
            message = encode_value_message(self._envelope(lease, exc.shared, exc))
        elif release:
            message = encode_released_message(lease.fence)
        else:
            envelope = self._envelope(lease, b"", exc)
            stored = envelope if self.config.cache_errors else b""
            message = encode_value_message(envelope)
        return stored, message

    @staticmethod
    def not_released(lease: HeldLease, error: DedupError) -> None:
        """A failure's settle that did not get through: the lease frees itself."""
        log.warning(
            "could not release token %r (it frees itself within lease_ttl): %s",
            lease.keys.token,
            error,
        )

    def settled(self, lease: HeldLease, value: T, accepted: Settled) -> Outcome[T]:
        """The primary's `Outcome` once its completion was answered; `LeaseLost` if refused."""
        if not accepted.ok:
            raise self._lost_error(lease, f"its completion was refused ({accepted.reason})")
        self.observer.outcome(lease.keys, lease.role, lease.fence, time.monotonic() - lease.started)
        return Outcome(value, lease.role, lease.fence)

    def reply_lost(self, lease: HeldLease, lost: StoreUnavailable) -> None:
        """A completion sent without a reply: counted and logged; the shell reads the token."""
        self.observer.count("store_errors")
        log.warning(
            "the completion of token %r (fence %d) got no reply (%s): reading the token again",
            lease.keys.token,
            lease.fence,
            lost,
        )

    @staticmethod
    def read_back(lease: HeldLease, stored: bytes | None) -> Settled | None:
        """What the token read after a lost completion reply says: a stored result with this
        primary's fence is its own; another fence's is not; no result: None, send the
        completion again (it is fenced, so it is refused if the token was claimed since)."""
        if stored is None:
            return None
        fence = fence_of(stored)
        if fence == lease.fence:
            return Settled(True, "ok")
        return Settled(False, f"a result of fence {fence} is stored")

    def outcome_unknown(self, lease: HeldLease, exc: BaseException) -> OutcomeUnknown:
        """The completion was sent but Redis did not answer within ``wait_timeout``."""
        error = OutcomeUnknown(
            f"the completion of token {lease.keys.token!r} (fence {lease.fence}) was sent, but "
            f"Redis at {self.store.where} did not answer within "
            f"{self.config.wait_timeout:g}s (wait_timeout): whether the result is stored "
            "cannot be known",
            token=lease.keys.token,
            fence=lease.fence,
        )
        error.__cause__ = exc
        return error

    async def complete(self, lease: HeldLease, value: T, rtype: Any) -> Outcome[T]:
        """Serialize and store the result, fenced; wake the waiters."""
        try:
            envelope, message = self.completion(lease, value, rtype)
        except DedupError as error:
            await self.fail(lease, error)
            raise
        lease.ending = True
        try:
            accepted = await self.store.settle(
                lease.keys, lease.owner, lease.fence, envelope, message
            )
        except StoreRefused:
            self.observer.count("store_errors")
            raise
        except StoreUnavailable as lost:
            self.reply_lost(lease, lost)
            accepted = await self._settle_again(lease, envelope, message)
        finally:
            self.drop(lease)
        return self.settled(lease, value, accepted)

    async def _settle_again(self, lease: HeldLease, envelope: bytes, message: bytes) -> Settled:
        """The completion was sent but its reply was lost (Redis stalled or the connection
        broke): within the wait budget, once Redis answers, read the token (`read_back`).
        `OutcomeUnknown` if Redis does not answer in time."""
        keys = lease.keys
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception(retry_read_back),
            reraise=True,
        )
        try:
            async with asyncio.timeout(self.config.wait_timeout):
                async for attempt in retrying:
                    with attempt:
                        verdict = self.read_back(lease, await self.store.get_result(keys))
                        if verdict is not None:
                            return verdict
                        return await self.store.settle(
                            keys, lease.owner, lease.fence, envelope, message
                        )
        except StoreRefused:
            raise
        except (StoreUnavailable, TimeoutError) as exc:
            raise self.outcome_unknown(lease, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def release(self, lease: HeldLease) -> None:
        """Give the token up without a result: one waiter takes over."""
        await self.fail(lease, None)

    async def fail(self, lease: HeldLease, exc: BaseException | None) -> None:
        """The primary did not produce a result: share its failure, or release the token
        (`failure` says what to send)."""
        self.drop(lease)
        sent = self.failure(lease, exc)
        if sent is None:
            return
        try:
            await self.store.settle(lease.keys, lease.owner, lease.fence, *sent)
        except DedupError as error:
            self.not_released(lease, error)

    async def append(
        self, lease: HeldLease, items: Sequence[tuple[bytes, bytes]], ttl_ms: int, seq: int
    ) -> bool:
        """Append a streaming primary's (kind, data) items, fenced, the first of them numbered
        ``seq`` within the attempt (safe to repeat); False: the lease is lost."""
        return await self.store.append(lease.keys, lease.owner, lease.fence, items, ttl_ms, seq)

    # -- lifecycle ---------------------------------------------------------------------------

    def bind_loop(self, keys: TokenKeys | None = None) -> None:
        """Remember the event loop of the first use; refuse any other one with a `DedupError`
        (a raw driver error would follow: "Event loop is closed", "attached to a different
        loop")."""
        loop = asyncio.get_running_loop()
        if self.loop is None:
            self.loop = loop
        elif loop is not self.loop:
            state = "closed" if self.loop.is_closed() else "still open"
            raise DedupError(
                f"this Deduplicator belongs to the event loop it was first used on "
                f"({self.loop!r}, {state}), not to the running one ({loop!r}): its connections, "
                "renewer and subscriber live on that loop. Create one Deduplicator per event "
                "loop (for each asyncio.run, or each thread's loop), or use SyncDeduplicator "
                "from blocking code and threads",
                token=keys.token if keys is not None else None,
            )

    async def aclose(self) -> None:
        """Stop the background work, the renewer and the subscriber; close the connections if
        this engine made them."""
        if self.closed:
            return
        self.closed = True
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.config.connect_timeout)
        await self.publisher.aclose()
        await self.renewer.aclose()
        await self.subscriber.aclose()
        if self._owns_client:
            await self.store.aclose()


class _TokenWaiter:
    """A duplicate waiting for a token's result (`WaitHooks` of `Engine.begin`)."""

    __slots__ = (
        "deadline",
        "engine",
        "fingerprint",
        "keys",
        "meta",
        "owner",
        "rtype",
        "serializer",
        "started",
        "timeout",
    )

    def __init__(
        self,
        engine: Engine,
        keys: TokenKeys,
        owner: str,
        meta: bytes,
        fingerprint: str | None,
        rtype: Any,
        timeout: float,
    ) -> None:
        self.engine, self.keys, self.owner, self.meta = engine, keys, owner, meta
        self.fingerprint, self.rtype = fingerprint, rtype
        self.serializer = engine.serializer
        self.started = time.monotonic()
        self.timeout = timeout
        self.deadline = self.started + timeout

    def listen(self, busy: Busy) -> Listen:
        until = time.monotonic() + wait_budget(
            busy.lease.pttl_ms,
            self.engine.config.takeover_grace,
            self.deadline - time.monotonic(),
        )
        return Listen(until)

    async def read(self, not_before: float) -> Done[Outcome[Any] | HeldLease] | Listen:
        engine, keys = self.engine, self.keys
        reply = await engine._read_again(keys, self.owner, self.meta, self.fingerprint, not_before)
        if isinstance(reply, Replay):
            outcome = outcome_from_bytes(
                reply.envelope, Role.WAITER, keys, self.fingerprint, self.rtype, self.serializer
            )
            return Done(outcome)
        if isinstance(reply, Claimed):
            return Done(
                engine.take_lease(
                    keys, self.owner, reply.fence, self.meta, Role.TAKEOVER, self.fingerprint
                )
            )
        engine.ensure_same_request(reply.lease, keys, self.fingerprint)
        return self.listen(reply)

    async def heard(
        self, event: Any, listening: Listen
    ) -> Done[Outcome[Any] | HeldLease] | Listen | None:
        if event is WakeUp.APPENDED:
            return listening  # a streaming primary is alive: keep waiting
        if event is WakeUp.STORED:
            stored = await self.engine._fetch_shared(self.keys)
            if stored is None:
                return None
            return Done(
                outcome_from_bytes(
                    stored, Role.WAITER, self.keys, self.fingerprint, self.rtype, self.serializer
                )
            )
        if isinstance(event, Envelope):
            return Done(
                outcome_from_envelope(
                    event, Role.WAITER, self.keys, self.fingerprint, self.rtype, self.serializer
                )
            )
        return None  # not a token's message: read again

    def expired(self) -> WaitTimeout:
        return WaitTimeout(
            f"gave up waiting for token {self.keys.token!r} after {self.timeout:g}s",
            token=self.keys.token,
            waited=time.monotonic() - self.started,
        )
