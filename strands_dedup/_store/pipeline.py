"""`AutoPipeline`: commands issued by concurrent calls leave together, on one connection.

A command given to `AutoPipeline.execute` while nothing is in flight is written at once by its
caller, who reads its reply; every command given while something is in flight joins the next
batch: one write of every queued command (at most ``max_batch``) on one connection. Up to
``depth`` batches are written and unanswered at once; a reader task hands their replies to
their callers in order, and halfway through a batch of 32 or more lets the callers answered so
far run on, so their next commands leave as another batch while the rest of the replies are
handed out: Redis works on one batch while this process works on another, instead of each
waiting for the other. (Smaller batches are not split, and a cluster primary's pipeline keeps
one batch in flight: each gets a share of the calls, and splitting their small batches cost
more client time than it saved.)
A lone call costs one round trip, with no hop to another task.
Nothing is transactional: each command succeeds or fails on its own (an error reply goes to its
caller only).

- A caller cancelled while its command waits in the queue is dropped before the write; one
  cancelled after the write has its reply read and discarded (a lone caller cancelled while it
  reads its own reply closes the connection: the next command opens another).
- A connection that fails (connect, write or read error; a batch not answered within
  ``timeout`` of its turn to be read) is closed, every caller of its unanswered batches gets
  that error (the store turns it into `StoreUnavailable`, or retries what is safe to repeat),
  and the next batch opens a new connection from the pool (behind Sentinel: to the current
  primary).
- The connection comes from the client's pool and is held for the pipeline's life, so it counts
  towards ``max_connections``.

On a Redis Cluster, `NodePipelines` keeps one `AutoPipeline` per primary (made on first use,
on a connection of that node): the scripts of concurrent calls whose keys live on one primary
leave together. Routing by slot, redirections and failovers are the store's business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster

__all__ = ["AutoPipeline", "NodePipelines", "NodePool", "pack"]

_Pending = tuple[Sequence[Any], "asyncio.Future[Any]"]


def _pack_python(args: Sequence[Any]) -> bytes:
    """One command in RESP: an array of bulk strings (bytes as they are; str as UTF-8; int and
    float as their decimal text)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        elif isinstance(arg, memoryview):
            data = arg.tobytes()
        else:
            raise rex.DataError(f"cannot send a {type(arg).__name__} to Redis: {arg!r}")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


def _hiredis_packer() -> Callable[[Sequence[Any]], bytes]:
    """hiredis' C packer when the optional hiredis is installed (the same bytes), else ours."""
    try:
        from hiredis import pack_command
    except ImportError:  # pragma: no cover - exercised by the CI pass without hiredis
        return _pack_python

    def pack_c(args: Sequence[Any]) -> bytes:
        try:  # str, bytes, int, float, memoryview: the same bytes as ours
            return cast(bytes, pack_command(tuple(args)))
        except TypeError:  # what hiredis refuses (bool, None, ...): ours says what it is
            return _pack_python(args)

    return pack_c


pack = _hiredis_packer()
"""Pack one command in RESP."""


async def _read_response(conn: Any) -> Any:
    return await conn.read_response(timeout=math.inf)


def reply_reader(conn: Any) -> Callable[[Any], Awaitable[Any]]:
    """How the reader takes one reply off ``conn``: redis-py's ``read_response``, or, on a
    RESP2 connection parsed by hiredis, hiredis' own reader directly (the replies of a batch
    arrive together: most are taken from what was read already, without a coroutine of
    redis-py's per reply). Falls back to ``read_response`` if redis-py's parser is not what is
    expected."""
    parser = getattr(conn, "_parser", None)
    hireader = getattr(parser, "_reader", None)
    fill = getattr(parser, "read_from_socket", None)
    if (
        hireader is None
        or fill is None
        or not type(hireader).__module__.startswith("hiredis")
        or str(getattr(conn, "protocol", 2)) != "2"
    ):
        return _read_response
    gets = hireader.gets
    # What hiredis answers while a reply is incomplete: the parser module's sentinel (False in
    # redis-py releases that have none; RESP2 has no booleans).
    missing = getattr(sys.modules.get(type(parser).__module__), "NOT_ENOUGH_DATA", False)

    async def read(conn: Any) -> Any:
        reply = gets()
        while reply is missing:
            await fill()
            reply = gets()
        if isinstance(reply, BaseException):  # an error reply (hiredis returns it)
            raise reply
        if type(reply) is list and reply and isinstance(reply[0], rex.ConnectionError):
            raise reply[0]
        return reply

    return read


