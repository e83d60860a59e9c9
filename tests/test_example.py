"""examples/fastapi_agent.py, run as two uvicorn replicas on a real Redis with an offline model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


@pytest.fixture
def replicas(redis_url: str, namespace: str) -> Iterator[list[str]]:
    env = {
        **os.environ,
        "STRANDS_DEDUP_REDIS_URL": redis_url,
        "STRANDS_DEDUP_NAMESPACE": namespace,
        "EXAMPLE_MODEL": "fake_model:pid_model",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    procs: list[subprocess.Popen[bytes]] = []
    urls = []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "examples.fastapi_agent:app",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                    ],
                    cwd=ROOT,
                    env=env,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for url in urls:
            while True:
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"{url} did not become ready"
                time.sleep(0.05)
        yield urls
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_retried_request_runs_the_agent_once_across_replicas(
    replicas: list[str],
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:

        async def send(url: str, key: str, text: str = "hello") -> httpx.Response:
            return await client.post(
                f"{url}/sessions/s-42/messages",
                json={"text": text},
                headers={"Idempotency-Key": key},
            )

        first, second = await asyncio.gather(send(replicas[0], "req-1"), send(replicas[1], "req-1"))
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert first.json() == second.json()
        assert first.json()["reply"].startswith("answered by pid")
        again = await send(replicas[1], "req-1")
        assert again.json() == first.json()

        reused = await send(replicas[0], "req-1", text="something else")
        assert reused.status_code == 422

        # a redelivered webhook message: its message_id is the token
        body = {"text": "hi", "message_id": "m-1"}
        a, b = await asyncio.gather(
            client.post(f"{replicas[0]}/sessions/s-43/messages", json=body),
            client.post(f"{replicas[1]}/sessions/s-43/messages", json=body),
        )
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
