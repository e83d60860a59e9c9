"""The shared subscriber: one pub/sub connection per deduplicator, multiplexing every channel.

A waiting duplicate registers a `Watch` (a deque and, while it waits, one future). Nothing else
exists per waiter: no task, no thread, no connection, no polling loop. One reader task reads the
connection and wakes the watches of a channel; one sender task writes SUBSCRIBE/UNSUBSCRIBE in
order. Each message is decoded once per process and the same decoded event goes to every watch.

Subscribe-before-read: a waiter must not re-read the token until Redis has confirmed its
subscription, or a completion published in between would be lost. Confirmations arrive in the
order the commands were sent, so each channel counts its unconfirmed SUBSCRIBEs and is *ready*
only when that count is back to zero while it is meant to be subscribed.

When the connection breaks, every watch receives `WakeUp.RECONNECTED` (messages may have been
missed: re-read after the channel is ready again), the reader reconnects with backoff and sends
one SUBSCRIBE for every channel that still has watches. A PING every ``health_interval`` detects
a connection that died silently.

On a Redis Cluster, `ShardedSubscriber` keeps one such subscriber per shard that has waiters,
speaking sharded pub/sub (SSUBSCRIBE, ``smessage``) to the primary that serves the channels'
slots; after a failover or a slot migration it re-reads the slot map and moves each channel to
the subscriber of the shard that now serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.crc import key_slot

from .._errors import StoreUnavailable
from .._protocol import WakeUp
from .redis import describe_error

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["ShardedSubscriber", "Subscriber", "Watch"]

log = logging.getLogger("strands_dedup.subscriber")


class _Channel:
    __slots__ = ("leaving", "mark", "pending", "ready", "sent", "watches")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.watches: set[Watch] = set()
        self.sent = False  # a SUBSCRIBE is in force (or on its way) on the current connection
        self.pending = 0  # SUBSCRIBEs sent on the current connection, not yet confirmed
        self.leaving = 0  # UNSUBSCRIBEs sent on the current connection, not yet confirmed
        self.ready: asyncio.Future[None] = loop.create_future()
        self.mark = 0.0  # monotonic time of the last confirmation or message


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_WAKE_CHUNK = 256
"""Waiters woken per turn of the event loop when one message reaches many: what else is ready
(the primary's own reply, other connections) runs between chunks instead of after them all."""


def _wake_chunks(watches: tuple[Watch, ...], start: int) -> None:
    end = start + _WAKE_CHUNK
    for watch in watches[start:end]:
        watch.wake()
    if end < len(watches):
        asyncio.get_running_loop().call_soon(_wake_chunks, watches, end)


class Watch:
    """One waiter's registration on a channel."""

    __slots__ = ("_closed", "_events", "_sub", "_waiter", "channel")

    def __init__(self, sub: Subscriber, channel: bytes) -> None:
        self.channel = channel
        self._sub = sub
        self._events: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def deliver(self, event: Any) -> None:
        self._events.append(event)
        self.wake()

    def queue(self, event: Any) -> None:
        """Hold ``event`` for this watch without waking its waiter yet (see `wake`)."""
        self._events.append(event)

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def ready(self, timeout: float) -> None:
        """Wait until the subscription is confirmed on the current connection."""
        state = self._sub._channels.get(self.channel)
        if state is None:  # pragma: no cover - a registered watch keeps its channel
            raise RuntimeError("watch is closed")
        if state.ready.done():
            state.ready.result()
            return
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the subscription is confirmed, and the caller would wait on
            async with asyncio.timeout(timeout):
                await asyncio.shield(state.ready)
        except TimeoutError:
            return  # the caller's own deadline logic decides what happens next

    async def next(self, timeout: float) -> Any:
        """The next event, or None when ``timeout`` passes first."""
        if self._events:
            return self._events.popleft()
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        handle = loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None
        return self._events.popleft() if self._events else None

    @property
    def mark(self) -> float:
        """When the channel last had news (subscription confirmed, or a message): a read of the
        token issued after this instant cannot miss what woke the watch."""
        state = self._sub._channels.get(self.channel)
        return state.mark if state is not None else time.monotonic()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sub._unregister(self)


class Subscriber:
    """Multiplexes every waiting duplicate of one deduplicator over one pub/sub connection."""

    def __init__(
        self,
        new_connection: Callable[[], Any],
        *,
        decode: Callable[[bytes], Any],
        connect_timeout: float,
        give_up_after: float,
        health_interval: float = 5.0,
        sharded: bool = False,
    ) -> None:
        self._new_connection = new_connection
        """Returns a new, unconnected connection (or an awaitable of one)."""
        self.sharded = sharded
        self._commands = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._kinds = (
            (b"smessage", b"ssubscribe", b"sunsubscribe")
            if sharded
            else (b"message", b"subscribe", b"unsubscribe")
        )
        self._decode = decode
        self._connect_timeout = connect_timeout
        self._give_up_after = give_up_after
        self.health_interval = health_interval
        self._channels: dict[bytes, _Channel] = {}
        self._dirty: set[bytes] = set()
        self._flush_scheduled = False
        self._conn: Any = None
        self._outbox: asyncio.Queue[tuple[Any, tuple[bytes, ...]]] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._wanted: asyncio.Event | None = None
        self._closed = False
        self._ping_outstanding = False
        self.connects = 0
        """Connections made so far (more than one means it reconnected)."""
        self.connected_since: float | None = None

    # -- registration ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def waiters(self) -> int:
        return sum(len(state.watches) for state in self._channels.values())

    @property
    def listening(self) -> int:
        """Waiters blocked on a message right now (registered, subscribed and re-read done)."""
        return sum(
            1
            for state in self._channels.values()
            for watch in state.watches
            if watch._waiter is not None and not watch._waiter.done()
        )

    def register(self, channel: bytes) -> Watch:
        """Start listening on ``channel``; await `Watch.ready` before re-reading the token."""
        if self._closed:
            raise StoreUnavailable("the deduplicator is closed")
        watch = Watch(self, channel)
        self._adopt(watch)
        return watch

    def _adopt(self, watch: Watch) -> None:
        loop = asyncio.get_running_loop()
        state = self._channels.get(watch.channel)
        if state is None:
            state = self._channels[watch.channel] = _Channel(loop)
        watch._sub = self
        state.watches.add(watch)
        if not state.sent:
            self._mark(watch.channel)
        self._start(loop)

    def _give_away(self, channel: bytes) -> set[Watch]:
        """Forget ``channel`` (not subscribed on the current connection) and return its watches;
        a waiter blocked on its readiness wakes up and finds RECONNECTED queued."""
        state = self._channels.pop(channel)
        self._dirty.discard(channel)
        _wake(state.ready)
        for watch in state.watches:
            watch.deliver(WakeUp.RECONNECTED)
        return state.watches

    def attach_if_subscribed(self, channel: bytes) -> Watch | None:
        """A watch on ``channel`` if Redis has already confirmed that subscription, else None.

        A read made after this returns needs no second read: anything published after it
        reaches the watch. Fresh calls thus cost no SUBSCRIBE, and duplicates joining a channel
        other local waiters already listen on cost one read instead of two.
        """
        state = self._channels.get(channel)
        if (
            state is None
            or not state.sent
            or state.pending
            or not state.ready.done()
            or state.ready.exception() is not None
            or self._closed
        ):
            return None
        watch = Watch(self, channel)
        state.watches.add(watch)
        return watch

    def _unregister(self, watch: Watch) -> None:
        state = self._channels.get(watch.channel)
        if state is None:
            return
        state.watches.discard(watch)
        if not state.watches:
            self._mark(watch.channel)

    def _mark(self, channel: bytes) -> None:
        self._dirty.add(channel)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Reconcile what is subscribed with what is wanted; batch the commands."""
        self._flush_scheduled = False
        if self._conn is None or self._outbox is None:
            return  # on (re)connect every wanted channel is subscribed anyway
        subscribe: list[bytes] = []
        unsubscribe: list[bytes] = []
        for channel in self._dirty:
            state = self._channels.get(channel)
            if state is None:
                continue
            if state.watches and not state.sent:
                state.sent = True
                state.pending += 1
                if state.ready.done():
                    state.ready = asyncio.get_running_loop().create_future()
                subscribe.append(channel)
            elif not state.watches and state.sent:
                state.sent = False
                state.leaving += 1
                unsubscribe.append(channel)
            if not state.watches and not state.sent and not state.pending and not state.leaving:
                del self._channels[channel]
        self._dirty.clear()
        for command, channels in zip(self._commands, (subscribe, unsubscribe), strict=True):
            for batch in self._batches(channels):
                self._outbox.put_nowait((self._conn, (command, *batch)))

    def _batches(self, channels: list[bytes]) -> list[list[bytes]]:
        """At most 1000 channels per command; sharded commands take channels of one slot."""
        if self.sharded:
            by_slot: dict[int, list[bytes]] = {}
            for channel in channels:
                by_slot.setdefault(key_slot(channel), []).append(channel)
            groups = list(by_slot.values())
        else:
            groups = [channels] if channels else []
        return [g[i : i + 1000] for g in groups for i in range(0, len(g), 1000)]

    # -- tasks ----------------------------------------------------------------------------

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._wanted is None:
            self._wanted = asyncio.Event()
            self._outbox = asyncio.Queue()
        self._wanted.set()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read_loop(), name="strands-dedup-subscriber")
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_loop(), name="strands-dedup-sender")

    async def _send_loop(self) -> None:
        assert self._outbox is not None
        while not self._closed:
            conn, args = await self._outbox.get()
            if conn is not self._conn:
                continue  # meant for a connection that is gone; reconnect resubscribes
            try:
                await conn.send_packed_command(conn.pack_command(*args), check_health=False)
            except Exception as exc:
                log.warning("subscriber send failed, reconnecting: %s", exc)
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)

    async def _connect(self) -> None:
        conn = self._new_connection()
        if inspect.isawaitable(conn):
            async with asyncio.timeout(self._connect_timeout):
                conn = await conn
        try:
            async with asyncio.timeout(self._connect_timeout):
                await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)
            raise
        self._conn = conn
        self._ping_outstanding = False
        self.connects += 1
        self.connected_since = time.monotonic()
        for channel, state in self._channels.items():
            if state.watches:
                self._dirty.add(channel)
        self._flush()

    def _drop(self) -> None:
        """The connection is gone: reset channel state and tell every watch to re-read."""
        self._conn = None
        self.connected_since = None
        loop = asyncio.get_running_loop()
        for channel in list(self._channels):
            state = self._channels[channel]
            state.sent, state.pending, state.leaving = False, 0, 0
            if state.ready.done():
                state.ready = loop.create_future()
            if not state.watches:
                del self._channels[channel]
            for watch in state.watches:
                watch.deliver(WakeUp.RECONNECTED)

    def _fail_waiting(self, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        for state in self._channels.values():
            if not state.ready.done():
                state.ready.set_exception(exc)
                state.ready.exception()  # mark retrieved: a watch may not be awaiting it
            state.ready = loop.create_future()

    async def _read_loop(self) -> None:
        assert self._wanted is not None
        failing_since: float | None = None
        backoff = 0.05
        while not self._closed:
            if self._conn is None:
                if not self._channels:
                    self._wanted.clear()
                    await self._wanted.wait()
                    continue
                try:
                    await self._connect()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    log.warning("subscriber cannot connect: %s", exc)
                    if now - failing_since >= self._give_up_after:
                        error = StoreUnavailable(
                            f"pub/sub connection to Redis failed: {describe_error(exc)}"
                        )
                        error.__cause__ = exc
                        self._fail_waiting(error)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                failing_since = None
            conn = self._conn
            try:
                response = await conn.read_response(
                    disable_decoding=True, timeout=self.health_interval
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closed:
                    log.info("subscriber connection lost, reconnecting: %s", exc)
                    lived = time.monotonic() - (self.connected_since or 0.0)
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    self._drop()
                    if lived < 1.0:  # lost as soon as made: back off rather than spin
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 1.0)
                    else:
                        backoff = 0.05
                continue
            if response is None:
                if self._ping_outstanding:
                    log.warning("subscriber connection unresponsive, reconnecting")
                    with contextlib.suppress(Exception):
                        await conn.disconnect(nowait=True)
                    self._drop()
                else:
                    self._ping_outstanding = True
                    assert self._outbox is not None
                    self._outbox.put_nowait((conn, (b"PING",)))
                continue
            self._handle(response)

    def _handle(self, response: Any) -> None:
        self._ping_outstanding = False  # any reply proves the connection alive (PING answers
        # ["pong", ""] while subscribed, plain PONG once every channel is unsubscribed)
        if not isinstance(response, list) or not response:
            return
        kind = response[0]
        message, subscribed, unsubscribed = self._kinds
        if kind == message:
            state = self._channels.get(response[1])
            if state is None or not state.watches:
                return
            state.mark = time.monotonic()
            event = self._decode(response[2])
            watches = tuple(state.watches)
            if len(watches) <= _WAKE_CHUNK:
                for watch in watches:
                    watch.deliver(event)
            else:  # every watch has the event now; their waiters wake a chunk per loop turn
                for watch in watches:
                    watch.queue(event)
                _wake_chunks(watches, 0)
        elif kind == subscribed:
            state = self._channels.get(response[1])
            if state is None:
                return
            state.pending = max(0, state.pending - 1)
            if state.pending == 0:
                if state.sent:
                    state.mark = time.monotonic()
                    _wake(state.ready)
                elif not state.watches and not state.leaving:
                    del self._channels[response[1]]
        elif kind == unsubscribed:
            state = self._channels.get(response[1])
            if state is None:
                return
            if state.leaving:
                state.leaving -= 1
                if not state.watches and not state.sent and not state.pending and not state.leaving:
                    del self._channels[response[1]]
            elif self.sharded and state.sent and self._conn is not None:
                # Unasked: the channel's slot moved to another shard. Reconnect; the sharded
                # subscriber then re-homes the channel.
                log.info("shard channel unsubscribed by the server (slot moved); reconnecting")
                conn = self._conn
                task = asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._reader, self._sender) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a cancel swallowed inside the driver must not hang the close.
            await asyncio.wait(tasks, timeout=self._connect_timeout)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.disconnect(nowait=True)
            self._conn = None
        error = StoreUnavailable("the deduplicator was closed while this call waited")
        for state in self._channels.values():
            if not state.ready.done():
                state.ready.set_exception(error)
                state.ready.exception()
            for watch in state.watches:
                watch.deliver(WakeUp.RECONNECTED)


def _unset() -> Any:  # pragma: no cover - replaced before the subscriber can connect
    raise RuntimeError("no connection factory")


class ShardedSubscriber:
    """Redis Cluster: one `Subscriber` speaking sharded pub/sub per shard that has waiters.

    A channel goes to the subscriber of the primary serving its slot. Each subscriber connects
    to the shard of its channels; when it reconnects (the primary died, the slot moved), it
    re-reads the slot map first and hands the channels that now live elsewhere to the right
    subscriber, their watches told to re-read as after any reconnect.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        decode: Callable[[bytes], Any],
        connect_timeout: float,
        give_up_after: float,
        health_interval: float = 5.0,
    ) -> None:
        assert store.cluster is not None
        self._store = store
        self._cluster = store.cluster
        self._options: dict[str, Any] = {
            "decode": decode,
            "connect_timeout": connect_timeout,
            "give_up_after": give_up_after,
            "health_interval": health_interval,
        }
        self._shards: dict[str, Subscriber] = {}
        self._names: dict[Subscriber, str] = {}
        self._tried: set[Subscriber] = set()
        """Subscribers that have tried to connect: every later try re-reads the slot map."""
        self._closed = False

    def _node_name(self, channel: bytes) -> str:
        try:
            return str(self._store.slot_primary(channel).name)
        except Exception:  # no slot map yet (or a stale one): resolved when connecting
            return "?"

    def _shard(self, name: str) -> Subscriber:
        sub = self._shards.get(name)
        if sub is None:
            sub = Subscriber(_unset, sharded=True, **self._options)
            sub._new_connection = functools.partial(self._connection_for, sub)
            self._shards[name] = sub
            self._names[sub] = name
        return sub

    async def _connection_for(self, sub: Subscriber) -> Any:
        name = self._names[sub]
        if sub in self._tried or name == "?":
            last = None if name == "?" else name  # the node it last talked to: asked last
            nodes = self._cluster.nodes_manager
            try:
                if last is not None:
                    nodes.move_node_to_end_of_cached_nodes(last)
                async with asyncio.timeout(2 * self._options["connect_timeout"]):
                    await nodes.initialize(last_failed_node_name=last)
            except Exception as exc:  # go on with the slot map as it is; the next try re-reads
                log.info("could not re-read the cluster's slot map: %s", exc)
        channels = [ch for ch, state in sub._channels.items() if state.watches]
        if not channels:
            raise StoreUnavailable("no channel left to subscribe to")
        home = self._node_name(channels[0])
        if name != home:  # this subscriber now serves another shard
            if self._shards.get(name) is sub:
                del self._shards[name]
            self._names[sub] = home
            self._shards.setdefault(home, sub)
        for channel in channels[1:]:
            name = self._node_name(channel)
            target = self._shard(name) if name != home else sub
            if target is not sub:
                for watch in sub._give_away(channel):
                    target._adopt(watch)
        self._tried.add(sub)
        return self._store.shard_connection(channels[0])

    @property
    def connected(self) -> bool:
        """Every shard subscriber with waiters is connected."""
        return all(sub.connected for sub in self._names if sub.waiters)

    @property
    def connects(self) -> int:
        return sum(sub.connects for sub in self._names)

    @property
    def waiters(self) -> int:
        return sum(sub.waiters for sub in self._names)

    @property
    def listening(self) -> int:
        return sum(sub.listening for sub in self._names)

    @property
    def shards(self) -> int:
        """Shard subscribers that have waiters now."""
        return sum(1 for sub in self._names if sub.waiters)

    def register(self, channel: bytes) -> Watch:
        if self._closed:
            raise StoreUnavailable("the deduplicator is closed")
        return self._shard(self._node_name(channel)).register(channel)

    def attach_if_subscribed(self, channel: bytes) -> Watch | None:
        for sub in self._names:
            if channel in sub._channels:
                return sub.attach_if_subscribed(channel)
        return None

    async def aclose(self) -> None:
        self._closed = True
        await asyncio.gather(*(sub.aclose() for sub in list(self._names)))
