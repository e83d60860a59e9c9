"""The gateway: three replicas on one real Redis in front of a real upstream process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from servers import fake_agent_command, free_port, gateway_command, process, processes
from timing import SLACK

from strands_dedup.cli import Inspector, main

pytestmark = [pytest.mark.redis, pytest.mark.slow]
HERE = Path(__file__).parent


@pytest.fixture
def upstream() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(fake_agent_command(port, 1.0), url + "/executions"):
        yield url


@pytest.fixture
def gateways(
    upstream: str, redis_url: str, namespace: str
) -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    commands = []
    for _ in range(3):
        port = free_port()
        args = gateway_command(upstream, redis_url, namespace, port, "--lease-ttl", "1")
        commands.append((args, f"http://127.0.0.1:{port}/healthz"))
    with processes(commands) as started:  # started together, not one after another
        urls = [ready.removesuffix("/healthz") for _, ready in commands]
        yield list(zip(urls, started, strict=True))


async def _storm(urls: list[str], keys: list[str]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
        return await asyncio.gather(
            *(
                client.post(
                    urls[i % len(urls)] + "/invoke",
                    json={"q": key},
                    headers={"Idempotency-Key": key},
                )
                for i, key in enumerate(keys)
            )
        )


@pytest.mark.timeout(90)
def test_storm_over_three_replicas_runs_each_key_once(
    gateways: list[tuple[str, subprocess.Popen[bytes]]], upstream: str
) -> None:
    urls = [url for url, _ in gateways]
    one_key = asyncio.run(_storm(urls, ["storm-one"] * 150))
    assert {r.status_code for r in one_key} == {200}
    assert len({r.content for r in one_key}) == 1
    counts = httpx.get(upstream + "/executions").json()
    assert counts["storm-one"] == 1
    many = asyncio.run(_storm(urls, [f"storm-{i % 20}" for i in range(200)]))
    assert {r.status_code for r in many} == {200}
    counts = httpx.get(upstream + "/executions").json()
    assert [counts[f"storm-{i}"] for i in range(20)] == [1] * 20
    ready = httpx.get(urls[0] + "/readyz").json()
    assert ready["status"] == "ready" and ready["in_flight"] == 0


@pytest.mark.timeout(90)
def test_killed_replica_is_taken_over_by_another(
    gateways: list[tuple[str, subprocess.Popen[bytes]]],
    upstream: str,
    redis_url: str,
    namespace: str,
) -> None:
    urls = [url for url, _ in gateways]

    async def scenario() -> httpx.Response:
        async with (
            httpx.AsyncClient(timeout=60) as client,
            Inspector.from_url(redis_url, namespace=namespace) as inspector,
        ):
            first = asyncio.create_task(
                client.post(urls[0] + "/invoke", json={}, headers={"Idempotency-Key": "crash"})
            )
            deadline = time.monotonic() + 10
            while (lease := await inspector.lease("crash", "anon")) is None:
                assert time.monotonic() < deadline, "the first replica never claimed the key"
                await asyncio.sleep(0.01)
            while (await client.get(upstream + "/executions")).json().get("crash") != 1:
                assert time.monotonic() < deadline, "the upstream never saw the first request"
                await asyncio.sleep(0.01)
            holder = next(p for _, p in gateways if p.pid == lease.pid)
            os.kill(holder.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            survivor = next(url for url, p in gateways if p is not holder)
            response = await client.post(
                survivor + "/invoke", json={}, headers={"Idempotency-Key": "crash"}
            )
            # lease 1 s + renew period + grace, plus the upstream's own 1 s of work
            assert time.monotonic() - killed_at < 1 + 1 / 3 + 0.5 + 1.0 + 1.0 + SLACK
            with contextlib.suppress(httpx.HTTPError):
                await first
            return response

    response = asyncio.run(scenario())
    assert response.status_code == 200
    assert response.json()["key"] == "crash"
    # the killed replica's upstream call had started: a crash mid-call runs it again (the
    # README's "what can still run twice"); the takeover's response is the one returned
    assert httpx.get(upstream + "/executions").json()["crash"] == 2


@pytest.mark.timeout(60)
def test_demo_on_the_embedded_default() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "strands_dedup.cli",
            "demo",
            "--requests",
            "60",
            "--keys",
            "6",
            "--work",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "requests sent" in out and "60" in out
    assert "upstream executions" in out


def parse_size(text: str) -> int:
    """What `strands-dedup gateway --max-stored-body TEXT` reads TEXT as: a size above what
    the store can hold is refused with the bytes it read."""
    result = CliRunner().invoke(
        main, ["gateway", "--upstream", "http://127.0.0.1:9", "--max-stored-body", text]
    )
    assert result.exit_code == 2
    found = re.search(
        r"--max-stored-body: (\d+) bytes is more than the store can hold", result.output
    )
    assert found is not None, result.output
    return int(found[1])


def test_sizes_parse() -> None:
    assert parse_size("20MB") == 20_000_000
    assert parse_size("16384KiB") == 16_777_216
    assert parse_size("13000000") == 13_000_000
    refused = CliRunner().invoke(
        main, ["gateway", "--upstream", "http://127.0.0.1:9", "--max-body", "ten"]
    )
    assert refused.exit_code == 2 and "not a size: 'ten'" in refused.output


@pytest.mark.timeout(90)
def test_sigterm_releases_what_it_cannot_finish(
    upstream: str, redis_url: str, namespace: str
) -> None:
    """A replica told to stop lets requests finish for --shutdown-timeout, then releases the rest:
    a duplicate waiting on another replica takes over long before the 30 s lease would expire."""
    with contextlib.ExitStack() as stack:
        urls, procs = [], []
        for _ in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            args = gateway_command(
                upstream + "/slow",
                redis_url,
                namespace,
                port,
                "--lease-ttl",
                "30",
                "--shutdown-timeout",
                "1",
            )
            procs.append(stack.enter_context(process(args, url + "/healthz")))
            urls.append(url)

        async def scenario() -> tuple[httpx.Response, float]:
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(
                    client.post(urls[0] + "/invoke", headers={"Idempotency-Key": "term"})
                )
                deadline = time.monotonic() + 10
                while (await client.get(upstream + "/executions")).json().get("term") != 1:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                dup = asyncio.create_task(
                    client.post(urls[1] + "/invoke", headers={"Idempotency-Key": "term"})
                )
                await asyncio.sleep(0.2)  # let the duplicate reach the second replica
                procs[0].send_signal(signal.SIGTERM)
                stopped = time.monotonic()
                response = await dup
                with contextlib.suppress(httpx.HTTPError):
                    await first
                return response, time.monotonic() - stopped

        response, elapsed = asyncio.run(scenario())
        assert response.status_code == 200
        # the 1 s shutdown timeout plus the takeover's own 5 s upstream call, not the 30 s lease
        assert elapsed < 15
        assert procs[0].wait(timeout=15) is not None
