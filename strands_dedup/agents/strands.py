"""Strands Agents integration: `DedupAgent`, which makes an agent call safe to retry anywhere.

Needs the ``strands`` extra (``pip install 'strands-dedup[strands]'``); importing the core never
imports this module.

::

    dedup = Deduplicator.from_url("redis://redis:6379/0")
    guarded = DedupAgent(
        dedup,
        agent_factory=lambda session_id: Agent(model=..., session_manager=...),
        session_guard=SessionGuard(dedup, mode="queue"),
    )
    result = await guarded.invoke_async(prompt, session_id="s-42", idempotency_token="req-8f3a")

For each call, inside the session's hold: the factory builds the Agent (session managers load
the history then), the agent runs, and its session manager syncs the history, before the hold
is released. With a token, the model runs once across every replica; duplicates get an
`AgentResult` rebuilt from the primary's (see `StoredAgentResult` for what does and does not
round-trip). A lost lease (token or session) sets the running agent's ``cancel_signal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ConfigDict

try:
    from strands import Agent
    from strands.agent.agent_result import AgentResult
    from strands.interrupt import Interrupt
    from strands.telemetry.metrics import EventLoopMetrics
    from strands.types.session import decode_bytes_values, encode_bytes_values
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "strands_dedup.strands needs the Strands Agents SDK: pip install 'strands-dedup[strands]'"
    ) from exc

from .._engine.call import current_call
from .._engine.deduplicator import Deduplicator
from .._engine.session import SessionGuard
from .._engine.streaming import Chunk, Emit, StreamReset
from .._engine.sync import Bridge, SyncDeduplicator
from .._protocol import Outcome
from ._conversation import (
    NotLoaded,
    RedisSessionManager,
    RedisSessionRepository,
    Turn,
    building_for,
    committed_session,
)
from ._tokens import message_token
from ._tools import idempotent_tool

__all__ = [
    "STREAMED_KEYS",
    "DedupAgent",
    "RedisSessionManager",
    "RedisSessionRepository",
    "ReplayedMetrics",
    "StoredAgentResult",
    "committed_session",
    "idempotent_tool",
    "message_token",
]

T = TypeVar("T")
AgentFactory = Callable[[str], "Agent | Awaitable[Agent]"]
_MANAGED = ("idempotency_token", "cancel_signal")


@dataclass
class ReplayedMetrics(EventLoopMetrics):
    """The metrics a duplicate gets: the primary's totals and its `get_summary()`, verbatim.

    Per-cycle traces, tool metric objects and OpenTelemetry data stay with the primary; their
    rendering in the summary is kept.
    """

    summary: dict[str, Any] = field(default_factory=dict)

    def get_summary(self) -> dict[str, Any]:
        return self.summary


def _plain(value: Any) -> Any:
    """A JSON-able copy (bytes as base64, anything else unknown as its ``str``)."""
    return json.loads(pydantic_core.to_json(value, bytes_mode="base64", fallback=str))


class StoredAgentResult(BaseModel):
    """The stored form of an `AgentResult` (JSON; what duplicates are rebuilt from).

    Round-trips: ``stop_reason``, ``message`` (binary blocks included), ``state`` (values that
    are not JSON become their ``str``), ``interrupts``, ``structured_output`` (validated back
    into the ``structured_output_model`` the duplicate passed), ``checkpoint``, and the metrics'
    ``get_summary()`` with its totals (`ReplayedMetrics`). Does not: trace and span objects,
    per-tool metric objects, and anything that lives only in the primary's Agent object.
    """

    model_config = ConfigDict(frozen=True)

    stop_reason: str
    message: dict[str, Any]
    state: Any = None
    interrupts: list[dict[str, Any]] | None = None
    structured_output: dict[str, Any] | None = None
    metrics: dict[str, Any] = {}
    checkpoint: dict[str, Any] | None = None
    events: list[dict[str, Any]] | None = None
    """The streamed events (`DedupAgent.stream_async`), replayed to later duplicates."""

    @classmethod
    def from_result(
        cls, result: AgentResult, events: list[dict[str, Any]] | None = None
    ) -> StoredAgentResult:
        return cls(
            events=events,
            stop_reason=str(result.stop_reason),
            message=encode_bytes_values(result.message),
            state=_plain(result.state),
            interrupts=(
                None
                if result.interrupts is None
                else [_plain(x.to_dict()) for x in result.interrupts]
            ),
            structured_output=(
                None
                if result.structured_output is None
                else result.structured_output.model_dump(mode="json")
            ),
            metrics=_plain(result.metrics.get_summary()),
            checkpoint=None if result.checkpoint is None else _plain(result.checkpoint.to_dict()),
        )

    def to_agent_result(
        self, structured_output_model: type[BaseModel] | None = None
    ) -> AgentResult:
        structured = None
        if self.structured_output is not None and structured_output_model is not None:
            structured = structured_output_model.model_validate(self.structured_output)
        checkpoint = None
        if self.checkpoint is not None:
            from strands.experimental.checkpoint import Checkpoint

            checkpoint = Checkpoint.from_dict(self.checkpoint)
        summary = self.metrics
        metrics = ReplayedMetrics(
            cycle_count=int(summary.get("total_cycles", 0)),
            accumulated_usage=summary.get("accumulated_usage") or {},  # type: ignore[arg-type]
            accumulated_metrics=summary.get("accumulated_metrics") or {},  # type: ignore[arg-type]
            summary=summary,
        )
        return AgentResult(
            stop_reason=self.stop_reason,  # type: ignore[arg-type]
            message=decode_bytes_values(self.message),
            metrics=metrics,
            state=self.state,
            interrupts=(
                None if self.interrupts is None else [Interrupt(**x) for x in self.interrupts]
            ),
            structured_output=structured,
            checkpoint=checkpoint,
        )


STREAMED_KEYS = frozenset(
    {
        "data",
        "delta",
        "current_tool_use",
        "message",
        "event",
        "reasoningText",
        "reasoning",
        "type",
        "init_event_loop",
        "start",
        "start_event_loop",
        "force_stop",
        "force_stop_reason",
        "tool_stream_event",
    }
)
"""Keys of Strands stream events that duplicates receive (the rest are live objects: the agent,
spans, traces, the model, request state)."""


def _project(event: Any) -> dict[str, Any] | None:
    if not isinstance(event, dict) or "result" in event:
        return None
    kept = {k: v for k, v in event.items() if k in STREAMED_KEYS}
    return _plain(kept) if kept else None


class _AnySignal(threading.Event):
    """Set when it is set, or when the caller's own ``cancel_signal`` is."""

    def __init__(self, caller: threading.Event | None) -> None:
        super().__init__()
        self._caller = caller

    def is_set(self) -> bool:
        return super().is_set() or (self._caller is not None and self._caller.is_set())


