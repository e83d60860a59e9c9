"""A child process for the conversation tests (test_conversation.py): one DedupAgent turn on a
session kept by FileSessionManager, S3SessionManager or RedisSessionManager.

Usage::

    python tests/conversation_worker.py turn URL NAMESPACE SESSION STORE WHERE TOKEN PROMPT
        [--reply TEXT] [--delay S] [--lease-ttl S]
    python tests/conversation_worker.py turns URL NAMESPACE SESSION STORE WHERE TOKEN:PROMPT...

STORE is ``file`` (WHERE: a directory), ``s3`` (WHERE: the endpoint URL of a local S3 server;
bucket ``sessions``) or ``redis``. The model replies ``--reply`` (default ``answer to
<prompt>``) after ``--delay`` seconds. Reports are JSON lines (see tests/children.py):

- ``model``: the model was called; ``seen``: the history it got, as ``[role, text]`` pairs.
- ``result``: the turn's answer (``text``); ``error``: the exception's type and message.
``turns`` runs its TOKEN:PROMPT turns concurrently (they queue on the session in that order)
and reports ``finished`` after them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from fake_model import FakeModel
from strands import Agent
from strands.session.file_session_manager import FileSessionManager

from strands_dedup import Deduplicator, SessionGuard
from strands_dedup.agents.strands import DedupAgent

try:  # the same worker runs the unfixed code, to show a test fails without the commit
    from strands_dedup.agents.strands import RedisSessionManager, committed_session
except ImportError:  # pragma: no cover - only on the unfixed code
    committed_session = None  # type: ignore[assignment]

BUCKET = "sessions"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def texts(messages: Any) -> list[list[str]]:
    """[role, text] of each message (tool blocks named by kind)."""
    seen = []
    for message in messages:
        parts = [b.get("text", next(iter(b), "?")) for b in message.get("content", [])]
        seen.append([message["role"], " ".join(p.strip() for p in parts)])
    return seen


class Model(FakeModel):
    """Reports what it sees; answers ``answer to <the last user text>`` unless told."""

    def __init__(self, reply: str | None, delay: float) -> None:
        super().__init__(reply or "", delay=delay)
        self.fixed = reply

    async def _events(self, messages: Any) -> AsyncIterator[Any]:
        seen = texts(messages)
        emit("model", seen=seen)
        self.reply = self.fixed or f"answer to {seen[-1][1]}"
        async for event in super()._events(messages):
            yield event


def session_manager(store: str, where: str, session_id: str, dedup: Deduplicator) -> Any:
    if store == "redis":
        return RedisSessionManager(session_id, dedup=dedup)
    if store == "file":
        manager: Any = FileSessionManager(session_id, storage_dir=where)
    else:
        from strands.session.s3_session_manager import S3SessionManager

        manager = S3SessionManager(
            session_id, bucket=BUCKET, endpoint_url=where, region_name="us-east-1"
        )
    return manager if committed_session is None else committed_session(manager)


def agent_of(args: argparse.Namespace, dedup: Deduplicator, model: Model) -> DedupAgent:
    return DedupAgent(
        dedup,
        lambda sid: Agent(
            model=model,
            callback_handler=None,
            session_manager=session_manager(args.store, args.where, sid, dedup),
        ),
        session_guard=SessionGuard(dedup, mode="queue", queue_timeout=30),
    )


async def turn(agent: DedupAgent, session: str, token: str, prompt: str) -> None:
    try:
        result = await agent.invoke_async(prompt, session_id=session, idempotency_token=token)
    except Exception as exc:
        emit("error", token=token, type=type(exc).__name__, message=str(exc))
    else:
        emit("result", token=token, text=str(result).strip())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["turn", "turns"])
    for name in ("url", "namespace", "session", "store", "where"):
        parser.add_argument(name)
    parser.add_argument("rest", nargs="+")
    parser.add_argument("--reply")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    args = parser.parse_args()
    model = Model(args.reply, args.delay)
    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl, wait_timeout=30
    ) as dedup:
        agent = agent_of(args, dedup, model)
        if args.mode == "turn":
            token, prompt = args.rest
            await turn(agent, args.session, token, prompt)
            return
        runs = []
        for item in args.rest:
            token, prompt = item.split(":", 1)
            runs.append(asyncio.ensure_future(turn(agent, args.session, token, prompt)))
            await asyncio.sleep(0)  # let it start; the order the turns are admitted in is free
        await asyncio.gather(*runs)
        emit("finished")


if __name__ == "__main__":
    asyncio.run(main())
