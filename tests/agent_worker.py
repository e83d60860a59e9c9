"""A child process for the multi-process agent and session tests in test_agents.py.

Usage::

    python tests/agent_worker.py invoke URL NAMESPACE SESSION TOKEN --delay D
    python tests/agent_worker.py queue URL NAMESPACE SESSION --calls N --work S
    python tests/agent_worker.py hold URL NAMESPACE SESSION --lease-ttl T
    python tests/agent_worker.py wait URL NAMESPACE SESSION --lease-ttl T

Reports are JSON lines on stdout (see tests/children.py), each with an ``event`` field:

- ``ready``: connected; then waits for the barrier (BLPOP ``<NAMESPACE>:barrier``) so every
  process starts together (``invoke`` and ``queue``).
- ``result`` (``invoke``): the AgentResult's message, stop_reason, state, text and metrics
  totals, and how many times this process's model ran.
- ``entered`` (``queue``): one call is inside the session: its index in this process and how many
  callers were inside at that moment (``inside``, counted in Redis); ``finished`` when all are.
- ``holding`` (``hold``): inside the session; it then blocks until killed.
- ``queued`` (``wait``): waiting in the session's queue; it then waits until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import redis.asyncio as aredis
from fake_model import FakeModel
from strands import Agent

from strands_dedup import Deduplicator, SessionGuard
from strands_dedup.agents.strands import DedupAgent


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


async def barrier(side: aredis.Redis, namespace: str) -> None:
    emit("ready")
    await side.blpop([f"{namespace}:barrier"], timeout=30)


async def invoke(args: argparse.Namespace, side: aredis.Redis) -> None:
    model = FakeModel("the answer is 42", delay=args.delay)
    async with Deduplicator.from_url(args.url, namespace=args.namespace, lease_ttl=2) as dedup:
        guarded = DedupAgent(
            dedup,
            lambda session_id: Agent(model=model, callback_handler=None),
            session_guard=SessionGuard(dedup),
        )
        await barrier(side, args.namespace)
        result = await guarded.invoke_async(
            "what is the answer?", session_id=args.session, idempotency_token=args.token
        )
        summary = result.metrics.get_summary()
        emit(
            "result",
            message=result.message,
            stop_reason=result.stop_reason,
            state=result.state,
            text=str(result),
            usage=summary["accumulated_usage"],
            cycles=summary["total_cycles"],
            model_calls=model.calls,
        )


async def queue(args: argparse.Namespace, side: aredis.Redis) -> None:
    inside_key = f"{args.namespace}:inside"
    async with Deduplicator.from_url(args.url, namespace=args.namespace, lease_ttl=2) as dedup:
        guard = SessionGuard(dedup, mode="queue", queue_timeout=60)

        async def call(i: int) -> None:
            async with guard.hold(args.session) as hold:
                inside = await side.incr(inside_key)
                emit("entered", index=i, inside=inside, fence=hold.fence)
                await asyncio.sleep(args.work)
                await side.decr(inside_key)

        await barrier(side, args.namespace)
        await asyncio.gather(*(call(i) for i in range(args.calls)))
        emit("finished")


async def hold(args: argparse.Namespace, side: aredis.Redis) -> None:
    async with (
        Deduplicator.from_url(
            args.url, namespace=args.namespace, lease_ttl=args.lease_ttl
        ) as dedup,
        SessionGuard(dedup).hold(args.session) as held,
    ):
        emit("holding", fence=held.fence)
        await asyncio.Event().wait()


async def wait(args: argparse.Namespace, side: aredis.Redis) -> None:
    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl
    ) as dedup:
        entering = asyncio.ensure_future(SessionGuard(dedup).hold(args.session).__aenter__())
        while (await dedup.health()).sessions_waiting < 1:
            await asyncio.sleep(0.01)
        emit("queued")
        await entering
        emit("holding")
        await asyncio.Event().wait()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["invoke", "queue", "hold", "wait"])
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("session")
    parser.add_argument("token", nargs="?")
    parser.add_argument("--delay", type=float, default=0.3)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--work", type=float, default=0.01)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    args = parser.parse_args()
    side = aredis.Redis.from_url(args.url)
    try:
        await {"invoke": invoke, "queue": queue, "hold": hold, "wait": wait}[args.mode](args, side)
    finally:
        await side.aclose()


if __name__ == "__main__":
    asyncio.run(main())
