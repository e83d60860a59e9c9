"""`BlockingStore`: the protocol's claim and completion on a blocking redis-py client, the
blocking shell. It sends the same calls as the asyncio shell (``commands.py``), handles
NOSCRIPT and retries the same way, and maps driver errors with the same table
(``failures.py``); it runs in the caller's thread with no event loop.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions as rex
from tenacity import Retrying

from .._config import DedupConfig
from .._keys import TokenKeys
from .._protocol import Claimed, ClaimReply, Replay
from .commands import Call, Commands, Read, ReadFirst, Settled, claim_again
from .failures import is_driver_error, is_transient, retry_policy, store_error

__all__ = ["BlockingClient", "BlockingStore", "PooledSender", "run_script_blocking"]

R = TypeVar("R")
log = logging.getLogger("strands_dedup._store")
BlockingClient = redis.Redis | redis.RedisCluster
"""A blocking client of a single Redis (direct, behind Sentinel, or the embedded fakeredis)
or of a Redis Cluster."""


class PooledSender:
    """Sends one command and returns its raw reply on a pooled connection of a single Redis
    (direct or behind Sentinel): ``send_command`` and ``read_response``, without
    ``execute_command``'s per-command layers (argument checks, telemetry hooks, a retry wrapper
    the library's own retries make redundant); our replies need none of its response callbacks
    (scripts, GET).

    Connections back from a command wait in a short list for the next one, most recent first:
    taking one from the pool costs more than the round trip (a queue, a readiness check,
    telemetry). A reply is always read whole before a connection comes back, so none holds stale
    data; at most half the pool waits there, so the client's own commands always find one.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[Any] = []
        self._keep = max(1, min(16, int(getattr(pool, "max_connections", 2) or 2) // 2))
        self._pid = os.getpid()

    @classmethod
    def for_client(cls, client: BlockingClient) -> PooledSender | None:
        """One for ``client``, or None where ``execute_command`` must send (a cluster client,
        a client holding one connection, the embedded store)."""
        pool = getattr(client, "connection_pool", None)
        if type(client) is not redis.Redis or pool is None or client.connection is not None:
            return None
        connection_class = pool.connection_class
        if not issubclass(connection_class, redis.connection.AbstractConnection):
            return None
        return None if "fakeredis" in connection_class.__module__ else cls(pool)

    def __call__(self, *command: Any) -> Any:
        idle = self._idle
        if self._pid != os.getpid():  # a forked child must not share its parent's sockets
            idle.clear()
            self._pid = os.getpid()
        try:
            connection = idle.pop()
        except IndexError:
            connection = self._pool.get_connection()
        try:
            connection.send_command(*command)
            reply = connection.read_response()
        except rex.ResponseError:
            self._give_back(connection)  # Redis answered with an error: the reply was read whole
            raise
        except BaseException:
            connection.disconnect()  # a reply half read must not reach the next command
            self._pool.release(connection)
            self.close()  # the server may have gone: so have the waiting ones (the pool checks)
            raise
        if len(idle) < self._keep:
            idle.append(connection)
        else:
            self._pool.release(connection)
        return reply

    def _give_back(self, connection: Any) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(connection)
        else:
            self._pool.release(connection)

    def close(self) -> None:
        """Hand the waiting connections back to the pool."""
        while self._idle:
            try:
                self._pool.release(self._idle.pop())
            except IndexError:  # another thread took the last one
                break


def run_script_blocking(send: Callable[..., Any], call: Call[Any]) -> Any:
    """Send ``call`` with ``send``: EVALSHA, and EVAL when Redis does not know the script."""
    try:
        return send(*call.evalsha())
    except rex.NoScriptError:
        return send(*call.eval())


class BlockingStore:
    """Claims, completions and result reads over a blocking client, safe to share between
    threads (the client's pool hands each thread a connection). Each command is bounded by
    the client's socket timeout (``socket_timeout``)."""

    def __init__(
        self,
        client: BlockingClient,
        config: DedupConfig,
        *,
        where: str,
        clock: Callable[[], float] = time.monotonic,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.where = where
        self.clock = clock
        self.commands = Commands(config, cluster=isinstance(client, redis.RedisCluster))
        self.read_first = ReadFirst()
        """Whether claims read the result key first (replays are common here lately)."""
        self._pooled = PooledSender.for_client(client)
        self._send: Callable[..., Any] = (
            self._pooled if self._pooled is not None else client.execute_command
        )
        self._config = config
        self._on_close = on_close

    def _attempt(self, op: Callable[[], R]) -> R:
        """Run ``op``; retry a transient error; a driver error becomes the library's own."""
        try:  # fast path: no retry machinery unless the first attempt fails
            return op()
        except Exception as exc:
            if not is_transient(exc):
                if isinstance(exc, rex.RedisError):
                    raise store_error(exc, self.where) from exc
                raise
            first = exc
        if self._config.retry_attempts <= 1:
            raise store_error(first, self.where) from first
        try:
            for attempt in Retrying(**retry_policy(self._config)):
                with attempt:
                    return op()
        except Exception as exc:
            if is_driver_error(exc):
                raise store_error(exc, self.where) from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def run(self, call: Call[R]) -> R:
        """Run one script call and parse its reply."""
        send = self._send
        return call.parse(self._attempt(lambda: run_script_blocking(send, call)))

    def read(self, read: Read[R]) -> R:
        """Send one plain command and parse its reply."""
        send = self._send
        return read.parse(self._attempt(lambda: send(*read.command)))

    def _replicated(self, call: Call[R], timeout: float) -> R:
        """`run`, then WAIT for ``min_replicas`` on the same connection (single Redis only)."""
        assert isinstance(self.client, redis.Redis)
        client = self.client
        wait = ("WAIT", self._config.min_replicas, max(1, int(timeout * 1000)))

        def send(*command: Any) -> tuple[Any, Any]:
            with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                pipe.execute_command(*wait)  # type: ignore[no-untyped-call]
                first, second = pipe.execute(raise_on_error=False)
            for reply in (first, second):
                if isinstance(reply, Exception):
                    raise reply
            return first, second

        reply, acked = self._attempt(lambda: run_script_blocking(send, call))
        if int(acked) < self._config.min_replicas:
            log.warning(
                "only %s of %d replicas acknowledged a write within %gs",
                acked,
                self._config.min_replicas,
                timeout,
            )
        return call.parse(reply)

    def claim(self, keys: TokenKeys, owner: str, meta: bytes) -> ClaimReply:
        """claim.lua, after a plain GET while replays are common (see `RedisStore.claim`)."""
        read_first = self.read_first
        if read_first:
            stored = self.read(self.commands.stored(keys))
            if stored is not None:
                read_first.saw(True)
                return stored
        call = self.commands.claim(keys, owner, meta)
        started = self.clock()
        if self._config.min_replicas:
            wait = min(self._config.replica_timeout, self._config.lease_ttl / 4)
            reply = self._replicated(call, wait)
        else:
            reply = self.run(call)
        renew_after = self._config.effective_renew_interval
        if isinstance(reply, Claimed) and claim_again(started, self.clock(), renew_after):
            reply = self.run(call)
        read_first.saw(isinstance(reply, Replay))
        return reply

    def settle(
        self, keys: TokenKeys, owner: str, fence: int, stored: bytes, message: bytes
    ) -> Settled:
        """Run settle.lua (see `RedisStore.settle`)."""
        call = self.commands.settle(keys, owner, fence, stored, message)
        if self._config.min_replicas:
            return self._replicated(call, self._config.replica_timeout)
        return self.run(call)

    def get_result(self, keys: TokenKeys) -> bytes | None:
        """The stored result of a token, or None."""
        send = self._send
        value = self._attempt(lambda: send("GET", keys.result))
        return value if value is None or isinstance(value, bytes) else str(value).encode()

    def close(self) -> None:
        """Close the client's connections."""
        try:
            if self._pooled is not None:
                self._pooled.close()
            self.client.close()
        finally:
            if self._on_close is not None:
                self._on_close()
