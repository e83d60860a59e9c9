"""examples/webhook_consumer.py as two uvicorn replicas on a real Redis: an event delivered to
both at once, then delivered again, takes effect once."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from recipes import Server, served_together, uvicorn

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
SECRET = "test-secret"


@pytest.fixture
def outbox(tmp_path: Path) -> Path:
    return tmp_path / "outbox.jsonl"


@pytest.fixture
def replicas(redis_url: str, namespace: str, outbox: Path) -> Iterator[list[str]]:
    env = {
        "STRANDS_DEDUP_REDIS_URL": redis_url,
        "STRANDS_DEDUP_NAMESPACE": namespace,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_OUTBOX": str(outbox),
        "WEBHOOK_WORK": "1",  # long enough that the two deliveries overlap
    }
    command = uvicorn("examples.webhook_consumer:app")
    with served_together(*(Server(command, "/docs", env) for _ in range(2))) as urls:
        yield urls


def delivery(event: dict[str, object], secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Signature": f"sha256={signature}", "content-type": "application/json"}


def effects(outbox: Path) -> list[str]:
    if not outbox.exists():
        return []
    return [json.loads(line)["event"] for line in outbox.read_text().splitlines()]


async def test_a_redelivered_event_takes_effect_once(replicas: list[str], outbox: Path) -> None:
    event = {"id": "evt_1", "type": "order.paid", "data": {"order": "o-7"}}
    body, headers = delivery(event)
    async with httpx.AsyncClient(timeout=30) as client:

        async def deliver(
            url: str, body: bytes = body, headers: dict[str, str] = headers
        ) -> httpx.Response:
            return await client.post(url + "/webhook", content=body, headers=headers)

        first, concurrent = await asyncio.gather(deliver(replicas[0]), deliver(replicas[1]))
        assert first.status_code == concurrent.status_code == 200, (first.text, concurrent.text)
        assert first.json()["result"] == concurrent.json()["result"]
        assert sorted(r.json()["role"] for r in (first, concurrent)) == ["primary", "waiter"]

        later = await asyncio.gather(*(deliver(url) for url in replicas))
        assert [r.json() for r in later] == [{**first.json(), "role": "replay"}] * 2
        assert effects(outbox) == ["evt_1"]

        forged = await deliver(
            replicas[0], headers={**headers, "X-Signature": "sha256=" + "0" * 64}
        )
        assert forged.status_code == 401
        reused = await deliver(replicas[1], *delivery({**event, "data": {"order": "o-8"}}))
        assert reused.status_code == 422  # the same event id with another body

        other = await deliver(replicas[1], *delivery({**event, "id": "evt_2"}))
        assert other.json()["role"] == "primary"
        assert effects(outbox) == ["evt_1", "evt_2"]
