"""`Deduplicator`: the asyncio API (execute, run, stream, idempotent) over the `Engine`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar, cast, get_type_hints

import pydantic_core
import redis.asyncio as aredis

from .._config import DedupConfig
from .._errors import SerializationError
from .._keys import SessionKeys, TokenKeys
from .._protocol import Outcome
from .._serialization import JsonSerializer, Serializer
from .._store import Client, client_from_url
from .._store.commands import BudgetReply, ConversationReply
from .._store.connect import describe_url
from .engine import Engine
from .health import read_activity, read_health
from .observe import Activity, Health, PrometheusMetrics
from .streaming import Chunk, Emit, Event, Final, stream_events

__all__ = [
    "UNSET",
    "Deduplicator",
    "Token",
    "call_identity",
    "client_name",
    "normalize_fingerprint",
    "return_type_of",
]

T = TypeVar("T")
Token = str | bytes
UNSET: Any = object()
"""Marks an argument not given (``returns=``: use the call's annotation)."""
_HOST = socket.gethostname()


_HINTS: weakref.WeakKeyDictionary[Callable[..., Any], Any] = weakref.WeakKeyDictionary()


def return_type_of(func: Callable[..., Any]) -> Any:
    """The declared return type of ``func`` (the awaited type for ``async def``), else `Any`.

    Resolved once per function object (a lambda has no annotations and costs nothing).
    """
    target = inspect.unwrap(func)
    annotations = getattr(target, "__annotations__", None)
    if not annotations or "return" not in annotations:
        return Any
    try:
        return _HINTS[target]
    except (KeyError, TypeError):
        pass
    try:
        hint = get_type_hints(target).get("return", Any)
    except Exception:  # partials, callable objects, unresolved forward references
        hint = Any
    origin = getattr(hint, "__origin__", None)
    if origin is not None and getattr(origin, "__name__", "") in {"Awaitable", "Coroutine"}:
        hint = hint.__args__[-1]
    with contextlib.suppress(TypeError):
        _HINTS[target] = hint
    return hint


def normalize_fingerprint(fingerprint: str | bytes | None) -> str | None:
    """A caller's fingerprint as stored: text up to 128 characters, else its SHA-256."""
    if fingerprint is None:
        return None
    if isinstance(fingerprint, bytes):
        return hashlib.sha256(fingerprint).hexdigest()
    if isinstance(fingerprint, str):
        return (
            fingerprint
            if len(fingerprint) <= 128
            else hashlib.sha256(fingerprint.encode()).hexdigest()
        )
    raise TypeError(f"fingerprint must be str or bytes, not {type(fingerprint).__name__}")


def call_identity(
    func: Callable[..., Any],
    key: Callable[..., Token] | None,
    scope: Callable[..., Token | None] | None,
    fingerprint: bool | Callable[..., str | bytes],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Token, Token | None, str | None]:
    """Token, scope and fingerprint of one call of an ``idempotent`` function."""
    name = f"{func.__module__}.{func.__qualname__}"
    digest: str | None = None
    if key is None or fingerprint is True:
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
            bound.apply_defaults()
            encoded = pydantic_core.to_json([name, bound.arguments])
        except (TypeError, pydantic_core.PydanticSerializationError) as exc:
            raise SerializationError(
                f"arguments of {name} cannot be fingerprinted as JSON ({exc}); pass key= and "
                "fingerprint= (a callable or False)"
            ) from exc
        digest = hashlib.sha256(encoded).hexdigest()
    token: Token = key(*args, **kwargs) if key is not None else f"{name}:{digest}"
    if callable(fingerprint):
        fp: str | None = normalize_fingerprint(fingerprint(*args, **kwargs))
    else:
        fp = digest if fingerprint else None
    return token, (scope(*args, **kwargs) if scope is not None else None), fp


@functools.cache
def _warn_in_process_only() -> None:
    """Once per process: a deduplicator built without a client or URL dedups this process only."""
    logging.getLogger("strands_dedup").warning(
        "Deduplicator() without a client or URL keeps its tokens in this process only "
        "(memory://): calls in other processes and replicas are not deduplicated; use "
        "Deduplicator.from_url('redis://...') (or from_url('memory://') to say it is meant)"
    )


class Deduplicator:
    """Runs each call keyed by an idempotency token once across every process sharing a Redis.

    >>> dedup = Deduplicator.from_url("redis://127.0.0.1:6379/0", namespace="billing")
    >>> result = await dedup.run("req-8f3a", lambda: agent.invoke_async(prompt), scope=tenant)

    One instance belongs to one event loop (its connections, renewer and subscriber live there);
    a process may hold several. Close it with ``await dedup.aclose()`` or ``async with``.
    """

    def __init__(
        self,
        client: Client | None = None,
        *,
        config: DedupConfig | None = None,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise TypeError("pass either config= or keyword options, not both")
        self.config = config if config is not None else DedupConfig(**options)
        if client is not None and not isinstance(client, (aredis.Redis, aredis.RedisCluster)):
            raise TypeError(
                "client must be a redis.asyncio.Redis or RedisCluster (for blocking code use "
                "SyncDeduplicator); "
                f"got {type(client).__name__}"
            )
        owns_client = client is None
        if client is None:
            _warn_in_process_only()
            client = client_from_url("memory://", self.config, client_name=client_name())
        self._engine = Engine(
            client,
            self.config,
            where=describe_url("memory://") if owns_client else "redis",
            owns_client=owns_client,
            serializer=serializer if serializer is not None else JsonSerializer(),
            metrics=metrics,
        )

    @classmethod
    def from_url(
        cls,
        url: str = "memory://",
        *,
        serializer: Serializer | None = None,
        metrics: PrometheusMetrics | bool | None = None,
        **options: Any,
    ) -> Deduplicator:
        """Connect to ``redis://``, ``rediss://`` (TLS), ``unix://``, ``redis+sentinel://``,
        ``redis+cluster://`` or the embedded ``memory://``.

        Keyword options are `DedupConfig` fields (``namespace``, ``lease_ttl``, ...).
        ``metrics``: Prometheus collectors to report to (default: prometheus-client's default
        registry when it is installed; False for none).
        """
        self = cls.__new__(cls)
        self.config = DedupConfig(**options)
        client = client_from_url(url, self.config, client_name=client_name())
        self._engine = Engine(
            client,
            self.config,
            where=describe_url(url),
            owns_client=True,
            serializer=serializer if serializer is not None else JsonSerializer(),
            metrics=metrics,
        )
        return self

    # -- public API ---------------------------------------------------------------------------

    async def execute(
        self,
        token: Token,
        call: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> Outcome[T]:
        """Run ``call`` once for ``token`` (within ``scope``) and say how the value was obtained.

        ``call`` takes no arguments and returns a value or an awaitable. ``fingerprint``
        identifies the request: reusing the token for another fingerprint raises
        `FingerprintMismatch`. ``returns`` is the type stored results are read back as (default:
        ``call``'s return annotation).
        """
        if not callable(call):
            raise TypeError(f"call must be callable, not {type(call).__name__}")
        engine = self._engine
        keys = engine.keys.for_token(token, scope)
        rtype = return_type_of(call) if returns is UNSET else returns
        with engine.observer.span(keys) as span:
            first = await engine.begin(
                keys, normalize_fingerprint(fingerprint), rtype, wait_timeout, on_duplicate
            )
            if isinstance(first, Outcome):
                outcome = cast(Outcome[T], first)
            else:
                outcome = await engine.run_primary(first, call, rtype)
            if span is not None:
                span.set_attribute("strands_dedup.role", outcome.role.value)
                span.set_attribute("strands_dedup.fence", outcome.fence)
            return outcome

    async def run(
        self,
        token: Token,
        call: Callable[[], Awaitable[T]] | Callable[[], T],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        returns: Any = UNSET,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
    ) -> T:
        """Like `execute`, returning just the value."""
        outcome = await self.execute(
            token,
            call,
            scope=scope,
            fingerprint=fingerprint,
            returns=returns,
            wait_timeout=wait_timeout,
            on_duplicate=on_duplicate,
        )
        return outcome.value

    async def stream(
        self,
        token: Token,
        make_stream: Callable[[], AsyncIterable[Any]],
        *,
        scope: Token | None = None,
        fingerprint: str | bytes | None = None,
        wait_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Stream ``make_stream()`` once for ``token``; duplicates get the same chunks.

        ``make_stream`` returns an async iterable of JSON-able chunks. The primary's caller gets
        them as produced; a duplicate (in any process) gets them from the start, then live as
        the primary produces them; a retry after completion (within ``result_ttl``) gets the
        stored list of chunks. Duplicates get the chunks as JSON data (dicts, lists, ...).

        A duplicate that was following an attempt whose primary died gets a `StreamReset`, then
        the new attempt's chunks from the start. Leaving the loop early does not stop the
        primary: it completes, and its followers and retries get the whole stream.
        Bounded by ``max_stream_chunks`` and ``max_stream_bytes`` (`ResultTooLarge`).
        """
        if not callable(make_stream):
            raise TypeError(f"make_stream must be callable, not {type(make_stream).__name__}")
        keys = self._engine.keys.for_token(token, scope)

        async def produce(emit: Callable[..., None]) -> list[Any]:
            chunks: list[Any] = []
            async for chunk in make_stream():
                try:
                    data = pydantic_core.to_json(chunk)
                except pydantic_core.PydanticSerializationError as exc:
                    raise SerializationError(
                        f"a chunk of token {keys.token!r} is not JSON-serializable: {exc}",
                        token=keys.token,
                    ) from exc
                emit(data, chunk)
                chunks.append(chunk)
            return chunks

        received = 0
        async for event in stream_events(
            self._engine,
            keys,
            produce,
            rtype=list[Any],
            fingerprint=normalize_fingerprint(fingerprint),
            wait_timeout=wait_timeout,
        ):
            if isinstance(event, Chunk):
                received += 1
                yield event.original if event.original is not None else json.loads(event.data)
            elif isinstance(event, Final):
                for chunk in event.outcome.value[received:]:  # a replay, or chunks we missed
                    yield chunk
            else:
                received = 0
                yield event

    def idempotent(
        self,
        key: Callable[..., Token] | None = None,
        *,
        scope: Callable[..., Token | None] | None = None,
        fingerprint: bool | Callable[..., str | bytes] = True,
        returns: Any = UNSET,
    ) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
        """Decorate an ``async def`` so each call runs once per token.

        ``key`` maps the call's arguments to its token (default: a digest of the function's name
        and arguments); ``scope`` maps them to a tenant or session; by default the arguments are
        fingerprinted, so a token reused with other arguments raises `FingerprintMismatch`.
        """

        def decorate(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
            if not inspect.iscoroutinefunction(inspect.unwrap(func)):
                raise TypeError(
                    f"{func.__qualname__} is not async; use SyncDeduplicator.idempotent for "
                    "blocking functions"
                )
            rtype = return_type_of(func) if returns is UNSET else returns

            @functools.wraps(func)
            async def wrapper(*args: Any, **kwargs: Any) -> T:
                token, sc, fp = call_identity(func, key, scope, fingerprint, args, kwargs)

                def bound() -> Awaitable[T]:
                    return func(*args, **kwargs)

                outcome: Outcome[T] = await self.execute(
                    token, bound, scope=sc, fingerprint=fp, returns=rtype
                )
                return outcome.value

            return wrapper

        return decorate

    async def aclose(self) -> None:
        """Stop the renewer and the subscriber and close the connections (if this owns them)."""
        await self._engine.aclose()

    async def __aenter__(self) -> Deduplicator:
        try:
            await self._engine.ready()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def namespace(self) -> str:
        return self.config.namespace

    @property
    def counters(self) -> dict[str, int]:
        """Events so far: claims, replays, waits, takeovers, lease_lost, ... (see `observe`)."""
        return dict(self._engine.observer.counters)

    def activity(self) -> Activity:
        """What this deduplicator does right now (calls in flight, waiting duplicates, the shared
        subscriber's connection, sessions), read from memory: no round trip."""
        return read_activity(self._engine)

    async def health(self) -> Health:
        """Store reachable (one PING, bounded) and accepting writes (one small SET), subscriber
        connected, local load, renewal lag, Redis' eviction policy."""
        return await read_health(self._engine)

    # -- for the surfaces built on it (HTTP middleware and gateway, agents) ----------------------

    @property
    def where(self) -> str:
        """Where the store is (``memory://``, a host and port, ...): for logs, never for clients."""
        return self._engine.store.where

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop this deduplicator belongs to: None until its first call binds it."""
        return self._engine.loop

    def token_keys(self, token: Token, scope: Token | None = None) -> TokenKeys:
        """The Redis keys of ``token`` within ``scope`` (validated: `InvalidToken`)."""
        return self._engine.keys.for_token(token, scope)

    def session_keys(self, session: str) -> SessionKeys:
        """The Redis keys of a guarded session and its conversation (validated)."""
        return self._engine.keys.for_session(session)

    async def in_use(self, keys: TokenKeys) -> bool:
        """Whether the token has a stored result or a live lease (one round trip)."""
        found = await self._engine.store.values_with_ttl([keys.result, keys.lease])
        return any(value is not None for value, _ in found)

    def stream_events(
        self,
        keys: TokenKeys,
        produce: Callable[[Emit], Awaitable[Any]],
        *,
        rtype: Any,
        fingerprint: str | None,
        wait_timeout: float | None = None,
        on_duplicate: Literal["wait", "raise"] | None = None,
        best_effort: bool = False,
    ) -> AsyncIterator[Event]:
        """The events of a streamed call (`stream`'s machinery, for surfaces that relay bytes).

        ``produce(emit)`` runs once for the token across every process; ``emit(data, original)``
        hands a chunk (JSON bytes, and what the primary's own caller gets) to the followers. The
        primary's caller gets `Chunk` events with their originals, a follower gets them from
        Redis, a follower whose primary died gets `StreamReset`; everyone ends with `Final`.
        ``best_effort=True``: a stream the followers cannot get (too large, appends failing)
        stops reaching them instead of failing the call; they get the stored value.
        """
        return stream_events(
            self._engine,
            keys,
            produce,
            rtype=rtype,
            fingerprint=fingerprint,
            wait_timeout=wait_timeout,
            on_duplicate=on_duplicate,
            best_effort=best_effort,
        )

    def count_refusal(self, reason: str) -> None:
        """Count a request an HTTP surface refused or a client it cut off (``reason``: a short,
        bounded name such as ``body-timeout``; the ``http_refusals`` metric)."""
        self._engine.observer.refused(reason)

    async def observe_request(
        self,
        app: Callable[[Any, Any, Any], Awaitable[None]],
        scope: Any,
        receive: Any,
        send: Any,
    ) -> None:
        """Serve one ASGI HTTP request through ``app``, observing its duration by role and
        status class (the ``request_seconds`` metric)."""
        await self._engine.observer.timed(app, scope, receive, send)

    async def reserve_budget(
        self, identity: str, operation: str, args: Sequence[int]
    ) -> BudgetReply:
        """One round trip of budget.lua on ``identity``'s fleet-wide counters (``operation``:
        a random id that lets a retried copy be recognised); see the script's header."""
        keys = self._engine.keys.for_budget(identity, operation)
        return await self._engine.store.budget(keys, args)

    async def load_conversation(self, keys: SessionKeys) -> dict[bytes, bytes]:
        """Every field of a session's conversation hash (one HGETALL)."""
        return await self._engine.store.conversation_load(keys)

    async def write_conversation(
        self,
        keys: SessionKeys,
        items: Sequence[tuple[str, bytes]],
        *,
        ticket: str,
        fence: int,
        turn: int,
        idle_ttl_ms: int,
        max_messages: int,
        max_bytes: int,
    ) -> ConversationReply:
        """Write ``items`` into a session's conversation (conversation.lua): a turn's commit,
        fenced, when ``ticket`` is a holder's; else a write outside any turn."""
        store = self._engine.store
        call = store.commands.conversation(
            keys,
            items,
            ticket=ticket,
            fence=fence,
            turn=turn,
            idle_ttl_ms=idle_ttl_ms,
            max_messages=max_messages,
            max_bytes=max_bytes,
        )
        return await store.run(call, priority=True)


def client_name() -> str:
    return f"strands-dedup:{_HOST}:{os.getpid()}"


def engine_of(dedup: Deduplicator) -> Engine:
    """The engine a deduplicator runs its calls through (for the package's own modules)."""
    return dedup._engine
