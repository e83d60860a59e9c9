"""An existing agent service made safe to retry by `strands-dedup gateway`, left unchanged.

The service below knows nothing of idempotency: every ``POST /invoke`` runs its agent (a stand-in
that takes ``AGENT_WORK`` seconds, 1 by default) and is recorded in ``GET /runs``. Put gateway
replicas in front of it, all sharing one Redis, and let clients reach only the gateways::

    uvicorn examples.behind_gateway:app --port 8080 &
    strands-dedup gateway --upstream http://127.0.0.1:8080 \\
        --redis-url redis://127.0.0.1:6379/0 --namespace agent-gw --port 8787 &
    strands-dedup gateway --upstream http://127.0.0.1:8080 \\
        --redis-url redis://127.0.0.1:6379/0 --namespace agent-gw --port 8788 &
    curl -s -X POST localhost:8787/invoke -H 'Idempotency-Key: order-42' \\
         -H 'content-type: application/json' -d '{"prompt": "refund order 42"}' &
    curl -si -X POST localhost:8788/invoke -H 'Idempotency-Key: order-42' \\
         -H 'content-type: application/json' -d '{"prompt": "refund order 42"}'
    curl -s localhost:8080/runs

The client's retry on the second replica waits for the first request and gets its response
(``Idempotent-Replayed: true``); ``/runs`` shows one run. The same key with another body is a
422; a request without a key passes through as before. Keys are scoped by a digest of the
caller's ``Authorization`` / ``X-Api-Key`` headers, so one caller never gets another's response.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

app = FastAPI(title="an agent service that knows nothing of idempotency")
app.state.runs = []


class Invocation(BaseModel):
    prompt: str = Field(min_length=1, max_length=100_000)


@app.post("/invoke")
async def invoke(invocation: Invocation, request: Request) -> dict[str, Any]:
    """Run the agent: slow, costly, and with effects that must not happen twice."""
    runs = request.app.state.runs
    run = {"run": len(runs) + 1, "prompt": invocation.prompt, "pid": os.getpid()}
    runs.append(run)
    await asyncio.sleep(float(os.environ.get("AGENT_WORK", "1")))
    return {**run, "answer": f"done: {invocation.prompt}"}


@app.get("/runs")
async def list_runs(request: Request) -> list[dict[str, Any]]:
    """Every run so far, in order."""
    runs: list[dict[str, Any]] = request.app.state.runs
    return runs
