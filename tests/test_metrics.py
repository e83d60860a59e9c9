"""The gateway's /metrics, as installed by the http extra: every request that passed through is
counted (claims, waits, replays, fingerprint mismatches), timed by role, and the in-flight and
waiter gauges are served. A real gateway process on a real Redis, scraped over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, gateway_command, process
from test_gateway import upstream  # noqa: F401 - a fixture

from strands_dedup import Deduplicator, FingerprintMismatch

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def gateway(upstream: str, redis_url: str, namespace: str) -> Iterator[str]:  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(gateway_command(upstream, redis_url, namespace, port), url + "/healthz"):
        yield url


def _samples(text: str, namespace: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("namespace", None) == namespace:
                found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


async def _in_flight(client: httpx.AsyncClient, gateway: str, deadline: float) -> None:
    while (await client.get(gateway + "/readyz")).json()["in_flight"] < 1:
        assert time.monotonic() < deadline, "the primary never started"
        await asyncio.sleep(0.02)  # polling the gateway's own readiness against a deadline


async def test_metrics_count_and_time_every_request(gateway: str, namespace: str) -> None:
    key = {"Idempotency-Key": "order-42"}
    async with httpx.AsyncClient(timeout=30) as client:
        first = asyncio.create_task(client.post(gateway + "/invoke", headers=key, content=b"1"))
        await _in_flight(client, gateway, time.monotonic() + 10)
        during = await client.get(gateway + "/metrics")
        second = asyncio.create_task(client.post(gateway + "/invoke", headers=key, content=b"1"))
        responses = [await first, await second]
        replayed = await client.post(gateway + "/invoke", headers=key, content=b"1")
        reused = await client.post(gateway + "/invoke", headers=key, content=b"2")
        plain = await client.post(gateway + "/invoke", content=b"3")  # no key: passes through
        scraped = await client.get(gateway + "/metrics")
    assert [r.status_code for r in responses] == [200, 200]
    assert "idempotent-replayed" in responses[1].headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert reused.status_code == 422 and plain.status_code == 200
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")

    gauges = _samples(during.text, namespace)
    assert gauges[("strands_dedup_in_flight", ())] == 1

    samples = _samples(scraped.text, namespace)
    async with Deduplicator.from_url("memory://metrics-events", metrics=False) as probe:
        events = list(probe.counters)  # every event a deduplicator counts
    assert "claims" in events and "store_errors" in events
    for event in events:
        assert (f"strands_dedup_{event}_total", ()) in samples, event
    counts = {event: samples[(f"strands_dedup_{event}_total", ())] for event in events}
    assert counts["claims"] == 1
    assert counts["waits"] == 1
    assert counts["replays"] == 1
    assert counts["fingerprint_mismatch"] == 1
    assert counts["takeovers"] == counts["lease_lost"] == counts["store_errors"] == 0
    assert samples[("strands_dedup_in_flight", ())] == 0
    assert samples[("strands_dedup_waiters", ())] == 0

    def requests(role: str, status: str) -> float:
        labels = (("role", role), ("status", status))
        return samples.get(("strands_dedup_http_request_duration_seconds_count", labels), 0)

    assert requests("primary", "2xx") == 1
    assert requests("waiter", "2xx") == 1
    assert requests("replay", "2xx") == 1
    assert requests("none", "4xx") == 1  # the reused key's 422
    assert requests("none", "2xx") == 1  # the request without a key
    waited = ("strands_dedup_wait_duration_seconds_count", ())
    assert samples[waited] == 1  # the waiter (a replay does not wait)
    called = ("strands_dedup_call_duration_seconds_count", (("role", "primary"),))
    assert samples[called] == 1


async def test_streamed_calls_are_counted_like_the_others() -> None:
    async def chunks() -> AsyncIterator[str]:
        yield "a"
        yield "b"

    async with Deduplicator.from_url("memory://metrics-streams", metrics=False) as dedup:
        assert [c async for c in dedup.stream("t", chunks, fingerprint="x")] == ["a", "b"]
        assert [c async for c in dedup.stream("t", chunks, fingerprint="x")] == ["a", "b"]
        with pytest.raises(FingerprintMismatch):
            [c async for c in dedup.stream("t", chunks, fingerprint="y")]
        counters = dedup.counters
    assert counters["claims"] == 1
    assert counters["replays"] == 1
    assert counters["fingerprint_mismatch"] == 1
