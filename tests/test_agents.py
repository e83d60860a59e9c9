"""Strands integration: DedupAgent, idempotent tools, and the session guard across processes.

The model is tests/fake_model.py (offline, canned events with a delay). Multi-process tests run
tests/agent_worker.py children on a real Redis and synchronize on their reports and a barrier.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest
import redis
from children import Child
from fake_model import FakeModel
from strands import Agent, tool
from strands.agent.agent_result import AgentResult
from strands.interrupt import Interrupt
from strands.telemetry.metrics import EventLoopMetrics

from strands_dedup import (
    BusyReason,
    Deduplicator,
    FingerprintMismatch,
    LeaseLost,
    SessionBusy,
    SessionGuard,
    SyncDeduplicator,
    current_call,
    current_session,
)
from strands_dedup.agents import idempotent_tool, message_token
from strands_dedup.agents.strands import DedupAgent, StoredAgentResult

pytestmark = pytest.mark.timeout(60)
WORKER = str(Path(__file__).with_name("agent_worker.py"))


@pytest.fixture
def agents(children: Callable[..., Awaitable[Child]]) -> Callable[..., Awaitable[Child]]:
    """Start tests/agent_worker.py children."""

    async def spawn(*args: str) -> Child:
        return await children(*args, worker=WORKER)

    return spawn


def agent_of(model: FakeModel, **kwargs: Any) -> Callable[[str], Agent]:
    return lambda session_id: Agent(model=model, callback_handler=None, **kwargs)


# -- in one process, on every backend -------------------------------------------------------


async def test_duplicates_get_the_primarys_result_and_the_model_runs_once(
    backend_url: str, namespace: str
) -> None:
    model = FakeModel("the answer is 42", delay=0.2)
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(dedup, agent_of(model), session_guard=SessionGuard(dedup))
        first, second = await asyncio.gather(
            guarded.invoke_async("q", session_id="s-1", idempotency_token="req-1"),
            guarded.invoke_async("q", session_id="s-1", idempotency_token="req-1"),
        )
        later = await guarded.invoke_async("q", session_id="s-1", idempotency_token="req-1")
        assert model.calls == 1
        for dup in (second, later):
            assert dup.message == first.message
            assert dup.stop_reason == first.stop_reason == "end_turn"
            assert dup.state == first.state
            assert str(dup) == str(first)
            assert dup.metrics.get_summary()["accumulated_usage"] == {
                "inputTokens": 3,
                "outputTokens": 4,
                "totalTokens": 7,
            }
        with pytest.raises(FingerprintMismatch):
            await guarded.invoke_async("other", session_id="s-1", idempotency_token="req-1")
        # the same token in another session is another call
        await guarded.invoke_async("q", session_id="s-2", idempotency_token="req-1")
        assert model.calls == 2


async def test_without_a_token_the_guard_still_keeps_calls_of_a_session_apart(
    backend_url: str, namespace: str
) -> None:
    model = FakeModel(delay=0.05)
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(dedup, agent_of(model), session_guard=SessionGuard(dedup))
        await asyncio.gather(*(guarded.invoke_async("q", session_id="s") for _ in range(5)))
        assert model.calls == 5 and model.most_inside == 1


async def test_another_token_on_a_busy_session_in_throw_mode(
    backend_url: str, namespace: str
) -> None:
    model = FakeModel(delay=0.5)
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(
            dedup, agent_of(model), session_guard=SessionGuard(dedup, mode="throw")
        )
        first = asyncio.create_task(
            guarded.invoke_async("q", session_id="s", idempotency_token="a")
        )
        while model.calls == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(SessionBusy) as caught:
            await guarded.invoke_async("q", session_id="s", idempotency_token="b")
        assert caught.value.reason is BusyReason.TAKEN
        await first
        # the refused call released its token: a retry runs
        await guarded.invoke_async("q", session_id="s", idempotency_token="b")
        assert model.calls == 2


async def test_a_lost_lease_sets_the_agents_cancel_signal(redis_url: str, namespace: str) -> None:
    model = FakeModel(" ".join(["word"] * 200), chunk_delay=0.02)
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=0.4) as dedup:
        guarded = DedupAgent(dedup, agent_of(model))
        side = redis.Redis.from_url(redis_url)
        keys = dedup.token_keys("req-lost", "s")
        task = asyncio.create_task(
            guarded.invoke_async("q", session_id="s", idempotency_token="req-lost")
        )
        while model.chunks < 5:
            await asyncio.sleep(0.01)
        side.incr(keys.fence)  # another caller took the token over: ours is now stale
        side.delete(keys.lease)
        started = time.monotonic()
        with pytest.raises(LeaseLost):
            await task
        assert time.monotonic() - started < 3.5  # all 200 chunks take 4 s
        assert model.chunks < 150  # stopped early, not after all 200 chunks
        side.close()


async def test_stream_async_duplicates_replay_the_primarys_events(
    backend_url: str, namespace: str
) -> None:
    model = FakeModel("one two three", chunk_delay=0.05)
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(dedup, agent_of(model), session_guard=SessionGuard(dedup))

        async def collect() -> list[dict[str, Any]]:
            return [
                e async for e in guarded.stream_async("q", session_id="s", idempotency_token="st")
            ]

        primary = asyncio.create_task(collect())
        while model.chunks < 1:  # the duplicate joins mid-stream
            await asyncio.sleep(0.005)
        duplicate = await collect()
        first = await primary
        later = await collect()  # a retry after completion
        assert model.calls == 1
        for events in (first, duplicate, later):
            assert [e["data"] for e in events if "data" in e] == ["one ", "two ", "three "]
            assert isinstance(events[-1]["result"], AgentResult)
            assert events[-1]["result"].message == first[-1]["result"].message
        assert "agent" in next(e for e in first if "data" in e)  # the primary's own events
        assert [e for e in duplicate if "message" in e] == [e for e in later if "message" in e]


def test_blocking_calls_over_a_sync_deduplicator(backend_url: str, namespace: str) -> None:
    model = FakeModel(delay=0.1)
    with SyncDeduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(dedup, agent_of(model), session_guard=SessionGuard(dedup))
        results: list[AgentResult] = []

        def call() -> None:
            results.append(guarded("q", session_id="s", idempotency_token="blocking"))

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(results) == 4 and model.calls == 1
        assert all(r.message == results[0].message for r in results)

        async def from_a_loop() -> AgentResult:
            return await guarded.invoke_async("q", session_id="s", idempotency_token="blocking")

        assert asyncio.run(from_a_loop()).message == results[0].message


async def test_bad_input_is_refused(namespace: str) -> None:
    async with (
        Deduplicator.from_url("memory://", namespace=namespace) as dedup,
        Deduplicator.from_url("memory://", namespace=namespace) as other,
    ):
        model = FakeModel()
        with pytest.raises(ValueError, match="same deduplicator"):
            DedupAgent(dedup, agent_of(model), session_guard=SessionGuard(other))
        with pytest.raises(TypeError, match="callable"):
            DedupAgent(dedup, "agent")  # type: ignore[arg-type]
        guarded = DedupAgent(dedup, agent_of(model))
        with pytest.raises(ValueError, match="session_id"):
            await guarded.invoke_async("q", session_id="")
        with pytest.raises(ValueError, match="session_guard"):
            await guarded.invoke_async("q", session_id="s", seq=1)
        with pytest.raises(RuntimeError, match="await invoke_async"):
            guarded("q", session_id="s")
        assert model.calls == 0


def test_stored_agent_result_round_trips_what_it_documents() -> None:
    class Verdict(pydantic.BaseModel):
        label: str
        score: float

    metrics = EventLoopMetrics(cycle_count=2)
    original = AgentResult(
        stop_reason="interrupt",
        message={
            "role": "assistant",
            "content": [
                {"text": "hi"},
                {"image": {"source": {"bytes": b"\x00\xff"}, "format": "png"}},
            ],
        },  # type: ignore[typeddict-item]
        metrics=metrics,
        state={"n": 1, "when": object()},
        interrupts=[Interrupt(id="i1", name="approve", reason={"why": "refund"})],
        structured_output=Verdict(label="ok", score=0.5),
    )
    stored = StoredAgentResult.model_validate_json(
        StoredAgentResult.from_result(original).model_dump_json()
    )
    back = stored.to_agent_result(Verdict)
    assert back.message == original.message
    assert back.stop_reason == "interrupt"
    assert back.structured_output == Verdict(label="ok", score=0.5)
    assert back.interrupts == original.interrupts
    assert back.state["n"] == 1 and isinstance(back.state["when"], str)
    assert back.metrics.get_summary()["total_cycles"] == 2
    assert back.metrics.cycle_count == 2


def test_message_token() -> None:
    assert message_token("telegram", 42, 7) == "msg:telegram:42:7"
    assert message_token("slack", "a:b") != message_token("slack", "a", "b")
    with pytest.raises(ValueError, match="empty"):
        message_token("telegram", "")
    with pytest.raises(ValueError, match="at least one"):
        message_token("telegram")
    with pytest.raises(TypeError):
        message_token("telegram", 1.5)  # type: ignore[arg-type]


def test_importing_the_core_does_not_import_strands() -> None:
    code = (
        "import sys, strands_dedup, strands_dedup.http, strands_dedup.agents; "
        "assert 'strands' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# -- tool-call idempotency -------------------------------------------------------------------


async def test_an_idempotent_tool_runs_once_across_a_retried_turn(
    backend_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        refunds: list[tuple[str, int, int]] = []

        @tool
        @idempotent_tool(dedup)
        def refund(order_id: str, amount_cents: int) -> str:
            """Refund an order.

            Args:
                order_id: The order.
                amount_cents: How much.
            """
            call = current_call()
            assert call is not None
            refunds.append((order_id, amount_cents, call.fence))
            return f"refunded {amount_cents} on {order_id}"

        model = FakeModel(tool_calls=[("refund", {"order_id": "A1", "amount_cents": 500})])
        guarded = DedupAgent(
            dedup, agent_of(model, tools=[refund]), session_guard=SessionGuard(dedup)
        )
        await guarded.invoke_async("refund A1", session_id="s", idempotency_token="turn-1")
        # the client retried with a new request id: the turn runs again, the refund does not
        retried = await guarded.invoke_async(
            "refund A1", session_id="s", idempotency_token="turn-2"
        )
        assert model.calls == 4
        assert [(order, amount) for order, amount, _ in refunds] == [("A1", 500)]
        assert retried.stop_reason == "end_turn"
        # another session is another customer: its refund runs
        await guarded.invoke_async("refund A1", session_id="s-other", idempotency_token="turn-3")
        assert len(refunds) == 2


async def test_idempotent_functions_outside_strands(backend_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace, lease_ttl=2) as dedup:
        sent: list[dict[str, Any]] = []

        @idempotent_tool(dedup)
        async def send_email(to: str, body: dict[str, Any]) -> int:
            sent.append({"to": to, **body})
            return len(sent)

        # the same arguments in another order of keys are the same call
        assert await send_email("a@x", {"x": 1, "y": 2}) == 1
        assert await send_email(to="a@x", body={"y": 2, "x": 1}) == 1
        assert await send_email("b@x", {"x": 1, "y": 2}) == 2
        guard = SessionGuard(dedup)
        async with guard.hold("conversation-9"):
            assert current_session() is not None
            assert await send_email("a@x", {"x": 1, "y": 2}) == 3  # scoped by the session
        assert len(sent) == 3

        @idempotent_tool(dedup)
        def blocking(n: int) -> int:
            sent.append({"n": n})
            return n * 2

        assert await asyncio.to_thread(blocking, 4) == 8
        assert await asyncio.to_thread(blocking, 4) == 8
        assert len(sent) == 4
        with pytest.raises(RuntimeError, match="worker thread"):
            blocking(5)


# -- several processes on a real Redis -------------------------------------------------------


@pytest.mark.redis
async def test_two_processes_each_with_an_agent_run_the_model_once(
    redis_url: str, namespace: str, agents: Callable[..., Awaitable[Child]]
) -> None:
    procs = [
        await agents("invoke", redis_url, namespace, "s-42", "req-8f3a", "--delay", "0.5")
        for _ in range(2)
    ]
    for proc in procs:
        await proc.expect("ready", 30)
    side = redis.Redis.from_url(redis_url)
    side.rpush(f"{namespace}:barrier", *["go"] * len(procs))
    side.close()
    results = [await proc.expect("result", 30) for proc in procs]
    assert sum(r["model_calls"] for r in results) == 1
    first = results[0]
    for r in results[1:]:
        for field in ("message", "stop_reason", "state", "text", "usage", "cycles"):
            assert r[field] == first[field], field


@pytest.mark.redis
async def test_three_processes_share_one_session_one_at_a_time(
    redis_url: str, namespace: str, agents: Callable[..., Awaitable[Child]]
) -> None:
    procs = [
        await agents("queue", redis_url, namespace, "s-q", "--calls", "10", "--work", "0.02")
        for _ in range(3)
    ]
    for proc in procs:
        await proc.expect("ready", 30)
    side = redis.Redis.from_url(redis_url)
    side.rpush(f"{namespace}:barrier", *["go"] * len(procs))
    side.close()
    for proc in procs:
        await proc.expect("finished", 45)
    entered = [e for proc in procs for e in proc.of("entered")]
    assert len(entered) == 30
    assert max(e["inside"] for e in entered) == 1, "two callers were inside the session at once"
    fences = sorted(e["fence"] for e in entered)
    assert len(set(fences)) == 30
    for proc in procs:  # FIFO within a process: admitted in the order they asked
        order = [e["index"] for e in sorted(proc.of("entered"), key=lambda e: e["fence"])]
        assert order == list(range(10))


@pytest.mark.redis
async def test_a_sigkilled_holder_frees_the_session_within_one_lease(
    redis_url: str, namespace: str, agents: Callable[..., Awaitable[Child]]
) -> None:
    lease_ttl = 1.0
    holder = await agents("hold", redis_url, namespace, "s-k", "--lease-ttl", str(lease_ttl))
    held = await holder.expect("holding", 30)
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=lease_ttl) as dedup:
        guard = SessionGuard(dedup, mode="throw")
        with pytest.raises(SessionBusy):
            async with guard.hold("s-k"):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        queued = SessionGuard(dedup, queue_timeout=10)
        async with queued.hold("s-k") as hold:
            waited = time.monotonic() - killed
            assert hold.fence > held["fence"]
        assert waited < lease_ttl + 0.5 + 0.5


@pytest.mark.redis
async def test_a_sigkilled_waiter_blocks_the_queue_at_most_one_lease(
    redis_url: str, namespace: str, agents: Callable[..., Awaitable[Child]]
) -> None:
    lease_ttl = 1.0
    async with Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=lease_ttl) as dedup:
        guard = SessionGuard(dedup, queue_timeout=10)
        async with guard.hold("s-w"):
            dead = await agents("wait", redis_url, namespace, "s-w", "--lease-ttl", "1")
            await dead.expect("queued", 30)
            os.kill(dead.pid, signal.SIGKILL)
            entry = guard.hold("s-w")
            behind = asyncio.ensure_future(entry.__aenter__())
            while (await dedup.health()).sessions_waiting < 1:
                await asyncio.sleep(0.01)
            released = time.monotonic()
        await asyncio.wait_for(behind, 10)
        waited = time.monotonic() - released
        await entry.__aexit__(None, None, None)
        assert waited < lease_ttl + 0.5 + 0.5, waited
