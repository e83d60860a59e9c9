"""A webhook receiver that acts once per event, however often and wherever it is redelivered.

Senders (payment providers, GitHub, Slack, a queue's push endpoint) deliver an event again when
they saw no 2xx in time, and each delivery may land on another replica. This receiver checks
the delivery's signature, then handles it keyed by the event's id (`message_token`):

- the first delivery runs the effect (a line appended to the ``WEBHOOK_OUTBOX`` file, standing
  for a fulfilment, an email, a ledger entry) and answers ``"role": "primary"``;
- a redelivery while it runs, on any replica, waits for it and gets its answer (``waiter``);
- a redelivery afterwards gets the stored answer (``replay``) for ``result_ttl``, three days
  here: longer than senders keep redelivering;
- the same event id with another body is refused (422); a bad signature is a 401;
- an effect that fails is not stored: the 500 makes the sender deliver again, and that
  delivery runs it again.

Run two replicas on one Redis and deliver one event to both at once, then again::

    export STRANDS_DEDUP_REDIS_URL=redis://127.0.0.1:6379/0
    export WEBHOOK_SECRET=s3cret WEBHOOK_OUTBOX=/tmp/outbox.jsonl
    uvicorn examples.webhook_consumer:app --port 8101 &
    uvicorn examples.webhook_consumer:app --port 8102 &
    body='{"id": "evt_1", "type": "order.paid", "data": {"order": "o-7"}}'
    sig="sha256=$(printf %s "$body" | openssl dgst -sha256 -hmac s3cret -r | cut -d' ' -f1)"
    curl -s localhost:8101/webhook -H "X-Signature: $sig" -d "$body" &
    curl -s localhost:8102/webhook -H "X-Signature: $sig" -d "$body"
    curl -s localhost:8102/webhook -H "X-Signature: $sig" -d "$body"
    cat /tmp/outbox.jsonl     # one line

``WEBHOOK_WORK`` is how long the effect takes (1 s by default, so deliveries overlap).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError

from strands_dedup import Deduplicator, FingerprintMismatch, WaitTimeout
from strands_dedup.agents import message_token

SOURCE = "shop"  # the sender: event ids are unique per sender, so the token names it
MAX_BODY = 64 * 1024


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = os.environ.get("STRANDS_DEDUP_REDIS_URL", "memory://")
    namespace = os.environ.get("STRANDS_DEDUP_NAMESPACE", "webhooks")
    async with Deduplicator.from_url(url, namespace=namespace, result_ttl=3 * 86400) as dedup:
        app.state.dedup = dedup
        yield


app = FastAPI(title="webhook receiver", lifespan=lifespan)


class Event(BaseModel):
    id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=200)
    data: dict[str, Any] = Field(default_factory=dict)


def signed(body: bytes, signature: str | None) -> bool:
    """Whether ``signature`` is ``sha256=`` and the HMAC-SHA256 of ``body`` under the secret."""
    secret = os.environ.get("WEBHOOK_SECRET", "")
    if not secret or signature is None or not signature.startswith("sha256="):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.removeprefix("sha256="))


async def fulfil(event: Event) -> dict[str, Any]:
    """The effect that must happen once per event."""
    await asyncio.sleep(float(os.environ.get("WEBHOOK_WORK", "1")))
    line = json.dumps({"event": event.id, "type": event.type, "pid": os.getpid()}) + "\n"
    await asyncio.to_thread(_append, os.environ["WEBHOOK_OUTBOX"], line)
    return {"event": event.id, "fulfilled_by": os.getpid()}


def _append(path: str, line: str) -> None:
    with open(path, "a") as outbox:
        outbox.write(line)


async def _body(request: Request) -> bytes:
    """The request's body, refused (413) past ``MAX_BODY`` bytes before more is read."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY:
            raise HTTPException(413, f"a delivery is at most {MAX_BODY} bytes")
        parts.append(part)
    return b"".join(parts)


@app.post("/webhook")
async def receive(request: Request, x_signature: str | None = Header(None)) -> dict[str, Any]:
    """Verify a delivery, then handle its event once across every replica."""
    body = await _body(request)
    if not signed(body, x_signature):
        raise HTTPException(401, "bad or missing X-Signature")
    try:
        event = Event.model_validate_json(body)
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False)) from None
    dedup: Deduplicator = request.app.state.dedup
    try:
        outcome = await dedup.execute(
            message_token(SOURCE, event.id), lambda: fulfil(event), fingerprint=body
        )
    except FingerprintMismatch as exc:
        raise HTTPException(422, str(exc)) from exc
    except WaitTimeout as exc:  # the first delivery still runs: the sender will deliver again
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
    return {"result": outcome.value, "role": outcome.role.value}
