"""Counters, Prometheus metrics, health, logs and spans change as calls happen."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from servers import free_port

from strands_dedup import (
    Deduplicator,
    FingerprintMismatch,
    PrometheusMetrics,
    Role,
    StoreUnavailable,
    SyncDeduplicator,
)
from strands_dedup.cli import Inspector

pytestmark = pytest.mark.timeout(30)


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


async def test_counters_and_prometheus_metrics(backend_url: str, namespace: str) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)

    def sample(name: str, **labels: str) -> float:
        value = registry.get_sample_value(name, {"namespace": namespace, **labels})
        return 0.0 if value is None else value

    async with Deduplicator.from_url(
        backend_url, namespace=namespace, metrics=metrics, lease_ttl=2
    ) as dedup:
        release = asyncio.Event()

        async def call() -> str:
            await release.wait()
            return "v"

        primary = asyncio.create_task(dedup.execute("t", call, fingerprint="a"))
        await until(lambda: sample("strands_dedup_in_flight") == 1)
        dup = asyncio.create_task(dedup.execute("t", call, fingerprint="a"))
        await until(lambda: dedup.activity().listening == 1)
        assert sample("strands_dedup_waiters") == 1
        with pytest.raises(FingerprintMismatch):
            await dedup.execute("t", call, fingerprint="b")
        release.set()
        await asyncio.gather(primary, dup)
        assert (await dedup.execute("t", call, fingerprint="a")).role is Role.REPLAY
        with pytest.raises(ZeroDivisionError):
            await dedup.execute("u", lambda: 1 / 0)

        expected = {"claims": 2, "waits": 1, "replays": 1, "fingerprint_mismatch": 1}
        assert {k: dedup.counters[k] for k in expected} == expected
        assert dedup.counters["failures"] == 1 and dedup.counters["takeovers"] == 0
        for name, value in expected.items():
            assert sample(f"strands_dedup_{name}_total") == value
        assert sample("strands_dedup_call_duration_seconds_count", role="primary") == 1
        assert sample("strands_dedup_wait_duration_seconds_count") == 1
        assert sample("strands_dedup_in_flight") == 0 and sample("strands_dedup_waiters") == 0


async def test_counters_are_published_for_the_fleet(redis_url: str, namespace: str) -> None:
    async with (
        Deduplicator.from_url(redis_url, namespace=namespace, stats_interval=0.05) as a,
        Deduplicator.from_url(redis_url, namespace=namespace, stats_interval=0.05) as b,
        Inspector.from_url(redis_url, namespace=namespace) as inspector,
    ):
        await a.execute("x", lambda: 1)
        await b.execute("x", lambda: 2)
        await b.execute("y", lambda: 3)
        deadline = time.monotonic() + 5
        while (await inspector.counters()).get("claims") != 2:
            assert time.monotonic() < deadline, await inspector.counters()
            await asyncio.sleep(0.02)
        counts = await inspector.counters()
        assert counts["replays"] == 1


async def test_health_reports_store_and_local_load(redis_url: str, namespace: str) -> None:
    async with Deduplicator.from_url(redis_url, namespace=namespace) as dedup:
        health = await dedup.health()
        assert health.ok and health.store_reachable and health.error is None
        assert health.in_flight == 0 and health.waiters == 0
        assert health.store_latency_ms is not None and health.store_latency_ms >= 0
        release = asyncio.Event()
        task = asyncio.create_task(dedup.execute("t", release.wait))
        await until(lambda: dedup.activity().in_flight == 1)
        assert (await dedup.health()).in_flight == 1
        release.set()
        await task
    closed = f"redis://127.0.0.1:{free_port()}/0"
    async with Deduplicator.from_url(closed, namespace=namespace) as dead:
        started = time.monotonic()
        health = await dead.health()
        assert not health.ok and not health.store_reachable and health.error
        assert time.monotonic() - started < 6
        with pytest.raises(StoreUnavailable):
            await dead.execute("t", lambda: 1)
        assert dead.counters["store_errors"] == 1


def test_sync_facade_health_and_counters(backend_url: str, namespace: str) -> None:
    with SyncDeduplicator.from_url(backend_url, namespace=namespace) as dedup:
        dedup.execute("t", lambda: 1)
        assert dedup.health().ok
        assert dedup.counters["claims"] == 1


async def test_outcomes_are_logged_with_fields(
    backend_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Deduplicator.from_url(backend_url, namespace=namespace) as dedup:
        with caplog.at_level(logging.DEBUG, logger="strands_dedup"):
            await dedup.execute("secret-token", lambda: 1)
            await dedup.execute("secret-token", lambda: 1)
    records = [r for r in caplog.records if getattr(r, "role", None)]
    assert [r.role for r in records] == ["primary", "replay"]  # type: ignore[attr-defined]
    assert all(r.fence == records[0].fence for r in records)  # type: ignore[attr-defined]
    assert all(len(r.token_digest) == 12 for r in records)  # type: ignore[attr-defined]
    assert not any("secret-token" in r.getMessage() for r in caplog.records)


def test_quiet_by_default() -> None:
    logger = logging.getLogger("strands_dedup")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)


SPANS = """
import asyncio, json, sys
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from strands_dedup import Deduplicator

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

async def main():
    async with Deduplicator.from_url(sys.argv[1], namespace=sys.argv[2]) as dedup:
        await dedup.execute("t", lambda: 1)
        await dedup.execute("t", lambda: 1)

asyncio.run(main())
print(json.dumps([[s.name, dict(s.attributes)] for s in exporter.get_finished_spans()]))
"""


async def test_a_span_per_call(backend_url: str, namespace: str) -> None:
    """A process whose OpenTelemetry tracer provider is configured gets one span per call."""
    import json
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SPANS, backend_url, namespace, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 25)
    assert proc.returncode == 0
    spans = json.loads(out)
    assert [name for name, _ in spans] == ["strands_dedup.call"] * 2
    assert [attributes["strands_dedup.role"] for _, attributes in spans] == ["primary", "replay"]
    assert len({attributes["strands_dedup.fence"] for _, attributes in spans}) == 1


async def test_no_span_work_without_a_configured_tracer_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a tracer provider was configured globally in this process")
    started: list[str] = []

    def start(self: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(name)
        raise AssertionError("a span was started with no tracer provider configured")

    monkeypatch.setattr(trace.ProxyTracer, "start_span", start)
    monkeypatch.setattr(trace.ProxyTracer, "start_as_current_span", start)
    async with Deduplicator.from_url("memory://no-spans", metrics=False) as dedup:
        assert (await dedup.execute("t", lambda: 1)).value == 1
        assert (await dedup.execute("t", lambda: 1)).value == 1
    assert started == []
