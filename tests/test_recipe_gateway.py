"""examples/behind_gateway.py: an unchanged agent service behind two `strands-dedup gateway`
processes on a real Redis; a client's retry through the other replica runs the agent once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from recipes import Server, served, served_together, uvicorn
from servers import gateway_command

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def service() -> Iterator[str]:
    with served(uvicorn("examples.behind_gateway:app"), "/runs", AGENT_WORK="0.5") as url:
        yield url


@pytest.fixture
def gateways(service: str, redis_url: str, namespace: str) -> Iterator[list[str]]:
    servers = []
    for _ in range(2):
        command = gateway_command(service, redis_url, namespace, 0)
        command[command.index("--port") + 1] = "{port}"
        servers.append(Server(command, "/readyz"))
    with served_together(*servers) as urls:
        yield urls


async def test_a_retry_through_another_replica_runs_the_agent_once(
    service: str, gateways: list[str]
) -> None:
    body = {"prompt": "refund order 42"}
    async with httpx.AsyncClient(timeout=30) as client:

        async def send(url: str, key: str, json: dict[str, str] = body) -> httpx.Response:
            return await client.post(url + "/invoke", json=json, headers={"Idempotency-Key": key})

        first, retry = await asyncio.gather(
            send(gateways[0], "order-42"), send(gateways[1], "order-42")
        )
        assert first.status_code == retry.status_code == 200, (first.text, retry.text)
        assert first.json() == retry.json()
        replayed = [r.headers.get("idempotent-replayed") for r in (first, retry)]
        assert replayed.count("true") == 1  # the retry waited for the first, then got it
        later = await send(gateways[1], "order-42")  # after completion: the stored response
        assert later.json() == first.json() and later.headers["idempotent-replayed"] == "true"
        assert (await send(gateways[0], "order-42", {"prompt": "other"})).status_code == 422

        runs = (await client.get(service + "/runs")).json()
        assert [run["prompt"] for run in runs] == ["refund order 42"]

        # the service itself is not idempotent: straight to it, the same request runs again
        direct = await send(service, "order-42")
        assert direct.json()["run"] == 2
