"""The idempotency layers the benchmark compares, each used as its documentation says.

Every peer runs a call ``fn`` once per token and hands duplicates the result, as well as it can:

- ``redis (floor)``: raw redis-py round trips (``SET NX PX`` for a fresh call, ``GET`` for a
  replay); no deduplication at all: the cost floor.
- ``strands-dedup``: `Deduplicator.execute` (async) and `SyncDeduplicator.execute` (sync).
- ``idemkit``: ``RedisBackend`` with its ``idempotent`` / ``idempotent_sync`` decorators (keyed
  by the call's argument). Duplicates wait for the first call (pub/sub).
- ``powertools``: aws-lambda-powertools' ``idempotent_function`` with its
  ``RedisCachePersistenceLayer`` (sync only). A duplicate of a call in progress gets
  ``IdempotencyAlreadyInProgressError``: a failure for its client.
- ``redis-lock``: python-redis-lock plus a result key, the "lock and poll" pattern: read the
  result; else take the lock (blocking), read again, run, store the result (sync only; a
  blocked waiter holds a thread and a connection).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio as aredis

Fn = Callable[[], Awaitable[dict[str, Any]]]
SyncFn = Callable[[], dict[str, Any]]

LEASE_TTL = 2.0  # seconds, for every peer with a lease, so crash recovery compares fairly
WAIT_TIMEOUT = 120.0


class Peer:
    """One layer under test. ``call`` (async) and ``call_sync`` run ``fn`` once per token."""

    name = "peer"
    has_async = True
    has_sync = True
    waits = True
    """Duplicates of a call in progress wait for its result (else they fail)."""
    note = ""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def call(self, token: str, fn: Fn) -> dict[str, Any]:
        raise NotImplementedError

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        raise NotImplementedError


class Floor(Peer):
    """Raw redis-py: the cost of one round trip (no deduplication)."""

    name = "redis (floor)"
    waits = False
    note = "no deduplication: one SET NX PX (fresh) or GET (replay) round trip"

    async def open(self) -> None:
        self.client = aredis.Redis.from_url(self.url)
        self.sync_client = redis.Redis.from_url(self.url)

    async def close(self) -> None:
        await self.client.aclose()
        self.sync_client.close()

    async def call(self, token: str, fn: Fn) -> dict[str, Any]:
        """A fresh call's floor: one ``SET NX PX`` (then the call, when it was set)."""
        if await self.client.set(f"{self.namespace}:floor:{token}", b"1", nx=True, px=30000):
            return await fn()
        return {}

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        if self.sync_client.set(f"{self.namespace}:floor:{token}", b"1", nx=True, px=30000):
            return fn()
        return {}

    async def read(self, token: str) -> None:
        """A replay's floor: one ``GET``."""
        await self.client.get(f"{self.namespace}:floor:{token}")

    def read_sync(self, token: str) -> None:
        self.sync_client.get(f"{self.namespace}:floor:{token}")


class StrandsDedup(Peer):
    name = "strands-dedup"

    async def open(self) -> None:
        from strands_dedup import Deduplicator, SyncDeduplicator

        options = {"namespace": self.namespace, "lease_ttl": LEASE_TTL, "metrics": False}
        self.dedup = Deduplicator.from_url(
            self.url, wait_timeout=WAIT_TIMEOUT, max_connections=64, **options
        )
        self.sync = SyncDeduplicator.from_url(self.url, wait_timeout=WAIT_TIMEOUT, **options)

    async def close(self) -> None:
        await self.dedup.aclose()
        await asyncio.to_thread(self.sync.close)

    async def call(self, token: str, fn: Fn) -> dict[str, Any]:
        outcome = await self.dedup.execute(token, fn, returns=dict)
        return outcome.value  # type: ignore[no-any-return]

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        return self.sync.execute(token, fn, returns=dict).value  # type: ignore[no-any-return]


class Idemkit(Peer):
    name = "idemkit"

    async def open(self) -> None:
        from idemkit import MethodConfig, RedisBackend
        from idemkit.adapters.ai import idempotent, idempotent_sync

        self._fns: dict[str, Any] = {}
        self.backend = RedisBackend(aredis.Redis.from_url(self.url), namespace=self.namespace)
        self.sync_backend = RedisBackend.from_url(self.url, namespace=self.namespace + ":sync")
        config = MethodConfig(lease_ttl_seconds=LEASE_TTL, wait_timeout_seconds=WAIT_TIMEOUT)
        fns = self._fns

        @idempotent(backend=self.backend, config=config)
        async def work(token: str) -> dict[str, Any]:
            return await fns[token]()  # type: ignore[no-any-return]

        @idempotent_sync(backend=self.sync_backend, config=config)
        def work_sync(token: str) -> dict[str, Any]:
            return fns[token]()  # type: ignore[no-any-return]

        self._work, self._work_sync = work, work_sync

    async def close(self) -> None:
        for backend in (self.backend,):
            close = getattr(backend, "aclose", None) or getattr(backend, "close", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    async def call(self, token: str, fn: Fn) -> dict[str, Any]:
        self._fns[token] = fn
        return await self._work(token)  # type: ignore[no-any-return]

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        self._fns[token] = fn
        return self._work_sync(token)  # type: ignore[no-any-return]


class Powertools(Peer):
    name = "powertools"
    has_async = False
    waits = False
    note = "sync only; a duplicate of a call in progress gets IdempotencyAlreadyInProgressError"

    async def open(self) -> None:
        from aws_lambda_powertools.utilities.idempotency import (
            IdempotencyConfig,
            idempotent_function,
        )
        from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
            RedisCachePersistenceLayer,
        )

        self._fns: dict[str, Any] = {}
        self._client = redis.Redis.from_url(self.url)
        store = RedisCachePersistenceLayer(client=self._client)
        config = IdempotencyConfig(event_key_jmespath="token", expires_after_seconds=3600)
        fns = self._fns

        @idempotent_function(
            data_keyword_argument="request",
            persistence_store=store,
            config=config,
            key_prefix=self.namespace,
        )
        def work(request: dict[str, Any]) -> dict[str, Any]:
            return fns[request["token"]]()  # type: ignore[no-any-return]

        self._work = work

    async def close(self) -> None:
        self._client.close()

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        self._fns[token] = fn
        return self._work(request={"token": token})  # type: ignore[no-any-return]


class RedisLock(Peer):
    name = "redis-lock"
    has_async = False
    note = "sync only; lock, re-read, run, store; a waiter blocks a thread and a connection"

    async def open(self) -> None:
        # One client per thread: python-redis-lock's blocking acquire holds its connection.
        self._local = threading.local()

    def _client(self) -> redis.Redis:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = redis.Redis.from_url(self.url)
        return client

    def call_sync(self, token: str, fn: SyncFn) -> dict[str, Any]:
        import redis_lock

        client = self._client()
        key = f"{self.namespace}:rl:{token}"
        stored = client.get(key)
        if stored is not None:
            return json.loads(stored)  # type: ignore[no-any-return]
        lock = redis_lock.Lock(
            client, f"{self.namespace}:{token}", expire=int(LEASE_TTL), auto_renewal=True
        )
        with lock:
            stored = client.get(key)
            if stored is not None:
                return json.loads(stored)  # type: ignore[no-any-return]
            value = fn()
            client.set(key, json.dumps(value), ex=3600)
            return value


PEERS: dict[str, type[Peer]] = {
    p.name: p for p in (Floor, StrandsDedup, Idemkit, Powertools, RedisLock)
}
