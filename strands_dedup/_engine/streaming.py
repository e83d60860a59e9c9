"""Streamed calls: duplicates replay the primary's stream from the start, then follow it live.

The primary's chunks are appended to a Redis Stream in the token's slot (``...:stream``) by a
fenced script, in batches: while one append is in flight the next chunks gather, so the primary
never waits a round trip per chunk. Every item of an attempt has its number (the entry id is
``<fence>-<n>``), so an append sent again after a lost reply adds nothing when its first copy
ran too. Each append publishes ``A<fence>`` on the token's channel; followers (duplicates, on this
process's shared subscriber) read the new entries with ``XRANGE``. The call's final value is
stored as usual (a completed stream's retry replays it from there), and the stream key expires
soon after the end marker.

The end marker carries the count and digest of the attempt's chunks (`StreamTally`). A follower
checks the chunks it relayed against it before it hands over the `Final`: a stream that does not
add up gives it a `StreamReset`, then the stored value from the start (the HTTP middleware aborts
the response instead). A follower that reaches the value without having read the end marker
reads the rest of the attempt first; when there is no end marker (a best-effort stream that
stopped), a best-effort surface checks what it relayed against the stored value itself, others
get a `StreamReset`.

Every attempt begins with a ``b`` marker carrying its fence. A follower that has seen chunks of
an attempt whose primary died receives a `StreamReset` when the next attempt begins (or when it
takes over itself), then the new attempt's chunks from the start: never a mix of two attempts.

The engine, `stream_events`, yields `Chunk`, `StreamReset` and `Final` events; `Deduplicator.stream`
(JSON chunks), `DedupAgent.stream_async` and the HTTP middleware are built on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .._errors import FingerprintMismatch, LeaseLost, ResultTooLarge, StoreUnavailable, WaitTimeout
from .._keys import TokenKeys
from .._protocol import (
    STREAM_BEGIN,
    STREAM_CHUNK,
    STREAM_END,
    Busy,
    Claimed,
    Envelope,
    Outcome,
    Replay,
    Role,
    StreamTally,
    WakeUp,
    wait_budget,
)
from .._serialization import outcome_from_bytes, outcome_from_envelope
from .engine import Done, Engine, Listen
from .renewer import HeldLease

__all__ = ["Chunk", "Emit", "Final", "StreamReset", "stream_events"]

log = logging.getLogger("strands_dedup.stream")
_READ_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of the stream: its bytes, and (for the primary's own caller) the original."""

    data: bytes
    original: Any = None


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The attempt whose chunks this caller received died; the chunks that follow restart the
    stream from its beginning, from a new attempt (``fence``)."""

    fence: int


@dataclass(frozen=True, slots=True)
class Final:
    """The call's stored value (how it was obtained: `Outcome.role`)."""

    outcome: Outcome[Any]


Event = Chunk | StreamReset | Final
Emit = Callable[..., None]
"""``emit(data: bytes, original=None)``: hand one chunk to the followers (and to the caller)."""


