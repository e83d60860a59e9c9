"""`RedisStore`: the protocol's round trips on an asyncio client, each one Lua script (or one
plain command): the asyncio shell. What each script sends and how its reply reads is in
``commands.py``; what a driver error means (retried, then `StoreUnavailable`, or `StoreRefused`
with the server's message) is ``failures.py``'s table.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar, cast

import redis.asyncio as aredis
import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode
from tenacity import AsyncRetrying

from .._config import DedupConfig
from .._errors import StoreRefused, StoreUnavailable
from .._keys import SessionKeys, TokenKeys
from .._protocol import Claimed, ClaimReply, Replay
from .commands import (
    BudgetReply,
    Call,
    Commands,
    HeldLeaseRef,
    HeldTicketRef,
    Read,
    ReadFirst,
    Settled,
    claim_again,
)
from .failures import describe_error, is_driver_error, is_transient, retry_policy, store_error
from .pipeline import AutoPipeline, NodePipelines

__all__ = [
    "Client",
    "HeldLeaseRef",
    "HeldTicketRef",
    "RedisStore",
    "can_evict",
    "describe_error",
    "eviction_warning",
    "is_transient",
    "store_error",
    "warn_evicting",
]

log = logging.getLogger("strands_dedup._store")
R = TypeVar("R")
K = TypeVar("K")

Client = aredis.Redis | aredis.RedisCluster
"""A single Redis (direct or behind Sentinel) or a Redis Cluster."""


EVICTING_PREFIXES = ("allkeys-", "volatile-")
"""maxmemory-policy values that can evict this library's keys: every key here has a TTL, so the
``volatile-*`` policies can evict them as well as the ``allkeys-*`` ones."""


def can_evict(policy: str) -> bool:
    """Whether Redis under this ``maxmemory-policy`` may drop a lease, a fence or a result."""
    return policy.startswith(EVICTING_PREFIXES)


def eviction_warning(policy: str, where: str) -> str | None:
    """What to tell an operator about ``policy`` (None when it cannot evict our keys)."""
    if can_evict(policy):
        return (
            f"Redis at {where} has maxmemory-policy {policy}: under memory pressure it can evict "
            "the lease and fence of a call in flight, and the call can then run twice; set "
            "maxmemory-policy noeviction (CONFIG SET maxmemory-policy noeviction, and in its "
            "configuration)"
        )
    if policy == "unknown":
        return (
            f"the maxmemory-policy of Redis at {where} cannot be read (CONFIG is disabled or not "
            "permitted): make sure it is noeviction"
        )
    return None


@functools.cache
def warn_evicting(policy: str, where: str) -> None:
    """Log the eviction warning once per process for each (Redis, policy)."""
    message = eviction_warning(policy, where)
    if message is not None and can_evict(policy):
        log.warning("%s", message)


def _policies(reply: Any) -> list[str]:
    """The values of CONFIG GET maxmemory-policy, from a single node's or a cluster's reply."""
    if isinstance(reply, dict):
        for name, value in reply.items():
            if _text(name) == "maxmemory-policy":
                return [_text(value)]
        return [policy for value in reply.values() for policy in _policies(value)]
    if isinstance(reply, (list, tuple)) and len(reply) == 2:
        return [_text(reply[1])]
    return []


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    """The protocol's operations on one Redis (scripts registered once, run with EVALSHA)."""

    def __init__(
        self,
        client: Client,
        config: DedupConfig,
        *,
        where: str = "redis",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.where = where
        self.clock = clock
        """Monotonic seconds: times a claim's round trip (tests move it)."""
        self.cluster: aredis.RedisCluster | None = (
            client if isinstance(client, aredis.RedisCluster) else None
        )
        """The client when it is a Redis Cluster: scripts then touch one slot each and
        notifications use sharded pub/sub (SPUBLISH, SSUBSCRIBE)."""
        self._config = config
        self.commands = Commands(config, cluster=self.cluster is not None)
        """Each script's keys, arguments and reply parser (no I/O; the blocking shell's too)."""
        self.read_first = ReadFirst()
        """Whether claims read the result key first (replays are common here lately)."""
        self.pipeline: AutoPipeline | None = (
            AutoPipeline(client.connection_pool, timeout=config.socket_timeout)
            if isinstance(client, aredis.Redis) and config.auto_pipeline
            else None
        )
        """Scripts of concurrent calls leave in one write on one connection (see pipeline.py);
        with ``auto_pipeline=False`` each runs on a pooled connection."""
        self.node_pipelines = (
            NodePipelines(self.cluster, timeout=config.socket_timeout)
            if self.cluster is not None and config.auto_pipeline
            else None
        )
        """Cluster: one auto-pipeline per primary; the scripts of concurrent calls whose keys
        live on one primary leave in one write on one connection to it."""
        self._claim_lane: asyncio.Semaphore | None = None
        self._settle_lane: asyncio.Semaphore | None = None
        self._timeout = config.socket_timeout
        self._renew_after = config.effective_renew_interval

    # -- error handling ---------------------------------------------------------------------

    def _lanes(self) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        if self._claim_lane is None or self._settle_lane is None:
            total = self._config.max_connections
            reserved = max(1, min(4, total // 4))
            self._claim_lane = asyncio.Semaphore(total - reserved)
            self._settle_lane = asyncio.Semaphore(reserved)
        return self._claim_lane, self._settle_lane

    async def _run(self, op: Callable[[], Awaitable[R]], *, priority: bool = False) -> R:
        """Run ``op`` holding a connection slot, retrying transient errors.

        Slots are FIFO semaphores over ``max_connections`` connections: a storm of thousands of
        calls queues here with O(1) hand-offs and the pool never opens more. Completions and
        renewals (``priority``) have a reserved lane, so a healthy primary never loses its lease
        or its result while a storm of claims waits for connections.
        """
        claim_lane, settle_lane = self._lanes()
        slots = settle_lane if priority else claim_lane
        if slots.locked():
            try:
                async with asyncio.timeout(self._config.pool_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise StoreUnavailable(
                    f"no free connection to Redis at {self.where} within "
                    f"{self._config.pool_timeout:g}s (max_connections="
                    f"{self._config.max_connections})"
                ) from None
        else:
            await slots.acquire()
        try:
            return await self._attempt(op, bounded=True)
        finally:
            slots.release()

    async def _pipelined(self, queue: Callable[[Any], object]) -> list[Any]:
        """The replies of the commands ``queue`` puts on a redis-py pipeline (not a
        transaction), sent in one round trip like `_run` sends one command."""
        client = self.client

        async def read() -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                queue(pipe)
                return list(await pipe.execute())

        return await self._run(read)

    async def _attempt(self, op: Callable[[], Awaitable[R]], *, bounded: bool) -> R:
        """Run ``op`` once (within ``socket_timeout`` when ``bounded``); retry a transient
        error; a driver error becomes the library's own."""
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:  # fast path: no retry machinery unless the first attempt fails
            if bounded:
                async with asyncio.timeout(self._timeout):
                    result = await op()
            else:
                result = await op()
        except Exception as exc:
            return await self._failed(op, exc)
        if task is not None and task.cancelling() > cancelling:
            # A client swallowed our cancellation (its reply raced it): honour it here.
            raise asyncio.CancelledError
        return result

    async def _failed(self, op: Callable[[], Awaitable[R]], exc: Exception) -> R:
        """After ``op``'s first attempt raised ``exc``: retry it if the error is transient,
        else raise it (a driver error as the library's own)."""
        if not is_transient(exc):
            if isinstance(exc, rex.RedisError):
                raise store_error(exc, self.where) from exc
            raise exc
        log.debug("transient Redis error, retrying: %s", exc)
        return await self._retry(op, exc)

    async def _retry(self, op: Callable[[], Awaitable[R]], first: Exception) -> R:
        if self._config.retry_attempts <= 1:
            raise store_error(first, self.where) from first
        retrying = AsyncRetrying(**retry_policy(self._config))
        try:
            async for attempt in retrying:
                with attempt:
                    async with asyncio.timeout(self._timeout):
                        return await op()
        except Exception as exc:
            if is_driver_error(exc):
                raise store_error(exc, self.where) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- scripts ------------------------------------------------------------------------------

    async def run(self, call: Call[R], *, priority: bool = False) -> R:
        """Run one script call (`commands`) and parse its reply. Through the auto-pipeline it
        needs no connection slot and no timeout of its own (the pipeline bounds each batch);
        else like `_run`. ``priority``: a completion or renewal (see `_run`)."""
        pipeline = self.pipeline
        nodes = self.node_pipelines
        if pipeline is None and nodes is None:
            op: Callable[[], Awaitable[Any]] = lambda: self._eval(call)  # noqa: E731
            return call.parse(await self._run(op, priority=priority))
        # The auto-pipeline's path (on a cluster, the slot's node pipeline), every call's:
        # `_attempt` of `_eval`, unrolled.
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            if pipeline is None:
                assert nodes is not None
                reply = await self._send_on_node(
                    nodes, call.keys[0], lambda send: run_script(send, call)
                )
            else:
                try:
                    reply = await pipeline.execute(*call.evalsha())
                except rex.NoScriptError:
                    reply = await pipeline.execute(*call.eval())
        except Exception as exc:
            return call.parse(await self._failed(lambda: self._eval(call), exc))
        if task is not None and task.cancelling() > cancelling:
            raise asyncio.CancelledError  # a client swallowed our cancellation (see `_attempt`)
        return call.parse(reply)

    async def read(self, read: Read[R]) -> R:
        """Send one plain command (`commands`) like `run` sends a script, and parse its reply."""
        op: Callable[[], Awaitable[Any]] = lambda: self._send(  # noqa: E731
            read.key, lambda send: send(*read.command)
        )
        if self.pipeline is None and self.node_pipelines is None:
            reply = await self._run(op)
        else:
            reply = await self._attempt(op, bounded=False)
        return read.parse(reply)

    async def _replicated(self, call: Call[R], timeout: float, *, priority: bool = False) -> R:
        """Run ``call``, then ``WAIT`` for ``min_replicas`` on the same connection (one round
        trip). Fewer acknowledgements within ``timeout`` are logged, not raised: WAIT narrows
        the window in which a failover can lose a write; it cannot close it."""
        wanted = self._config.min_replicas
        wait = ("WAIT", wanted, max(1, int(timeout * 1000)))
        send = (
            functools.partial(self._then_on_slot_primary, call.keys[0], wait)
            if self.cluster is not None
            else functools.partial(self._then, wait)
        )
        reply, acked = await self._run(lambda: run_script(send, call), priority=priority)
        if int(acked) < wanted:
            log.warning(
                "only %s of %d replicas acknowledged a write within %gs",
                acked,
                wanted,
                timeout,
            )
        return call.parse(reply)

    async def _then(self, then: tuple[Any, ...], *command: Any) -> tuple[Any, Any]:
        """``command``, then ``then``, on one pooled connection (one round trip): both replies;
        an error reply to ``command`` is raised."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.execute_command(*command)
            pipe.execute_command(*then)
            first, second = await pipe.execute(raise_on_error=False)
        for reply in (first, second):
            if isinstance(reply, Exception):
                raise reply
        return first, second

    async def _then_on_slot_primary(
        self, key: bytes, then: tuple[Any, ...], *command: Any
    ) -> tuple[Any, Any]:
        """Cluster: `_then` on one connection to the primary of ``key``'s slot (WAIT counts the
        replicas that acknowledged this connection's writes)."""
        assert self.cluster is not None
        await self.cluster.initialize()  # a no-op once the slot map is known
        node = self.slot_primary(key)
        conn = node.acquire_connection()
        broken = True
        try:
            await conn.send_packed_command(conn.pack_commands([command, then]))
            replies: list[Any] = []
            for _ in range(2):
                try:
                    replies.append(await conn.read_response())
                except rex.ResponseError as exc:
                    replies.append(exc)
            broken = False
            for reply in replies:
                if isinstance(reply, rex.AskError):  # MOVED: the slot has a new primary
                    await self.cluster.nodes_manager.initialize()
                if isinstance(reply, Exception):
                    raise reply
            return replies[0], replies[1]
        except (rex.ConnectionError, rex.TimeoutError, OSError):
            # the node may be gone: read the slot map again before the retry
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._config.connect_timeout):
                    await self.cluster.nodes_manager.initialize()
            raise
        finally:
            if broken:
                await conn.disconnect(nowait=True)
            node.release(conn)

    async def _eval(self, call: Call[Any]) -> Any:
        """Send a script call once (`run_script` handles NOSCRIPT): see `_send`."""
        return await self._send(call.keys[0], lambda send: run_script(send, call))

    async def _send(
        self, key: bytes, how: Callable[[Callable[..., Awaitable[Any]]], Awaitable[Any]]
    ) -> Any:
        """Send one command once, as ``how`` sends it with a sender: through the
        auto-pipeline, the cluster's node pipeline of ``key``'s slot, or a pooled connection."""
        pipeline = self.pipeline
        if pipeline is not None:
            return await how(pipeline.execute)
        if self.node_pipelines is not None:
            return await self._send_on_node(self.node_pipelines, key, how)
        return await how(self.client.execute_command)

    async def _send_on_node(
        self,
        pipelines: NodePipelines,
        key: bytes,
        how: Callable[[Callable[..., Awaitable[Any]]], Awaitable[Any]],
    ) -> Any:
        """Cluster: send a command through the pipeline of its slot's primary (every script's
        keys share one slot). A redirection (MOVED: the slot has a new primary; ASK: it is being
        migrated) sends it through redis-py's routing, which follows the redirection and
        updates the slot map; a connection that failed has the slot map read again before the
        error goes to the retry."""
        assert self.cluster is not None
        try:
            pipeline = await pipelines.for_key(key)
            return await how(pipeline.execute)
        except rex.AskError:  # and MovedError; refused before the command ran
            pipelines.redirected += 1
            async with asyncio.timeout(self._timeout):
                reply = await how(self.cluster.execute_command)
            pipelines.prune()
            return reply
        except (rex.ConnectionError, rex.TimeoutError):
            await pipelines.refresh(self._config.connect_timeout)
            raise

    def slot_primary(self, key: bytes) -> ClusterNode:
        """Cluster: the primary serving ``key``'s hash slot, as the client's slot map has it
        (`redis.exceptions.SlotNotCoveredError` when the map has no primary for it)."""
        assert self.cluster is not None
        return self.cluster.nodes_manager.get_node_from_slot(self.cluster.keyslot(key))

    def _by_slot(self, items: Sequence[K], key: Callable[[K], bytes]) -> list[list[int]]:
        """Indexes of ``items`` grouped so each group's keys share one hash slot (one group on
        a single Redis)."""
        if self.cluster is None:
            return [list(range(len(items)))]
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self.cluster.keyslot(key(item)), []).append(i)
        return list(groups.values())

    # -- operations -------------------------------------------------------------------------

    async def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> ClaimReply:
        """claim.lua: a replay, the lease, or who holds it; while replays are common here
        (`ReadFirst`), a plain GET of the result key first, so a replay runs no script."""
        read_first = self.read_first
        if read_first:
            stored = await self.read(self.commands.stored(keys))
            if stored is not None:
                read_first.saw(True)
                return stored
        call = self.commands.claim(keys, owner, meta)
        started = self.clock()
        if self._config.min_replicas:
            # the lease runs while WAIT waits: a quarter of it at most
            wait = min(self._config.replica_timeout, self._config.lease_ttl / 4)
            reply = await self._replicated(call, wait)
        else:
            reply = await self.run(call)
        if isinstance(reply, Claimed) and claim_again(started, self.clock(), self._renew_after):
            reply = await self.run(call)
        read_first.saw(isinstance(reply, Replay))
        return reply

    def settle(
        self, keys: TokenKeys, owner: str, fence: int, stored: bytes, message: bytes
    ) -> Coroutine[Any, Any, Settled]:
        """Run settle.lua: store ``stored`` (unless empty), drop the lease, publish ``message``.
        (The coroutine of `run`, or `_replicated`: no coroutine of its own on every call's path.)"""
        call = self.commands.settle(keys, owner, fence, stored, message)
        if self._config.min_replicas:
            return self._replicated(call, self._config.replica_timeout, priority=True)
        return self.run(call, priority=True)

    async def _per_slot(
        self,
        items: Sequence[K],
        key: Callable[[K], bytes],
        renew: Callable[[list[K]], Awaitable[list[bool]]],
        within: float | None,
    ) -> list[bool | None]:
        """Run ``renew`` on the items of each hash slot concurrently, each bounded by ``within``
        seconds (retries included). On a cluster, a shard that does not answer in time leaves
        its items' outcome unknown (None) instead of holding up the others: the next period
        tries again. An error is raised only when no group answered."""
        groups = self._by_slot(items, key)

        async def group(indexes: list[int]) -> list[bool | None]:
            try:
                async with asyncio.timeout(within):
                    return list(await renew([items[i] for i in indexes]))
            except TimeoutError:
                raise StoreUnavailable(
                    f"Redis at {self.where} did not renew within {within:g}s"
                ) from None

        if len(groups) == 1:
            return await group(groups[0])
        parts = await asyncio.gather(*(group(g) for g in groups), return_exceptions=True)
        answered: list[list[bool | None]] = []
        for indexes, part in zip(groups, parts, strict=True):
            if isinstance(part, BaseException):
                if not isinstance(part, Exception):
                    raise part
                log.warning(
                    "renewal on one hash slot failed (%d held there): %s", len(indexes), part
                )
                answered.append([None] * len(indexes))
            else:
                answered.append(part)
        if all(isinstance(part, BaseException) for part in parts):
            raise next(p for p in parts if isinstance(p, Exception))
        return _scatter(len(items), groups, answered)

    async def renew(
        self, leases: Sequence[HeldLeaseRef], within: float | None = None
    ) -> list[bool | None]:
        """Renew every lease in one round trip (one per hash slot on a cluster, concurrently):
        True where the lease is still ours, False where it is lost, None where its shard did not
        answer within ``within`` seconds (a cluster with other shards answering)."""
        if not leases:
            return []
        return await self._per_slot(leases, lambda ref: ref.keys.lease, self._renew_slot, within)

    async def _renew_slot(self, leases: list[HeldLeaseRef]) -> list[bool]:
        return await self.run(self.commands.renew(leases), priority=True)

    async def renew_tickets(
        self, tickets: Sequence[HeldTicketRef], within: float | None = None
    ) -> list[bool | None]:
        """Extend every session ticket in one round trip (one per hash slot on a cluster):
        True where it is still held or queued, False where lost, None where unknown (see
        `renew`)."""
        if not tickets:
            return []
        return await self._per_slot(
            tickets, lambda ref: ref.keys.holders, self._renew_tickets_slot, within
        )

    async def _renew_tickets_slot(self, tickets: list[HeldTicketRef]) -> list[bool]:
        return await self.run(self.commands.session_renew(tickets), priority=True)

    async def append(
        self,
        keys: TokenKeys,
        owner: str,
        fence: int,
        items: Sequence[tuple[bytes, bytes]],
        ttl_ms: int,
        seq: int,
    ) -> bool:
        """Run stream_append.lua: append (kind, data) items if the lease is still ours; ``seq``
        numbers the first item within the attempt (an item already appended is skipped)."""
        call = self.commands.stream_append(keys, owner, fence, items, ttl_ms, seq)
        return await self.run(call, priority=True)

    async def read_stream(
        self, keys: TokenKeys, after: bytes | None, count: int
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Stream entries after the id ``after`` (from the start when None), at most ``count``."""
        start = b"-" if after is None else b"(" + after
        reply: Any = await self._run(
            lambda: self.client.xrange(keys.stream, min=start, max=b"+", count=count)
        )
        return cast(list[tuple[bytes, dict[bytes, bytes]]], reply or [])

    async def budget(self, keys: Sequence[bytes], args: Sequence[int]) -> BudgetReply:
        """Run budget.lua (``keys`` from `KeySchema.for_budget`); see its header for the reply."""
        return await self.run(self.commands.budget(keys, args))

    async def get_result(self, keys: TokenKeys) -> bytes | None:
        value = await self._run(lambda: self.client.get(keys.result))
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    async def force_release(self, keys: TokenKeys, owner: str = "") -> bytes | None:
        """Delete the lease (``owner``'s, or whoever's when empty) and wake its waiters; the
        lease value, or None. With an owner it is safe to repeat."""
        return await self.run(self.commands.release(keys, owner), priority=True)

    # -- session admission (session.lua) ----------------------------------------------------------

    async def session_release(self, keys: SessionKeys, ticket: str, idle_ttl_ms: int) -> bool:
        """Give a session place up (holder or waiter); the script admits the next in line.
        True when the ticket held or waited."""
        return await self.run(
            self.commands.session_release(keys, ticket, idle_ttl_ms), priority=True
        )

    # -- conversations (conversation.lua) -----------------------------------------------------

    async def conversation_load(self, keys: SessionKeys) -> dict[bytes, bytes]:
        """Every field of a session's conversation hash (one HGETALL)."""
        reply: Any = await self._run(lambda: self.client.hgetall(keys.conversation))
        return cast(dict[bytes, bytes], reply or {})

    async def session_loads(self, sessions: Sequence[SessionKeys]) -> list[tuple[int, int]]:
        """(holders, waiting) of each session, as Redis counts them now."""

        def queue(pipe: Any) -> None:
            for keys in sessions:
                pipe.zcard(keys.holders)
                pipe.zcard(keys.qexp)

        counts = await self._pipelined(queue)
        return [(int(counts[2 * i]), int(counts[2 * i + 1])) for i in range(len(sessions))]

    async def publish_stats(self, key: bytes, counts: dict[str, int] | None, ttl_ms: int) -> bool:
        """Write a process's counters (when they changed) and keep their hash alive; False when
        the hash was gone (it expired while no counter changed: write them all again)."""
        async with self.client.pipeline(transaction=False) as pipe:
            if counts is not None:
                pipe.hset(key, mapping=counts)  # type: ignore[arg-type]
            pipe.pexpire(key, ttl_ms)
            replies = await pipe.execute()
        return bool(replies[-1])

    # -- inspection (what the CLI reads and repairs) ---------------------------------------------

    async def values_with_ttl(self, keys: Sequence[bytes]) -> list[tuple[bytes | None, int]]:
        """GET and PTTL of each key, in one round trip."""

        def queue(pipe: Any) -> None:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)

        replies = await self._pipelined(queue)
        return [(replies[2 * i], int(replies[2 * i + 1])) for i in range(len(keys))]

    async def session_states(
        self, bases: Sequence[bytes]
    ) -> tuple[float, list[tuple[list[Any], list[Any], dict[bytes, bytes], list[Any]]]]:
        """Redis' clock (ms) and, per session key prefix, its holders and waiters (with lease
        expiries), ticket metadata and state fields (fence, next, gap)."""

        def queue(pipe: Any) -> None:
            pipe.time()
            for base in bases:
                pipe.zrange(base + b"holders", 0, -1, withscores=True)
                pipe.zrange(base + b"qexp", 0, -1, withscores=True)
                pipe.hgetall(base + b"meta")
                pipe.hmget(base + b"state", "fence", "next", "gap")

        replies = await self._pipelined(queue)
        seconds, micros = replies[0]
        now_ms = int(seconds) * 1000 + int(micros) / 1000
        return now_ms, [
            (replies[1 + 4 * i], replies[2 + 4 * i], replies[3 + 4 * i], replies[4 + 4 * i])
            for i in range(len(bases))
        ]

    async def memory_usage(self, keys: Sequence[bytes]) -> list[int | None]:
        """MEMORY USAGE of each key (None where it is gone)."""
        sizes = await self._pipelined(lambda pipe: [pipe.memory_usage(key) for key in keys])
        return [None if size is None else int(size) for size in sizes]

    async def hashes(self, keys: Sequence[bytes]) -> list[dict[bytes, bytes]]:
        """HGETALL of each key, in one round trip."""
        return await self._pipelined(lambda pipe: [pipe.hgetall(key) for key in keys])

    async def delete(self, key: bytes) -> bool:
        """Delete one key; False when it did not exist."""
        return bool(await self._run(lambda: self.client.delete(key)))

    async def check_connection(self) -> None:
        """One PING within ``connect_timeout``, not retried: `StoreUnavailable` naming the cause
        when nothing answers in time or what answers is not Redis; `StoreRefused` for refused
        credentials."""
        timeout = self._config.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await self.probe()
        except TimeoutError:
            raise StoreUnavailable(
                f"Redis at {self.where} is unavailable: no reply within {timeout:g}s "
                "(connect_timeout); is it a Redis server?"
            ) from None
        except Exception as exc:
            if is_driver_error(exc):
                raise store_error(exc, self.where) from exc
            raise

    async def eviction_policy(self) -> str:
        """Redis' ``maxmemory-policy`` (on a cluster: an evicting one among the primaries, if
        any); ``"unknown"`` when CONFIG is disabled or not permitted. `StoreUnavailable` when
        Redis cannot be reached. The embedded ``memory://`` store never evicts."""
        if self.where.startswith("memory://"):
            return "noeviction"

        async def read() -> Any:
            if self.cluster is None:
                return await self.client.config_get("maxmemory-policy")
            return await self.cluster.config_get(
                "maxmemory-policy", target_nodes=aredis.RedisCluster.PRIMARIES
            )

        try:
            policies = _policies(await self._run(read))
        except StoreRefused:
            return "unknown"
        evicting = [policy for policy in policies if can_evict(policy)]
        return (evicting or policies or ["unknown"])[0]

    async def probe(self) -> None:
        """One PING, not retried (every primary of a cluster: a lost replica is no outage)."""
        if self.cluster is None:
            await self.client.ping()
        else:
            await self.cluster.ping(target_nodes=aredis.RedisCluster.PRIMARIES)

    async def probe_write(self, key: bytes) -> None:
        """One small write (``SET key 1 PX 10000``), not retried: `StoreRefused` when Redis
        refuses writes (out of memory, a read-only replica, a missing permission)."""
        try:
            await self.client.set(key, b"1", px=10_000)
        except Exception as exc:
            if is_driver_error(exc):
                raise store_error(exc, self.where) from exc
            raise

    async def listeners(self, channels: Sequence[bytes]) -> dict[bytes, int]:
        """Subscribers per channel (PUBSUB NUMSUB; SHARDNUMSUB on each shard of a cluster)."""
        if not channels:
            return {}
        if self.cluster is None:
            single = self.client
            counts: Any = await self._run(lambda: single.pubsub_numsub(*channels))
            return {_bytes(ch): int(n) for ch, n in counts}
        cluster = self.cluster
        await self._run(cluster.initialize)
        by_node: dict[str, list[bytes]] = {}
        nodes: dict[str, Any] = {}
        for channel in channels:
            node = self.slot_primary(channel)
            nodes[node.name] = node
            by_node.setdefault(node.name, []).append(channel)

        async def shard(name: str) -> Any:
            return await self._run(
                lambda: cluster.execute_command(
                    "PUBSUB SHARDNUMSUB", *by_node[name], target_nodes=nodes[name]
                )
            )

        found: dict[bytes, int] = {}
        for counts in await asyncio.gather(*(shard(name) for name in by_node)):
            found.update({_bytes(ch): int(n) for ch, n in counts})
        return found

    async def scan(self, pattern: bytes, count: int = 1000) -> AsyncIterator[list[bytes]]:
        """Keys matching ``pattern`` in batches (SCAN, never KEYS; every primary of a cluster)."""
        if self.cluster is None:
            targets: list[Any] = [None]
        else:
            await self._run(self.cluster.initialize)
            targets = list(self.cluster.get_primaries())
        for node in targets:
            cursor = 0
            while True:
                cursor, keys = await self._run(
                    functools.partial(self._scan_step, node, cursor, pattern, count)
                )
                if keys:
                    yield keys
                if cursor == 0:
                    break

    async def _scan_step(
        self, node: Any, cursor: int, pattern: bytes, count: int
    ) -> tuple[int, list[bytes]]:
        if node is None:
            next_cursor, found = await self.client.scan(cursor=cursor, match=pattern, count=count)
        else:
            assert self.cluster is not None
            cursors, found = await self.cluster.execute_command(
                "SCAN", cursor, "MATCH", pattern, "COUNT", count, target_nodes=node
            )
            next_cursor = next(iter(cursors.values())) if isinstance(cursors, dict) else cursors
        return int(next_cursor), [_bytes(key) for key in found]

    def new_subscriber_connection(self) -> Any:
        """A dedicated RESP2 connection for the shared subscriber (same address and credentials)."""
        assert self.cluster is None, "a cluster has one subscriber connection per shard"
        assert isinstance(self.client, aredis.Redis)
        pool = self.client.connection_pool
        return _subscriber_connection(pool.connection_class, pool.connection_kwargs)

    def shard_connection(self, channel: bytes) -> Any:
        """Cluster: a dedicated RESP2 connection to the primary serving ``channel``'s slot, for
        a sharded subscriber."""
        assert self.cluster is not None
        node = self.slot_primary(channel)
        return _subscriber_connection(node.connection_class, node.connection_kwargs)

    async def aclose(self) -> None:
        if self.pipeline is not None:
            await self.pipeline.aclose()
        if self.node_pipelines is not None:
            await self.node_pipelines.aclose()
        await self.client.aclose()
        if self.cluster is not None:
            # A cluster client closes nothing while it is between slot maps (after a MOVED
            # storm or a lost node, until its next command): close every node's connections.
            await self.cluster.nodes_manager.aclose()


async def run_script(send: Callable[..., Awaitable[Any]], call: Call[Any]) -> Any:
    """Send ``call`` with ``send`` (any way of sending one command): EVALSHA, and EVAL when
    Redis does not know the script (a restart, SCRIPT FLUSH, a failover), which caches it."""
    try:
        return await send(*call.evalsha())
    except rex.NoScriptError:
        return await send(*call.eval())


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _scatter(size: int, groups: list[list[int]], parts: Sequence[Sequence[K]]) -> list[K]:
    """Put per-group results back in the order of the items they came from."""
    out: list[Any] = [None] * size
    for group, part in zip(groups, parts, strict=True):
        for i, value in zip(group, part, strict=True):
            out[i] = value
    return out


# What a pool adds to its connections' options for RESP3 maintenance notifications (redis-py 8).
# The subscriber speaks RESP2, whose pure-Python parser refuses them: they are dropped.
_RESP3_ONLY = (
    "maint_notifications_config",
    "maint_notifications_pool_handler",
    "oss_cluster_maint_notifications_handler",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
)


def _subscriber_connection(connection_class: Any, connection_kwargs: dict[str, Any]) -> Any:
    kwargs = dict(connection_kwargs)
    kwargs["protocol"] = 2
    kwargs.pop("himport_registry", None)
    for option in _RESP3_ONLY:
        kwargs.pop(option, None)
    name = kwargs.get("client_name")
    if name:
        kwargs["client_name"] = f"{name}:sub"
    return connection_class(**kwargs)
