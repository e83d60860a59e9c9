"""A child process for the effects-across-takeovers tests in test_effects.py.

Usage::

    python tests/effects_worker.py post URL NAMESPACE TOKEN --target URL [--lease-ttl T]
    python tests/effects_worker.py tool URL NAMESPACE TOKEN --session S [--hang] [--lease-ttl T]

Each reports ``ready`` once connected, then waits for a line on stdin before it starts its call;
a call that finds the token's lease held reports ``waiting`` (it waits for the lease to end).
Reports are JSON lines on stdout (see tests/children.py):

- ``post``: one call (scope ``tenant-a``) that POSTs to ``--target`` through
  `IdempotentAsyncTransport`; ``posting`` just before the request, ``done`` with the call's role
  and fence, and the response's status, body, replay header and the key and fence it carried.
- ``tool``: a `DedupAgent` turn whose model asks for the ``refund`` tool (an `idempotent_tool`
  that counts its executions in Redis, ``<NAMESPACE>:tool-runs``); ``tool_result`` when the
  model gets the tool's result (with ``--hang`` the process then blocks until killed), ``done``
  with the call's role and the tool results the model saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import redis
from fake_model import FakeModel
from strands import Agent, tool

from strands_dedup import Deduplicator, SessionGuard, current_call
from strands_dedup.agents import idempotent_tool
from strands_dedup.agents.strands import DedupAgent
from strands_dedup.http import FENCE_HEADER, IdempotentAsyncTransport


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


async def started(dedup: Deduplicator, run: Awaitable[Any]) -> Any:
    """Wait for the go line, then run; report ``waiting`` if the call waits on a live lease."""
    emit("ready")
    await asyncio.to_thread(sys.stdin.readline)
    task = asyncio.ensure_future(run)
    while not task.done():
        if (await dedup.health()).waiters > 0:
            emit("waiting")
            break
        await asyncio.wait({task}, timeout=0.01)  # polling this process's own counter
    return await task


async def post(args: argparse.Namespace) -> None:
    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl
    ) as dedup:

        async def call() -> dict[str, Any]:
            transport = IdempotentAsyncTransport()
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                emit("posting")
                response = await client.post(args.target, json={"order": 7, "cents": 500})
            return {
                "status": response.status_code,
                "body": response.json(),
                "replayed": response.headers.get("idempotent-replayed"),
                "key": response.request.headers["idempotency-key"],
                "sent_fence": int(response.request.headers[FENCE_HEADER]),
            }

        outcome = await started(dedup, dedup.execute(args.token, call, scope="tenant-a"))
        emit("done", role=outcome.role.value, fence=outcome.fence, **outcome.value)


class _ReportingModel(FakeModel):
    """Reports the tool results it is given (and, with ``hang``, never answers them)."""

    def __init__(self, hang: bool, seen: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hang = hang
        self.seen = seen

    async def _events(self, messages: Any) -> AsyncIterator[Any]:
        results = [
            block["toolResult"]["content"][0]["text"]
            for block in messages[-1].get("content", [])
            if "toolResult" in block
        ]
        if results:
            self.seen.extend(results)
            emit("tool_result", results=results)
            if self.hang:
                await asyncio.Event().wait()  # crashed here: killed by the test
        async for event in super()._events(messages):
            yield event


async def tool_turn(args: argparse.Namespace) -> None:
    side = redis.Redis.from_url(args.url)
    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl
    ) as dedup:

        @tool
        @idempotent_tool(dedup)
        def refund(order_id: str, cents: int) -> str:
            """Refund an order."""
            execution = side.incr(f"{args.namespace}:tool-runs")
            call = current_call()
            assert call is not None
            return f"refunded {cents} on {order_id} in pid {os.getpid()} (execution {execution})"

        seen: list[str] = []
        model = _ReportingModel(
            args.hang,
            seen,
            reply="refund done",
            tool_calls=[("refund", {"order_id": "o-7", "cents": 500})],
        )
        factory: Callable[[str], Agent] = lambda session_id: Agent(  # noqa: E731
            model=model, tools=[refund], callback_handler=None
        )
        guarded = DedupAgent(dedup, factory, session_guard=SessionGuard(dedup))
        turn = guarded.invoke_async(
            "refund order o-7", session_id=args.session, idempotency_token=args.token
        )
        result = await started(dedup, turn)
        emit("done", text=str(result).strip(), tool_results=seen, model_calls=model.calls)
    side.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["post", "tool"])
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("token")
    parser.add_argument("--target")
    parser.add_argument("--session", default="s-1")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    args = parser.parse_args()
    await {"post": post, "tool": tool_turn}[args.mode](args)


if __name__ == "__main__":
    asyncio.run(main())
