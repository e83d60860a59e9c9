"""A Strands agent service run as several replicas behind one Redis (see compose.yaml here).

Each replica wraps its agent in `DedupAgent`: a request sent with the same ``Idempotency-Key``
to any replica runs the model once and every copy gets its reply; the turns of one session run
one at a time across the replicas (a queue-mode `SessionGuard`), each starting from the history
the previous turn committed (a crashed or stale attempt's writes never reach it). The history is
Strands' ``FileSessionManager`` (wrapped in `committed_session`) in ``AGENT_SESSIONS``,
a directory every replica shares (a volume in compose; S3 or another shared store elsewhere).

The model is an offline stand-in (no network): it answers with the number of messages it was
given, so a reply shows which history the turn started from, and the replica that ran it.

With Docker (from this directory)::

    docker compose up -d --wait
    curl -s localhost:8001/sessions/s-1/messages -H 'Idempotency-Key: m-1' \\
         -H 'content-type: application/json' -d '{"text": "hello"}' &
    curl -s localhost:8002/sessions/s-1/messages -H 'Idempotency-Key: m-1' \\
         -H 'content-type: application/json' -d '{"text": "hello"}'      # the same reply
    curl -s localhost:8002/sessions/s-1/messages -H 'Idempotency-Key: m-2' \\
         -H 'content-type: application/json' -d '{"text": "again"}'      # 3 messages so far

Without Docker, two replicas from the repository's root::

    export STRANDS_DEDUP_REDIS_URL=redis://127.0.0.1:6379/0 AGENT_SESSIONS=/tmp/agent-sessions
    PORT=8001 python examples/compose-agent/service.py &
    PORT=8002 python examples/compose-agent/service.py &

Environment: ``STRANDS_DEDUP_REDIS_URL`` (default ``memory://``, one process only),
``STRANDS_DEDUP_NAMESPACE`` (``compose-agent``), ``AGENT_SESSIONS``, ``HOST`` (127.0.0.1),
``PORT`` (8000), ``MODEL_DELAY`` (seconds the model takes, 0.5), ``REPLICA`` (a name shown in
replies; default the host name and pid).
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Header, HTTPException, Path
from pydantic import BaseModel, Field
from strands import Agent
from strands.models.model import Model
from strands.session.file_session_manager import FileSessionManager

from strands_dedup import (
    Deduplicator,
    FingerprintMismatch,
    SessionBusy,
    SessionGuard,
    WaitTimeout,
)
from strands_dedup.agents.strands import DedupAgent, committed_session

REPLICA = os.environ.get("REPLICA") or f"{socket.gethostname()}:{os.getpid()}"
SESSIONS = os.environ.get("AGENT_SESSIONS") or os.path.join(tempfile.gettempdir(), "agent-sessions")


class OfflineModel(Model):
    """Answers after ``MODEL_DELAY`` seconds, naming the history's length and this replica."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"model_id": "offline"}

    def update_config(self, **model_config: Any) -> None:
        self.config.update(model_config)

    def get_config(self) -> Any:
        return self.config

    async def structured_output(  # type: ignore[override]
        self, output_model: Any, prompt: Any, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        raise NotImplementedError
        yield

    async def stream(  # type: ignore[override]
        self, messages: Any, tool_specs: Any = None, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        await asyncio.sleep(float(os.environ.get("MODEL_DELAY", "0.5")))
        said = " ".join(block.get("text", "") for block in messages[-1]["content"])
        text = f"{len(messages)} messages so far; you said {said!r} (run by {REPLICA})"
        yield {"messageStart": {"role": "assistant"}}
        yield {"contentBlockStart": {"start": {}}}
        yield {"contentBlockDelta": {"delta": {"text": text}}}
        yield {"contentBlockStop": {}}
        yield {"messageStop": {"stopReason": "end_turn"}}
        usage = {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}
        yield {"metadata": {"usage": usage, "metrics": {"latencyMs": 0}}}


def make_agent(session_id: str) -> Agent:
    # Built inside the session's hold: the session manager loads the committed history now;
    # committed_session stages the turn's writes until the turn commits, once.
    sessions = committed_session(FileSessionManager(session_id=session_id, storage_dir=SESSIONS))
    return Agent(model=OfflineModel(), session_manager=sessions, callback_handler=None)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("STRANDS_DEDUP_REDIS_URL", "memory://")
    namespace = os.environ.get("STRANDS_DEDUP_NAMESPACE", "compose-agent")
    async with Deduplicator.from_url(url, namespace=namespace, lease_ttl=10) as dedup:
        app.state.dedup = dedup
        app.state.agent = DedupAgent(
            dedup, make_agent, session_guard=SessionGuard(dedup, mode="queue", queue_timeout=60)
        )
        yield


app = FastAPI(title="compose agent", lifespan=lifespan)


class Message(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)


@app.post("/sessions/{session_id}/messages")
async def post_message(
    message: Message,
    session_id: str = Path(pattern=r"^[A-Za-z0-9_-]{1,64}$"),
    idempotency_key: str | None = Header(None, max_length=200),
) -> dict[str, str]:
    """One turn of the session's conversation, once per Idempotency-Key."""
    guarded: DedupAgent = app.state.agent
    try:
        result = await guarded.invoke_async(
            message.text, session_id=session_id, idempotency_token=idempotency_key
        )
    except SessionBusy as exc:
        raise HTTPException(409, str(exc), headers={"Retry-After": "1"}) from exc
    except FingerprintMismatch as exc:
        raise HTTPException(422, str(exc)) from exc
    except WaitTimeout as exc:
        raise HTTPException(504, str(exc)) from exc
    return {"reply": str(result).strip(), "answered_by": REPLICA}


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    """Ready when Redis answers."""
    health = await app.state.dedup.health()
    if not health.ok:
        raise HTTPException(503, health.error or "not ready")
    return health.to_json()


if __name__ == "__main__":
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        log_level="warning",
    )
