"""Every surface is observed alike: requests through the gateway and the middleware, and streamed
calls, show in ``strands-dedup stats --json`` (the fleet's published counters) and in Prometheus
metrics exactly as library calls do, because they all run through the same engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest
from servers import free_port, gateway_command, process
from test_gateway import upstream  # noqa: F401 - a fixture
from test_metrics import _samples

from strands_dedup import Deduplicator, PrometheusMetrics
from strands_dedup.cli import NAMESPACE_ENV, REDIS_URL_ENV, main
from strands_dedup.http import IdempotencyMiddleware

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


async def _stats(redis_url: str, namespace: str) -> dict[str, int]:
    env = {REDIS_URL_ENV: redis_url, NAMESPACE_ENV: namespace}
    result = await asyncio.to_thread(
        CliRunner().invoke, main, ["stats", "--json"], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    counters: dict[str, int] = json.loads(result.stdout)["counters"]
    return counters


async def _published(redis_url: str, namespace: str, at_least: dict[str, int]) -> dict[str, int]:
    deadline = time.monotonic() + 20  # a process publishes every stats_interval (5 s default)
    while True:
        counters = await _stats(redis_url, namespace)
        if all(counters.get(k, 0) >= v for k, v in at_least.items()):
            return counters
        assert time.monotonic() < deadline, f"counters never reached {at_least}: {counters}"
        await asyncio.sleep(0.2)  # polling the CLI's view against a deadline


async def test_gateway_requests_are_counted_in_stats_and_metrics(
    upstream: str,  # noqa: F811
    redis_url: str,
    namespace: str,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = {"Idempotency-Key": "gw-1"}
    with process(gateway_command(upstream, redis_url, namespace, port), url + "/healthz"):
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.post(url + "/invoke", headers=key, content=b"1")
            again = await client.post(url + "/invoke", headers=key, content=b"1")
            scraped = await client.get(url + "/metrics")
        assert (first.status_code, again.headers["idempotent-replayed"]) == (200, "true")
        samples = _samples(scraped.text, namespace)
        # The primary's client has its response before the result is stored: a retry sent at
        # once may still find the call settling, and wait for it instead of replaying it.
        assert samples[("strands_dedup_claims_total", ())] == 1
        seconds = (
            samples[("strands_dedup_replays_total", ())]
            + samples[("strands_dedup_waits_total", ())]
        )
        assert seconds == 1
        deadline = time.monotonic() + 20
        counters = await _published(redis_url, namespace, {"claims": 1})
        while counters.get("replays", 0) + counters.get("waits", 0) < 1:
            assert time.monotonic() < deadline, f"the second request never counted: {counters}"
            counters = await _published(redis_url, namespace, {"claims": 1})
    assert counters["claims"] == 1 and counters.get("replays", 0) + counters.get("waits", 0) == 1


Scope = MutableMapping[str, Any]


async def _app(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"done"})


async def test_middleware_streams_and_library_calls_are_counted_alike(
    redis_url: str, namespace: str
) -> None:
    registry = CollectorRegistry()
    async with Deduplicator.from_url(
        redis_url,
        namespace=namespace,
        stats_interval=0.2,
        metrics=PrometheusMetrics(registry),
    ) as dedup:
        transport = httpx.ASGITransport(app=IdempotencyMiddleware(_app, dedup=dedup))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            for _ in range(2):
                response = await client.post("/", headers={"Idempotency-Key": "mw"}, content=b"x")
                assert response.text == "done"

        async def chunks() -> AsyncIterator[str]:
            yield "a"
            yield "b"

        for _ in range(2):
            assert [c async for c in dedup.stream("streamed", chunks)] == ["a", "b"]
            assert await dedup.run("library", lambda: 1) == 1
        assert dedup.counters["claims"] == 3 and dedup.counters["replays"] == 3
        samples = _samples(generate_latest(registry).decode(), namespace)
        assert samples[("strands_dedup_claims_total", ())] == 3
        assert samples[("strands_dedup_replays_total", ())] == 3
        counters = await _published(redis_url, namespace, {"claims": 3, "replays": 3})
    assert counters["claims"] == 3 and counters["replays"] == 3