class DedupAgent:
    """A Strands agent made safe to call from every replica (see the module docstring).

    ``dedup``: a `Deduplicator` (use the ``async`` methods, or call it blocking from a thread
    other than its loop's) or a `SyncDeduplicator` (both work from anywhere).
    ``agent_factory(session_id)`` builds the Agent for one call (it may be async).
    ``session_guard``: a `SessionGuard` over the same deduplicator; without one, calls of one
    session are not kept apart (only duplicates of one token are).
    """

    def __init__(
        self,
        dedup: Deduplicator | SyncDeduplicator,
        agent_factory: AgentFactory,
        *,
        session_guard: SessionGuard | None = None,
    ) -> None:
        self._bridge = Bridge(dedup, "DedupAgent")
        self._core = self._bridge.core
        if not callable(agent_factory):
            raise TypeError("agent_factory must be callable: session_id -> Agent")
        if (
            session_guard is not None
            and Bridge(session_guard.dedup, "SessionGuard").core is not self._core
        ):
            raise ValueError("session_guard must be built over the same deduplicator")
        self.dedup = dedup
        self.agent_factory = agent_factory
        self.session_guard = session_guard
        self._loads = True

    # -- public API -----------------------------------------------------------------------------

    async def invoke_async(
        self,
        prompt: Any = None,
        *,
        session_id: str,
        idempotency_token: str | None = None,
        seq: int | None = None,
        **options: Any,
    ) -> AgentResult:
        """Run the agent for ``session_id`` once per ``idempotency_token``.

        ``seq``: the message's per-session sequence number (ordered admission; needs a
        queue-mode ``session_guard``). ``options`` go to ``Agent.invoke_async``
        (``structured_output_model``, ``invocation_state``, ``limits``, ``cancel_signal``, ...).
        """
        self._check(session_id, seq, options)
        return await self._on_core(
            self._invoke(prompt, session_id, idempotency_token, seq, options)
        )

    def __call__(
        self,
        prompt: Any = None,
        *,
        session_id: str,
        idempotency_token: str | None = None,
        seq: int | None = None,
        **options: Any,
    ) -> AgentResult:
        """Blocking `invoke_async`."""
        self._check(session_id, seq, options)
        return self._blocking(self._invoke(prompt, session_id, idempotency_token, seq, options))

    async def stream_async(
        self,
        prompt: Any = None,
        *,
        session_id: str,
        idempotency_token: str | None = None,
        seq: int | None = None,
        **options: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream the agent's events, once per ``idempotency_token`` across every replica.

        The primary's caller gets Strands' own events, live. A duplicate (any process, joining
        at any time, or a retry within ``result_ttl``) gets the same events from the start,
        then live: their serializable part (text deltas, tool use, messages with tool results,
        raw model events; see `STREAMED_KEYS`), and a final ``{"result": AgentResult}``. A
        duplicate whose primary died mid-stream gets ``{"stream_reset": fence}``, then the new
        attempt's events from the start.
        """
        self._check(session_id, seq, options)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def deliver(event: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        run = asyncio.ensure_future(
            self._on_core(self._pump(prompt, session_id, idempotency_token, seq, options, deliver))
        )
        run.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, end))
        try:
            while (event := await events.get()) is not end:
                yield event
            run.result()
        finally:
            if not run.done():
                run.cancel()
                with contextlib.suppress(BaseException):
                    await run

    async def _pump(
        self,
        prompt: Any,
        session_id: str,
        token: str | None,
        seq: int | None,
        options: dict[str, Any],
        deliver: Callable[[Any], None],
    ) -> None:
        """Run (or follow) the streamed call on the deduplicator's loop; hand events over."""
        if token is None:
            await self._run_agent(prompt, session_id, seq, options, deliver)
            return
        keys = self._core.token_keys(token, session_id)
        ran: list[AgentResult] = []

        async def produce(emit: Emit) -> StoredAgentResult:
            streamed: list[dict[str, Any]] = []

            def forward(event: Any) -> None:
                projected = _project(event)
                if projected is not None:
                    emit(pydantic_core.to_json(projected), event)
                    streamed.append(projected)

            result = await self._run_agent(prompt, session_id, seq, options, forward)
            ran.append(result)
            return StoredAgentResult.from_result(result, events=streamed)

        received = 0
        model = options.get("structured_output_model")
        async for item in self._core.stream_events(
            keys,
            produce,
            rtype=StoredAgentResult,
            fingerprint=self.fingerprint(prompt, session_id, options),
            wait_timeout=None,
        ):
            if isinstance(item, Chunk):
                received += 1
                deliver(item.original if item.original is not None else json.loads(item.data))
            elif isinstance(item, StreamReset):
                received = 0
                deliver({"stream_reset": item.fence})
            else:
                stored: StoredAgentResult = item.outcome.value
                for event in (stored.events or [])[received:]:  # a replay, or what we missed
                    deliver(event)
                deliver({"result": ran[0] if ran else stored.to_agent_result(model)})

    # -- internals ------------------------------------------------------------------------------

    def _check(self, session_id: str, seq: int | None, options: dict[str, Any]) -> None:
        if not isinstance(session_id, str) or not session_id:
            raise ValueError(f"session_id must be a non-empty str, not {session_id!r}")
        if seq is not None and self.session_guard is None:
            raise ValueError("seq= orders a session's queue: give the DedupAgent a session_guard")
        if "idempotency_token" in options:  # pragma: no cover - a named parameter
            raise TypeError("pass idempotency_token as a keyword of this method")

    async def _on_core(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._bridge.run(coro)

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._bridge.block(
            coro,
            "this DedupAgent wraps an asyncio Deduplicator: await invoke_async(), or call it "
            "blocking from another thread while the deduplicator's loop runs, or build it "
            "over a SyncDeduplicator",
        )

    def fingerprint(self, prompt: Any, session_id: str, options: dict[str, Any]) -> str:
        """What identifies a request: the prompt, the session and the structured output type."""
        model = options.get("structured_output_model")
        name = None if model is None else f"{model.__module__}.{model.__qualname__}"
        encoded = pydantic_core.to_json(
            [prompt, session_id, name], bytes_mode="base64", fallback=str
        )
        return hashlib.sha256(encoded).hexdigest()

    async def _invoke(
        self,
        prompt: Any,
        session_id: str,
        token: str | None,
        seq: int | None,
        options: dict[str, Any],
    ) -> AgentResult:
        if token is None:
            return await self._run_agent(prompt, session_id, seq, options, None)
        ran: list[AgentResult] = []

        async def call() -> StoredAgentResult:
            result = await self._run_agent(prompt, session_id, seq, options, None)
            ran.append(result)
            return StoredAgentResult.from_result(result)

        outcome: Outcome[StoredAgentResult] = await self._core.execute(
            token,
            call,
            scope=session_id,
            fingerprint=self.fingerprint(prompt, session_id, options),
            returns=StoredAgentResult,
        )
        if ran:
            return ran[0]
        return outcome.value.to_agent_result(options.get("structured_output_model"))

    async def _run_agent(
        self,
        prompt: Any,
        session_id: str,
        seq: int | None,
        options: dict[str, Any],
        emit: Callable[[Any], None] | None,
    ) -> AgentResult:
        options = dict(options)
        cancel = _AnySignal(options.pop("cancel_signal", None))
        call = current_call()
        if call is not None:
            call.lost.add_callback(cancel.set)
        hold_cm: Any = (
            self.session_guard.hold(session_id, seq=seq)
            if self.session_guard is not None
            else contextlib.nullcontext()
        )
        async with hold_cm as hold:
            turn: Turn | None = None
            if hold is not None:
                hold.lost.add_callback(cancel.set)
                assert self.session_guard is not None
                turn = Turn(
                    self._core,
                    self._core.session_keys(session_id),
                    hold,
                    session_id,
                    self.session_guard.config.idle_ttl,
                )
                if self._loads:  # else: the factory built no session manager last time
                    await turn.load()
            agent = await self._build(session_id, turn)
            result: AgentResult | None = None
            if emit is None:
                result = await agent.invoke_async(prompt, cancel_signal=cancel, **options)
            else:
                async for event in agent.stream_async(prompt, cancel_signal=cancel, **options):
                    emit(event)
                    if isinstance(event, dict) and isinstance(event.get("result"), AgentResult):
                        result = event["result"]
                if result is None:
                    raise RuntimeError("the agent's stream ended without a result event")
            if turn is not None:
                await turn.commit()
            return result

    async def _call_factory(self, session_id: str) -> Agent:
        """The factory's Agent. A plain (not ``async def``) factory runs in a worker thread:
        session managers read their store while the Agent is built (files, S3), and doing that
        on the event loop would stall the renewals of this call's and this session's leases."""
        factory: Callable[[str], Any] = self.agent_factory
        if inspect.iscoroutinefunction(factory):
            made = factory(session_id)
        else:
            made = await asyncio.to_thread(factory, session_id)
        agent: Agent = await made if inspect.isawaitable(made) else made
        return agent

    async def _build(self, session_id: str, turn: Turn | None) -> Agent:
        """Call the agent factory (inside the turn, for the session manager it builds), and
        refuse an agent whose session manager would write outside the turn's commit."""
        with building_for(turn):
            try:
                agent = await self._call_factory(session_id)
            except NotLoaded:
                assert turn is not None
                await turn.load()
                agent = await self._call_factory(session_id)
        manager = getattr(agent, "_session_manager", None)  # Strands keeps it there
        self._loads = manager is not None
        if manager is None:
            return agent
        if turn is None:
            raise ValueError(
                f"the agent for session {session_id!r} has a session manager "
                f"({type(manager).__name__}): its turns commit once only under a hold; give "
                "the DedupAgent a session_guard"
            )
        if turn.manager is not manager:
            raise ValueError(
                f"the agent for session {session_id!r} has a session manager "
                f"({type(manager).__name__}) whose writes would not wait for the turn to "
                "commit (a crashed or stale attempt would corrupt the history): build it with "
                "session_manager=committed_session(...) around a RepositorySessionManager, or "
                "use RedisSessionManager"
            )
        return agent
