"""A FastAPI agent service that is safe to retry, on any number of replicas.

Run two replicas against one Redis and send the same request to both::

    export STRANDS_DEDUP_REDIS_URL=redis://127.0.0.1:6379/0
    uvicorn examples.fastapi_agent:app --port 8001 &
    uvicorn examples.fastapi_agent:app --port 8002 &
    curl -s localhost:8001/sessions/s-42/messages -H 'Idempotency-Key: req-1' \\
         -H 'content-type: application/json' -d '{"text": "hello"}' &
    curl -s localhost:8002/sessions/s-42/messages -H 'Idempotency-Key: req-1' \\
         -H 'content-type: application/json' -d '{"text": "hello"}'

The agent runs once; both clients get its reply. Messages of one session are handled one at a
time across the replicas, in their ``seq`` order when the client numbers them. A webhook that
redelivers a message can send its ``message_id`` instead of an Idempotency-Key.

The model is Strands' default (Amazon Bedrock) unless ``EXAMPLE_MODEL`` names a factory
(``module:callable``) returning a ``strands.models.Model``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field
from strands import Agent

from strands_dedup import (
    Deduplicator,
    FingerprintMismatch,
    SessionBusy,
    SessionGuard,
    WaitTimeout,
)
from strands_dedup.agents import message_token
from strands_dedup.agents.strands import DedupAgent


def make_model() -> Any:
    spec = os.environ.get("EXAMPLE_MODEL")
    if not spec:
        return None  # Strands' default model
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def make_agent(session_id: str) -> Agent:
    # A real service passes a session_manager here (FileSessionManager, S3SessionManager, ...):
    # it loads the session's history now, inside the session's hold.
    return Agent(model=make_model(), callback_handler=None)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("STRANDS_DEDUP_REDIS_URL", "memory://")
    namespace = os.environ.get("STRANDS_DEDUP_NAMESPACE", "agent-service")
    async with Deduplicator.from_url(url, namespace=namespace, lease_ttl=10) as dedup:
        app.state.dedup = dedup
        app.state.agent = DedupAgent(
            dedup, make_agent, session_guard=SessionGuard(dedup, mode="queue", queue_timeout=60)
        )
        yield


app = FastAPI(title="agent service", lifespan=lifespan)


class Message(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    message_id: str | None = Field(None, description="The client's id for this message.")
    seq: int | None = Field(None, ge=0, description="Per-session sequence number.")


class Reply(BaseModel):
    reply: str
    stop_reason: str
    usage: dict[str, Any]


@app.post("/sessions/{session_id}/messages")
async def post_message(
    session_id: str, message: Message, idempotency_key: str | None = Header(None)
) -> Reply:
    token = idempotency_key
    if token is None and message.message_id is not None:
        token = message_token("api", session_id, message.message_id)
    guarded: DedupAgent = app.state.agent
    try:
        result = await guarded.invoke_async(
            message.text, session_id=session_id, idempotency_token=token, seq=message.seq
        )
    except SessionBusy as exc:
        raise HTTPException(409, str(exc), headers={"Retry-After": "1"}) from exc
    except FingerprintMismatch as exc:
        raise HTTPException(422, str(exc)) from exc
    except WaitTimeout as exc:
        raise HTTPException(504, str(exc)) from exc
    return Reply(
        reply=str(result).strip(),
        stop_reason=str(result.stop_reason),
        usage=dict(result.metrics.get_summary()["accumulated_usage"]),
    )


@app.get("/healthz")
async def healthz() -> dict[str, Any]:
    health = await app.state.dedup.health()
    if not health.ok:
        raise HTTPException(503, health.error or "not ready")
    return health.to_json()