class AutoPipeline:
    """Batches the commands of concurrent callers on one connection of ``pool``."""

    def __init__(self, pool: Any, *, timeout: float, max_batch: int = 256, depth: int = 4) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.pool = pool
        """Where the connection comes from."""
        self._timeout = timeout
        self._max_batch = max_batch
        self._depth = depth
        self._split = 32  # the smallest batch whose callers answered first run on halfway
        self._queue: list[_Pending] = []
        self._conn: Any = None
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        # Batches written and not yet answered, oldest first, with the connection they went on.
        self._inflight: collections.deque[tuple[Any, list[_Pending]]] = collections.deque()
        self._room: asyncio.Future[None] | None = None  # the writer waits here for a free slot
        self._alone = False  # a caller is writing (and reading) a command of its own
        self._closed = False
        self.batches = 0
        """Batches written so far (for tests and benchmarks)."""
        self.commands = 0
        """Commands written so far."""

    async def execute(self, *args: Any) -> Any:
        """Send one command with the others of this loop iteration; its reply (or its error)."""
        if self._closed:
            raise rex.ConnectionError("the pipeline is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._writer is None and self._reader is None and not self._alone and not self._queue:
            # Nothing in flight: this caller writes its command itself (no hop to a writer task);
            # what others send meanwhile gathers into the next batch.
            self._alone = True
            try:
                await self._send_alone(args, future)
            finally:
                self._alone = False
                if self._closed:  # closed while this caller used the connection: it gives it back
                    await self._release()
                elif self._queue and self._writer is None:
                    self._writer = loop.create_task(self._drain())
            return future.result()
        self._queue.append((args, future))
        if self._writer is None and not self._alone:
            self._writer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Write batches until the queue is empty, at most ``depth`` of them unanswered at once
        (what arrives while the slots are taken gathers into the next batch)."""
        loop = asyncio.get_running_loop()
        try:
            while self._queue and not self._closed:
                if len(self._inflight) >= self._depth:
                    self._room = loop.create_future()
                    await self._room
                    continue
                batch = [item for item in self._queue[: self._max_batch] if not item[1].done()]
                del self._queue[: self._max_batch]
                if batch:
                    await self._write(batch)
                    # Let the callers just answered run on: their next commands join the batch.
                    await asyncio.sleep(0)
        finally:
            if self._writer is asyncio.current_task():
                self._writer = None
            if self._queue and not self._closed and self._writer is None:
                # queued while we were being cancelled
                self._writer = loop.create_task(self._drain())

    async def _write(self, batch: list[_Pending]) -> None:
        conn = self._conn
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                await conn.send_packed_command(
                    [pack(args) for args, _ in batch], check_health=False
                )
        except BaseException as exc:
            await self._fail(exc, conn, batch)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self.batches += 1
        self.commands += len(batch)
        self._inflight.append((conn, batch))
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))

    async def _read(self, conn: Any) -> None:
        """Read the replies of the batches written on ``conn``, in order, each batch within
        ``timeout``. Halfway through a large batch its callers answered so far run on, so their
        next commands leave (another slot) while the rest of the replies are handed out: the
        server works on one batch while this process works on the other."""
        read = reply_reader(conn)
        try:
            while self._inflight and self._inflight[0][0] is conn:
                batch = self._inflight[0][1]
                half = len(batch) // 2 if self._depth > 1 and len(batch) >= self._split else 0
                async with asyncio.timeout(self._timeout):
                    for i, (_, future) in enumerate(batch, 1):
                        try:
                            reply = await read(conn)
                        except rex.ResponseError as refused:  # an error reply: this caller's alone
                            if not future.done():
                                future.set_exception(refused)
                        else:
                            if not future.done():
                                future.set_result(reply)
                        if i == half:
                            await asyncio.sleep(0)
                if self._inflight and self._inflight[0][1] is batch:
                    self._inflight.popleft()
                self._wake_writer()
        except BaseException as exc:
            await self._fail(exc, conn)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None
                if self._inflight and not self._closed:  # written on a newer connection
                    newer = self._inflight[0][0]
                    self._reader = asyncio.get_running_loop().create_task(self._read(newer))

    def _wake_writer(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    async def _fail(self, exc: BaseException, conn: Any, batch: Sequence[_Pending] = ()) -> None:
        """``conn`` failed: its callers (``batch`` and every batch unanswered on it) get the
        error, and it is closed; the next batch opens another connection."""
        pending = list(batch)
        if conn is not None and conn is self._conn:
            self._conn = None
            for _, unanswered in self._inflight:
                pending += unanswered
            self._inflight.clear()
            reader = self._reader
            if reader is not None and reader is not asyncio.current_task():
                self._reader = None
                reader.cancel()  # it reads from the connection being closed
        else:
            conn = None  # already closed by whoever failed first
        self._wake_writer()
        error: BaseException = exc
        if isinstance(exc, TimeoutError):
            error = rex.TimeoutError(f"no reply from Redis within {self._timeout:g}s")
        elif isinstance(exc, asyncio.CancelledError):
            error = rex.ConnectionError("the pipeline's writer was cancelled")
        for _, future in pending:
            if not future.done():
                future.set_exception(error)
        if conn is not None:
            await self._close(conn)

    async def _send_alone(self, args: Sequence[Any], future: asyncio.Future[Any]) -> None:
        conn = self._conn
        try:
            async with asyncio.timeout(self._timeout):
                conn = await self._connection()
                await conn.send_packed_command(pack(args), check_health=False)
                self.batches += 1
                self.commands += 1
                try:
                    reply = await conn.read_response(timeout=math.inf)
                except rex.ResponseError as refused:
                    future.set_exception(refused)
                else:
                    future.set_result(reply)
        except BaseException as exc:
            await self._fail(exc, conn, [(args, future)])
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _connection(self) -> Any:
        if self._conn is None:
            conn = await self.pool.get_connection()
            # Each batch is bounded as a whole (`timeout`): no per-write timer (redis-py wraps
            # every write in asyncio.wait_for, a task each, when the connection has a timeout).
            conn.socket_timeout = None
            self._conn = conn
        return self._conn

    async def _close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.pool.release(conn)

    async def aclose(self) -> None:
        """Fail what is queued and what is unanswered, stop the writer and the reader and give
        the connection back."""
        self._closed = True
        queued, self._queue = self._queue, []
        for _, future in queued:
            if not future.done():
                future.set_exception(rex.ConnectionError("the pipeline is closed"))
        for task in (self._writer, self._reader):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        unanswered = [item for _, batch in self._inflight for item in batch]
        self._inflight.clear()
        for _, future in unanswered:
            if not future.done():
                future.set_exception(rex.ConnectionError("the pipeline is closed"))
        if not self._alone:  # else the lone caller reading its reply gives the connection back
            await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self.pool.release(conn)


class NodePool:
    """The connections of one Redis Cluster node (`ClusterNode`) as the pool an `AutoPipeline`
    takes its connection from."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node

    async def get_connection(self) -> Any:
        node = self.node
        conn: Any = node.acquire_connection()
        try:
            await node.disconnect_if_needed(conn)  # stale after a topology change
            await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            node.release(conn)
            raise
        return conn

    async def release(self, conn: Any) -> None:
        # Disconnected first: the cluster client closes only the connections it knows are open
        # (none while it is between slot maps), and the node hands it out again reconnected.
        with contextlib.suppress(Exception):
            await conn.disconnect(nowait=True)
        self.node.release(conn)


class NodePipelines:
    """One `AutoPipeline` per primary of a Redis Cluster, made when a key first routes to it.

    `for_key` maps a key to its slot's primary with the client's slot map. A pipeline whose node
    is no longer a primary the map knows (removed, or demoted by a failover) is closed once the
    map changes: its callers get a connection error, which the store retries on the slot's new
    primary.
    """

    def __init__(self, cluster: RedisCluster, *, timeout: float, max_batch: int = 256) -> None:
        self._cluster = cluster
        self._timeout = timeout
        self._max_batch = max_batch
        self._pipelines: dict[str, AutoPipeline] = {}
        self._checked: object = None  # the slot map the pipelines were last checked against
        self._closing: set[asyncio.Task[None]] = set()
        self._refreshing: asyncio.Task[None] | None = None
        self._closed = False
        self.retired = 0
        """Pipelines closed because their node stopped being a primary."""
        self.redirected = 0
        """Commands answered MOVED or ASK (the store sends them through the client's routing)."""

    @property
    def pipelines(self) -> dict[str, AutoPipeline]:
        """The live pipelines by node name (``host:port``)."""
        return dict(self._pipelines)

    @property
    def batches(self) -> int:
        """Batches written by the live pipelines."""
        return sum(pipeline.batches for pipeline in self._pipelines.values())

    @property
    def commands(self) -> int:
        """Commands written by the live pipelines."""
        return sum(pipeline.commands for pipeline in self._pipelines.values())

    async def for_key(self, key: bytes) -> AutoPipeline:
        """The pipeline of the primary serving ``key``'s slot (the slot map is read first when
        the client has none yet)."""
        cluster = self._cluster
        await cluster.initialize()  # a no-op unless the client dropped its slot map (MOVED storm)
        manager = cluster.nodes_manager
        if manager.slots_cache is not self._checked:
            self.prune()
        slot = cluster.keyslot(key)
        try:
            node = manager.get_node_from_slot(slot)
        except KeyError:  # a partial slot map
            raise rex.SlotNotCoveredError(f"slot {slot} is not covered") from None
        pipeline = self._pipelines.get(node.name)
        if pipeline is None or cast(NodePool, pipeline.pool).node is not node:
            if self._closed:
                raise rex.ConnectionError("the pipelines are closed")
            if pipeline is not None:  # the node left and came back: a new ClusterNode
                self._retire(node.name)
            # One batch in flight per primary: each gets a share of the calls, so its batches
            # are small, and writing the next before the last is answered made them smaller
            # still (more writes per call, measured slower); the primaries overlap instead.
            pipeline = AutoPipeline(
                NodePool(node), timeout=self._timeout, max_batch=self._max_batch, depth=1
            )
            self._pipelines[node.name] = pipeline
        return pipeline

    def prune(self) -> None:
        """Close the pipelines of nodes that are no longer primaries in the slot map."""
        self._checked = self._cluster.nodes_manager.slots_cache
        primaries = {node.name: node for node in self._cluster.get_primaries()}
        for name, pipeline in list(self._pipelines.items()):
            if primaries.get(name) is not cast(NodePool, pipeline.pool).node:
                self._retire(name)

    def _retire(self, name: str, *, node_left: bool = True) -> None:
        pipeline = self._pipelines.pop(name)
        self.retired += node_left
        task = asyncio.ensure_future(pipeline.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def refresh(self, within: float) -> None:
        """Read the slot map again (after a node failed), at most ``within`` seconds; one
        refresh at a time, shared by every caller that asks meanwhile. Never raises."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        with contextlib.suppress(Exception):
            async with asyncio.timeout(within):
                await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        with contextlib.suppress(Exception):
            await self._cluster.nodes_manager.initialize()
            self.prune()

    async def aclose(self) -> None:
        """Close every pipeline (their queued callers get a connection error)."""
        self._closed = True
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for name in list(self._pipelines):
            self._retire(name, node_left=False)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