class _Appender:
    """Batches a primary's chunks into fenced appends; never makes the producer wait."""

    def __init__(self, engine: Engine, lease: HeldLease, best_effort: bool) -> None:
        cfg = engine.config
        self._best_effort = best_effort
        self._engine = engine
        self._lease = lease
        self._pending: list[tuple[bytes, bytes]] = [(STREAM_BEGIN, b"")]
        self._seq = 0  # number of the next batch's first item within the attempt
        self._tally = StreamTally()
        self._flusher: asyncio.Task[None] | None = None
        self._ttl_ms = cfg.fence_ttl_ms
        self._end_ttl_ms = 2 * cfg.lease_ttl_ms + 10_000
        self._max_chunks = cfg.max_stream_chunks
        self._max_bytes = cfg.max_stream_bytes
        self.chunks = 0
        self.size = 0
        self.lost = False
        self.stopped = False
        self.error: BaseException | None = None

    def add(self, data: bytes) -> None:
        if self.lost:
            raise self._lost()
        if self.stopped:
            return
        if self.error is not None:
            if self._best_effort:
                self._stop(self.error)
                return
            raise self.error
        self.chunks += 1
        self.size += len(data)
        if self.chunks > self._max_chunks or self.size > self._max_bytes:
            which = "chunks" if self.chunks > self._max_chunks else "bytes"
            limit = self._max_chunks if which == "chunks" else self._max_bytes
            too_large = ResultTooLarge(
                f"the stream of token {self._lease.keys.token!r} passed max_stream_{which} "
                f"({limit})",
                token=self._lease.keys.token,
                size=self.size if which == "bytes" else self.chunks,
                limit=limit,
            )
            if self._best_effort:
                self._stop(too_large)
                return
            raise too_large
        self._tally.add(data)
        self._pending.append((STREAM_CHUNK, data))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and not self.lost:
            batch, self._pending = self._pending, []
            seq, self._seq = self._seq, self._seq + len(batch)
            try:
                ok = await self._engine.append(self._lease, batch, self._ttl_ms, seq)
            except Exception as exc:  # the producer hears of it at its next chunk or the end
                self.error = exc
                return
            if not ok:
                self.lost = True

    def _stop(self, reason: BaseException) -> None:
        """Best effort: followers get no more chunks (nor an end marker); the call goes on and
        its stored value gives them the rest."""
        self.stopped = True
        self._pending = []
        log.warning(
            "followers of token %r stop receiving its stream: %s", self._lease.keys.token, reason
        )

    async def finish(self) -> None:
        """Append what is left and the end marker; `LeaseLost` if the lease went meanwhile."""
        if self._flusher is not None:
            await self._flusher
        if self.error is not None and self._best_effort and not self.stopped:
            self._stop(self.error)
        if self.stopped:
            return
        if self.error is not None:
            raise self.error
        if self.chunks == 0 and self._flusher is None:
            return  # nothing was streamed: followers just wait for the stored value
        if not self.lost:
            batch = [*self._pending, (STREAM_END, self._tally.end_marker())]
            self._pending = []
            ok = await self._engine.append(self._lease, batch, self._end_ttl_ms, self._seq)
            self.lost = not ok
        if self.lost:
            raise self._lost()

    async def abort(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher

    def _lost(self) -> LeaseLost:
        lease = self._lease
        return LeaseLost(
            f"lease on token {lease.keys.token!r} (fence {lease.fence}) was lost while it "
            "streamed: another caller took over",
            token=lease.keys.token,
            fence=lease.fence,
        )


@dataclass(frozen=True, slots=True)
class _Lead:
    """A follower's claim won the token: it becomes the primary."""

    fence: int


class _Follower:
    """A duplicate following a streamed call (`WaitHooks` of `Engine.wait`): every read is a
    claim; between reads it reads the attempt's entries as their appends are announced."""

    def __init__(
        self,
        engine: Engine,
        keys: TokenKeys,
        owner: str,
        meta: bytes,
        fingerprint: str | None,
        rtype: Any,
        timeout: float,
        best_effort: bool = False,
    ) -> None:
        self.engine, self.keys, self.owner, self.meta = engine, keys, owner, meta
        self.fingerprint, self.rtype, self.timeout = fingerprint, rtype, timeout
        self.best_effort = best_effort
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.claims = 0
        self.attempt: int | None = None  # fence of the attempt whose chunks this caller follows
        self.live: int | None = None  # fence of the lease the last claim found
        self.received = 0  # chunks of that attempt handed to the caller
        self.tally = StreamTally()  # of the chunks of that attempt relayed to the caller
        self.ended = False  # that attempt's end marker was read (and checked)
        self.cursor: bytes | None = None  # last stream entry read
        self.first_read = True

    async def claim(self) -> Replay | Claimed | Busy:
        self.claims += 1
        return await self.engine.claim(self.keys, self.owner, self.meta)

    async def final(self, outcome: Outcome[Any]) -> Done[list[Event | _Lead]]:
        self.engine.observer.received(
            self.keys, outcome.role, outcome.fence, time.monotonic() - self.started
        )
        events: list[Event | _Lead] = []
        if self.received and outcome.fence == self.attempt and not self.ended:
            # The value came before the end marker was read (a missed wake-up): read the rest
            # of the attempt, up to its end marker, to check what was relayed.
            try:
                events += await self.entries()
            except StoreUnavailable as exc:
                log.debug("could not read the rest of the stream to check it: %s", exc)
            if self.received and not self.ended and not self.best_effort:
                self._reset(outcome.fence, "its end marker is missing", events)
        if self.received and outcome.fence != self.attempt:
            events.append(StreamReset(outcome.fence))  # it completed in an attempt we missed
        events.append(Final(outcome))
        return Done(events)

    async def verdict(self, reply: Replay | Claimed | Busy) -> Done[list[Event | _Lead]] | Busy:
        if isinstance(reply, Replay):
            role = Role.REPLAY if self.claims == 1 and self.attempt is None else Role.WAITER
            serializer = self.engine.serializer
            return await self.final(
                outcome_from_bytes(
                    reply.envelope, role, self.keys, self.fingerprint, self.rtype, serializer
                )
            )
        if isinstance(reply, Claimed):
            return Done([_Lead(reply.fence)])
        self.engine.ensure_same_request(reply.lease, self.keys, self.fingerprint)
        return reply

    async def read(self, not_before: float) -> Done[list[Event | _Lead]] | Listen:
        step = await self.verdict(await self.claim())
        if isinstance(step, Done):
            return step
        until = time.monotonic() + wait_budget(
            step.lease.pttl_ms, self.engine.config.takeover_grace, self.deadline - time.monotonic()
        )
        self.live = step.lease.fence
        return Listen(until, await self.entries())

    async def heard(
        self, event: Any, listening: Listen
    ) -> Done[list[Event | _Lead]] | Listen | None:
        if event is WakeUp.APPENDED:
            return Listen(listening.until, await self.entries())
        if isinstance(event, Envelope):
            serializer = self.engine.serializer
            return await self.final(
                outcome_from_envelope(
                    event, Role.WAITER, self.keys, self.fingerprint, self.rtype, serializer
                )
            )
        return None  # stored (large) or a message that is not ours: claim again

    def expired(self) -> WaitTimeout:
        return WaitTimeout(
            f"gave up following the stream of token {self.keys.token!r} after {self.timeout:g}s",
            token=self.keys.token,
            waited=time.monotonic() - self.started,
        )

    async def entries(self) -> list[Event]:
        """The entries of the live lease's attempt since the last read, as events."""
        events: list[Event] = []
        while True:
            entries = await self.engine.store.read_stream(self.keys, self.cursor, _READ_BATCH)
            if self.first_read and entries:
                self.first_read = False
                begins = [i for i, (_, f) in enumerate(entries) if f.get(b"k") == STREAM_BEGIN]
                if begins and len(entries) < _READ_BATCH:
                    entries = entries[begins[-1] :]  # start at the latest attempt
            for entry_id, fields in entries:
                self.cursor = entry_id
                kind = fields.get(b"k")
                fence = int(fields.get(b"f", b"0"))
                if kind == STREAM_BEGIN:
                    if fence != self.live:
                        # an attempt whose lease is gone: its stream may stop anywhere, and the
                        # holder of the live lease may never stream; follow only the live one
                        continue
                    if self.attempt is not None and fence != self.attempt and self.received:
                        events.append(StreamReset(fence))
                        self.received = 0
                    if fence != self.attempt:
                        self.tally, self.ended = StreamTally(), False
                    self.attempt = fence
                elif fence != self.attempt or self.ended:
                    continue
                elif kind == STREAM_CHUNK:
                    data = fields.get(b"d", b"")
                    self.received += 1
                    self.tally.add(data)
                    events.append(Chunk(data))
                elif kind == STREAM_END:
                    self.ended = True
                    if self.tally.matches(fields.get(b"d", b"")) is False:
                        self._reset(fence, "it does not match its end marker", events)
            if len(entries) < _READ_BATCH:
                return events

    def _reset(self, fence: int, why: str, events: list[Any]) -> None:
        """What this caller relayed of attempt ``fence`` cannot be vouched for: it gets a
        `StreamReset`, then the stored value from the start (no more chunks of the attempt)."""
        self.ended = True
        if not self.received:
            return  # nothing relayed: the stored value will be handed over whole anyway
        log.warning(
            "the stream of token %r (fence %d) is reset for a follower: %s (%d chunks relayed)",
            self.keys.token,
            fence,
            why,
            self.received,
        )
        events.append(StreamReset(fence))
        self.received = 0


async def stream_events(
    engine: Engine,
    keys: TokenKeys,
    produce: Callable[[Emit], Awaitable[Any]],
    *,
    rtype: Any,
    fingerprint: str | None,
    wait_timeout: float | None,
    on_duplicate: str | None = None,
    best_effort: bool = False,
) -> AsyncIterator[Event]:
    """Run ``produce(emit)`` once for the token across every process, or follow who does.

    The primary's caller gets its own chunks (with their originals) as they are emitted; a
    follower gets them from the Redis Stream. Everyone ends with `Final` (the stored value).
    Leaving the iteration early does not stop a primary: it runs to the end, so its followers
    and later retries get the whole stream.

    ``best_effort=True``: a stream that outgrows ``max_stream_bytes`` or whose appends fail stops
    reaching the followers (they get the rest from the stored value) instead of failing the call.
    """
    timeout = engine.config.wait_timeout if wait_timeout is None else wait_timeout
    follower = _Follower(
        engine,
        keys,
        engine.new_owner(),
        engine.lease_meta(keys, fingerprint),
        fingerprint,
        rtype,
        timeout,
        best_effort,
    )
    observer = engine.observer
    with engine.observer.span(keys, current=False) as span:
        try:
            await engine.ready(keys)
            first = await follower.verdict(await follower.claim())
            if isinstance(first, Busy):
                if (on_duplicate or engine.config.on_duplicate) == "raise":
                    raise engine.in_flight(keys, first.lease)
                # subscribe, then claim again: no append or result is missed
                async with contextlib.aclosing(
                    engine.wait(keys.channel, follower.deadline, follower)
                ) as steps:
                    async for step in steps:
                        if isinstance(step, Done):
                            first = step
                        else:
                            yield step
        except FingerprintMismatch:
            observer.count("fingerprint_mismatch")
            raise
        except StoreUnavailable:
            observer.count("store_errors")
            raise
        assert isinstance(first, Done)
        for event in first.value:
            if isinstance(event, _Lead):
                role = Role.PRIMARY if follower.claims == 1 else Role.TAKEOVER
                observer.claimed(role)
                if follower.received:
                    yield StreamReset(event.fence)
                lease = engine.take_lease(
                    keys, follower.owner, event.fence, follower.meta, role, fingerprint
                )
                async for led in _lead(engine, lease, produce, rtype, best_effort):
                    if span is not None and isinstance(led, Final):
                        span.set_attribute("strands_dedup.role", led.outcome.role.value)
                        span.set_attribute("strands_dedup.fence", led.outcome.fence)
                    yield led
                return
            if span is not None and isinstance(event, Final):
                span.set_attribute("strands_dedup.role", event.outcome.role.value)
                span.set_attribute("strands_dedup.fence", event.outcome.fence)
            yield event


async def _lead(
    engine: Engine,
    lease: HeldLease,
    produce: Callable[[Emit], Awaitable[Any]],
    rtype: Any,
    best_effort: bool,
) -> AsyncIterator[Event]:
    """Run the call as the primary in its own task; hand its chunks to the caller as they come.

    The task hands over its own end (the `Final`, or what it raised) before it finishes, so the
    caller wakes in the next loop iteration (no done callback, then a queue, in between).
    """
    events: collections.deque[Event | BaseException] = collections.deque()
    waiter: asyncio.Future[None] | None = None
    appender: _Appender | None = None  # made at the first chunk: many calls stream nothing

    def hand(event: Event | BaseException) -> None:
        events.append(event)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def emit(data: bytes, original: Any = None) -> None:
        nonlocal appender
        if not isinstance(data, bytes):
            raise TypeError(f"a stream chunk must be bytes, not {type(data).__name__}")
        if appender is None:
            appender = _Appender(engine, lease, best_effort)
        appender.add(data)
        hand(Chunk(data, original))

    async def call() -> Any:
        try:
            value = await produce(emit)
            if appender is not None:
                await appender.finish()
        except BaseException:
            if appender is not None:
                await appender.abort()
            raise
        return value

    async def primary() -> None:
        try:
            outcome = await engine.run_primary(lease, call, rtype)
        except asyncio.CancelledError:
            hand(asyncio.CancelledError())
            raise
        except Exception as exc:  # handed to the caller (who may have left): the task ends
            hand(exc)
            return
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: the loop hears of it too
            hand(exc)
            raise
        hand(Final(outcome))

    engine.spawn(primary())
    while True:
        while events:
            event = events.popleft()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Final):
                return
        waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            waiter = None
