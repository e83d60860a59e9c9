"""Streamed calls: duplicates replay the primary's stream from the start, then follow it live.

The primary's chunks are appended to a Redis Stream in the token's slot (``...:stream``) by a
fenced script, in batches: while one append is in flight the next chunks gather, so the primary
never waits a round trip per chunk. Each append publishes ``A<fence>`` on the token's channel;
followers (duplicates, on this process's shared subscriber) read the new entries with ``XRANGE``.
The call's final value is stored as usual (a completed stream's retry replays it from there), and
the stream key expires soon after the end marker.

Every attempt begins with a ``b`` marker carrying its fence. A follower that has seen chunks of
an attempt whose primary died receives a `StreamReset` when the next attempt begins (or when it
takes over itself), then the new attempt's chunks from the start: never a mix of two attempts.

The engine, `stream_events`, yields `Chunk`, `StreamReset` and `Final` events; `Deduplicator.stream`
(JSON chunks), `DedupAgent.stream_async` and the HTTP middleware are built on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import FingerprintMismatch, LeaseLost, ResultTooLarge, StoreUnavailable, WaitTimeout
from ..protocol import Claimed, Envelope, Outcome, Replay, Role, WakeUp, parse_claim_reply
from ..protocol import wait_budget as _wait_budget

if TYPE_CHECKING:
    from ..keys import TokenKeys
    from ..store import Watch
    from .deduplicator import Deduplicator
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

    def __init__(self, dedup: Deduplicator, lease: HeldLease, best_effort: bool) -> None:
        cfg = dedup.config
        self._best_effort = best_effort
        self._store = dedup._store
        self._lease = lease
        self._pending: list[tuple[bytes, bytes]] = [(b"b", b"")]
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
        self._pending.append((b"c", data))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and not self.lost:
            batch, self._pending = self._pending, []
            try:
                ok = await self._store.append(
                    self._lease.keys, self._lease.owner, self._lease.fence, batch, self._ttl_ms
                )
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
            batch, self._pending = [*self._pending, (b"e", b"")], []
            ok = await self._store.append(
                self._lease.keys, self._lease.owner, self._lease.fence, batch, self._end_ttl_ms
            )
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


async def stream_events(
    dedup: Deduplicator,
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
    timeout = dedup.config.wait_timeout if wait_timeout is None else wait_timeout
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    owner = dedup._new_owner()
    meta = dedup._lease_meta(keys, fingerprint)
    watch: Watch | None = None  # subscribed only once there is somebody to follow
    attempt: int | None = None  # fence of the attempt whose chunks this caller follows
    received = 0  # chunks of that attempt handed to the caller
    cursor: bytes | None = None  # last stream entry read
    first_read = True
    observer = dedup._observer
    leading = False  # the primary's own errors are counted where they happen
    try:
        claims = 0
        while True:
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"gave up following the stream of token {keys.token!r} after {timeout:g}s",
                    token=keys.token,
                    waited=time.monotonic() - started,
                )
            reply = parse_claim_reply(await dedup._store.claim(keys, owner, meta))
            claims += 1
            if isinstance(reply, Replay):
                role = Role.REPLAY if claims == 1 and attempt is None else Role.WAITER
                final = dedup._from_envelope(reply.envelope, role, keys, fingerprint, rtype)
                observer.received(keys, role, final.fence, time.monotonic() - started)
                if received and final.fence != attempt:
                    yield StreamReset(final.fence)  # it completed in an attempt we missed
                yield Final(final)
                return
            if isinstance(reply, Claimed):
                role = Role.PRIMARY if claims == 1 else Role.TAKEOVER
                observer.claimed(role)
                if received:
                    yield StreamReset(reply.fence)
                lease = dedup._hold(keys, owner, reply.fence, meta, role, fingerprint)
                if watch is not None:
                    watch.close()
                leading = True
                async for event in _lead(dedup, lease, produce, rtype, best_effort):
                    yield event
                return
            dedup._check_lease(reply.lease, keys, fingerprint)
            if claims == 1 and (on_duplicate or dedup.config.on_duplicate) == "raise":
                raise dedup._in_flight(keys, reply.lease)
            if watch is None:  # subscribe, then read again: no append or result is missed
                watch = dedup._subscriber.register(keys.channel)
                await watch.ready(max(0.0, deadline - time.monotonic()))
                continue
            reread_at = time.monotonic() + _wait_budget(
                reply.lease.pttl_ms, dedup.config.takeover_grace, deadline - time.monotonic()
            )
            # Follow: read what is there, then wait for appends, the result, or the lease's end.
            while True:
                entries = await dedup._store.read_stream(keys, cursor, _READ_BATCH)
                if first_read and entries:
                    first_read = False
                    begins = [i for i, (_, f) in enumerate(entries) if f.get(b"k") == b"b"]
                    if begins and len(entries) < _READ_BATCH:
                        entries = entries[begins[-1] :]  # start at the latest attempt
                for entry_id, fields in entries:
                    cursor = entry_id
                    kind = fields.get(b"k")
                    fence = int(fields.get(b"f", b"0"))
                    if kind == b"b":
                        if attempt is not None and fence != attempt and received:
                            yield StreamReset(fence)
                            received = 0
                        attempt = fence
                    elif kind == b"c" and fence == attempt:
                        received += 1
                        yield Chunk(fields.get(b"d", b""))
                if len(entries) == _READ_BATCH:
                    continue  # more to read at once
                event = await watch.next(max(0.0, min(deadline, reread_at) - time.monotonic()))
                if event is WakeUp.APPENDED:
                    continue
                if isinstance(event, Envelope):
                    final = dedup._from_decoded(event, Role.WAITER, keys, fingerprint, rtype)
                    observer.received(keys, Role.WAITER, final.fence, time.monotonic() - started)
                    if received and final.fence != attempt:
                        yield StreamReset(final.fence)  # it completed in an attempt we missed
                    yield Final(final)
                    return
                if event is WakeUp.RECONNECTED:
                    await watch.ready(max(0.0, deadline - time.monotonic()))
                break  # stored (large), released, lease expired, or a reconnect: claim again
    except FingerprintMismatch:
        if not leading:
            observer.count("fingerprint_mismatch")
        raise
    except StoreUnavailable:
        if not leading:
            observer.count("store_errors")
        raise
    finally:
        if watch is not None:
            watch.close()


async def _lead(
    dedup: Deduplicator,
    lease: HeldLease,
    produce: Callable[[Emit], Awaitable[Any]],
    rtype: Any,
    best_effort: bool,
) -> AsyncIterator[Event]:
    """Run the call as the primary in its own task; hand its chunks to the caller as they come."""
    events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
    appender = _Appender(dedup, lease, best_effort)

    def emit(data: bytes, original: Any = None) -> None:
        if not isinstance(data, bytes):
            raise TypeError(f"a stream chunk must be bytes, not {type(data).__name__}")
        appender.add(data)
        events.put_nowait(Chunk(data, original))

    async def call() -> Any:
        try:
            value = await produce(emit)
            await appender.finish()
        except BaseException:
            await appender.abort()
            raise
        return value

    def done(task: asyncio.Task[Outcome[Any]]) -> None:
        if task.cancelled():
            events.put_nowait(asyncio.CancelledError())
        elif task.exception() is not None:
            events.put_nowait(task.exception())  # type: ignore[arg-type]
        else:
            events.put_nowait(Final(task.result()))

    task = asyncio.get_running_loop().create_task(dedup._run_primary(lease, call, rtype))
    dedup._background.add(task)
    task.add_done_callback(dedup._background.discard)
    task.add_done_callback(done)
    while True:
        event = await events.get()
        if isinstance(event, BaseException):
            raise event
        yield event
        if isinstance(event, Final):
            return
