"""The HTTP surfaces' edges: the one table from a call's failure to the client's problem, the
gateway's lifecycle (it needs a deduplicator and leaves it open), the gateway command's
deduplicator options, and the public methods the surfaces use instead of the engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from strands_dedup import (
    DedupError,
    Deduplicator,
    DuplicateInFlight,
    FingerprintMismatch,
    InvalidToken,
    LeaseLost,
    NotStored,
    PrimaryFailed,
    PrometheusMetrics,
    ResultTooLarge,
    StoreRefused,
    StoreUnavailable,
    WaitTimeout,
)
from strands_dedup.cli import main
from strands_dedup.http import Gateway, IdempotencyMiddleware

pytestmark = pytest.mark.timeout(60)


class Failing(Deduplicator):
    """A deduplicator whose every keyed call raises ``failure``: what the middleware answers
    is its table from a call's failure to the client's problem."""

    failure: Exception = RuntimeError("not set")

    def stream_events(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async def events() -> AsyncIterator[Any]:
            raise self.failure
            yield  # an async generator

        return events()


async def answer(exc: Exception, max_retry_after: int = 60) -> httpx.Response:
    """The response of the middleware to a keyed POST whose call raised ``exc``."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    async with Failing.from_url(f"memory://{uuid.uuid4().hex[:8]}", metrics=False) as dedup:
        dedup.failure = exc
        middleware = IdempotencyMiddleware(app, dedup=dedup, max_retry_after=max_retry_after)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.post("/x", headers={"Idempotency-Key": "k"}, content=b"1")


@pytest.mark.parametrize(
    ("exc", "status", "kind", "retry"),
    [
        (PrimaryFailed("x", token="t", error_type="app.Boom", error_message="secret", fence=1),
         502, "primary-failed", None),
        (NotStored("x", token="t", reason="status 500", shared=b"", fence=1),
         409, "not-retained", "1"),
        (FingerprintMismatch("x", token="t"), 422, "key-reused", None),
        (DuplicateInFlight("x", token="t", owner="o", fence=1, retry_after=7.2),
         409, "in-progress", "8"),
        (DuplicateInFlight("x", token="t", owner="o", fence=1, retry_after=500.0),
         409, "in-progress", "60"),
        (WaitTimeout("x", token="t", waited=3.0), 409, "wait-timeout", "1"),
        (StoreUnavailable("x"), 503, "store-unavailable", "1"),
        (InvalidToken("the token is empty"), 400, "key-invalid", None),
        (LeaseLost("x", token="t", fence=1), 503, "primary-lost", "1"),
    ],
)  # fmt: skip
async def test_each_failure_has_one_problem(
    exc: Exception, status: int, kind: str, retry: str | None
) -> None:
    response = await answer(exc, max_retry_after=60)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"].rsplit("/", 1)[1] == kind and problem["status"] == status
    assert response.headers.get("retry-after") == retry


async def test_a_failure_problem_names_the_class_only() -> None:
    exc = PrimaryFailed(
        "x", token="t", error_type="app.errors.Boom", error_message="card 4242 declined", fence=1
    )
    response = await answer(exc)
    assert response.status_code == 502
    assert "Boom" in response.json()["detail"] and "4242" not in response.text


async def test_a_store_refusal_is_told_without_where_redis_is() -> None:
    exc = StoreRefused("x", server_message="READONLY You can't write against 10.0.0.7:6379")
    response = await answer(exc)
    assert response.status_code == 503 and "READONLY" in response.json()["detail"]
    assert "10.0.0.7" not in response.text


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("the app's bug"),
        ResultTooLarge("x", token="t", size=2, limit=1),
        DedupError("x"),
    ],
)
async def test_a_failure_outside_the_table_is_not_answered(exc: Exception) -> None:
    """Re-raised to the server (which answers 500), not told to the client as a problem."""
    with pytest.raises(type(exc)) as raised:
        await answer(exc)
    assert raised.value is exc


def test_the_gateway_needs_a_deduplicator() -> None:
    with pytest.raises(TypeError, match="dedup"):
        Gateway("http://127.0.0.1:9")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"asyncio Deduplicator.*not str"):
        Gateway("http://127.0.0.1:9", dedup="redis://127.0.0.1:6379")  # type: ignore[arg-type]


async def _lifespan(app: Callable[..., Awaitable[None]]) -> list[str]:
    """Run the ASGI lifespan: startup, then shutdown; the messages the app sent."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for kind in ("lifespan.startup", "lifespan.shutdown"):
        inbox.put_nowait({"type": kind})
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, inbox.get, send)
    return sent


async def test_the_gateway_shutdown_leaves_its_deduplicator_open() -> None:
    async with Deduplicator.from_url("memory://", metrics=False) as dedup:
        gateway = Gateway("http://127.0.0.1:9", dedup=dedup)
        sent = await _lifespan(gateway)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        # whoever made the deduplicator still uses it (another gateway, the application)
        assert await dedup.run("after-shutdown", lambda: 7) == 7
        sent = await _lifespan(Gateway("http://127.0.0.1:9", dedup=dedup))
        assert sent[-1] == "lifespan.shutdown.complete"


def test_the_gateway_command_refuses_a_bad_deduplicator_option_before_serving() -> None:
    result = CliRunner().invoke(
        main, ["gateway", "--upstream", "http://127.0.0.1:9", "--lease-ttl", "100000"]
    )
    assert result.exit_code == 2, result.output
    assert "lease_ttl" in result.output


@pytest.mark.redis
async def test_in_use_is_true_while_a_call_runs_and_once_its_result_is_stored(
    redis_url: str, namespace: str
) -> None:
    async with Deduplicator.from_url(redis_url, namespace=namespace, metrics=False) as dedup:
        keys = dedup.token_keys("order-1", "tenant-a")
        assert not await dedup.in_use(keys)
        started, release = asyncio.Event(), asyncio.Event()

        async def call() -> int:
            started.set()
            await release.wait()
            return 1

        task = asyncio.create_task(dedup.run("order-1", call, scope="tenant-a"))
        await started.wait()
        assert await dedup.in_use(keys)  # the lease
        assert not await dedup.in_use(dedup.token_keys("order-1", "tenant-b"))
        release.set()
        assert await task == 1
        assert await dedup.in_use(keys)  # the stored result


async def test_surfaces_count_refusals_through_the_deduplicator() -> None:
    prometheus = pytest.importorskip("prometheus_client")

    registry = prometheus.CollectorRegistry()
    async with Deduplicator.from_url(
        "memory://", namespace="refusals", metrics=PrometheusMetrics(registry)
    ) as dedup:
        dedup.count_refusal("body-timeout")
        dedup.count_refusal("body-timeout")
    text = prometheus.generate_latest(registry).decode()
    line = next(
        line
        for line in text.splitlines()
        if "refusals" in line and 'reason="body-timeout"' in line and not line.startswith("#")
    )
    assert float(line.rsplit(" ", 1)[1]) == 2.0


def test_where_names_the_store_without_its_credentials() -> None:
    dedup = Deduplicator.from_url("redis://user:pw@10.0.0.7:6379/0", metrics=False)
    assert dedup.where == "redis://10.0.0.7:6379/0"
    assert dedup.loop is None  # bound by its first call
