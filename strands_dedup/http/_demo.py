"""``strands-dedup demo``: a retry storm through the gateway in front of a slow fake agent.

It starts a small fake agent service (slow, counting its executions per key), one gateway in
front of it (or, with ``--replicas N`` and a real ``--redis-url``, N gateway processes), fires
``requests`` POSTs over ``keys`` idempotency keys with ``concurrency`` at a time, spread over the
gateways, and reports: requests sent, upstream executions (which must equal the number of keys),
how many responses were replays or waits, and latency percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DemoReport", "FakeAgent", "gateway_command", "run_demo"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FakeAgent:
    """A slow agent service: a POST answers after ``work`` seconds (five times that under
    ``/slow``) and counts each execution per Idempotency-Key; ``GET /executions`` returns them."""

    def __init__(self, work: float) -> None:
        self.work = work
        self.executions: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers", []))
        key = headers.get(b"idempotency-key", b"").decode("latin-1")
        if scope["method"] == "GET" and scope["path"] == "/executions":
            body = json.dumps(self.executions).encode()
        else:
            while (await receive()).get("more_body", False):
                pass
            self.executions[key] = self.executions.get(key, 0) + 1
            await asyncio.sleep(self.work * (5 if scope["path"].startswith("/slow") else 1))
            body = json.dumps({"key": key, "answer": f"the agent's answer for {key}"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass
class DemoReport:
    requests: int
    keys: int
    replicas: int
    executions: int
    statuses: dict[int, int]
    replayed: int
    latencies_ms: list[float] = field(repr=False)
    elapsed_s: float
    redis_url: str

    @property
    def ok(self) -> bool:
        return self.executions == self.keys and set(self.statuses) == {200}

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return 0.0
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def gateway_command(
    upstream: str, redis_url: str, namespace: str, port: int, *extra: str
) -> list[str]:
    """The command line of one `strands-dedup gateway` replica (used by the demo)."""
    return [
        sys.executable,
        "-m",
        "strands_dedup.cli",
        "gateway",
        "--upstream",
        upstream,
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--port",
        str(port),
        *extra,
    ]


async def _serve(app: Any, port: int) -> tuple[Any, asyncio.Task[None]]:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="error")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"server on port {port} did not start")
        await asyncio.sleep(0.01)
    return server, task


async def _wait_healthy(url: str, deadline: float) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway at {url} did not become healthy")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _gateways(
    redis_url: str, replicas: int, upstream: str, namespace: str
) -> AsyncIterator[list[str]]:
    """In-process gateway (memory:// or one replica), or N gateway processes on a real Redis."""
    from .._engine.deduplicator import Deduplicator
    from ._gateway import Gateway

    if replicas == 1:
        port = free_port()
        dedup = Deduplicator.from_url(redis_url, namespace=namespace, metrics=False)
        try:
            server, task = await _serve(Gateway(upstream, dedup=dedup), port)
            try:
                yield [f"http://127.0.0.1:{port}"]
            finally:
                server.should_exit = True
                await task
        finally:
            await dedup.aclose()
        return
    ports = [free_port() for _ in range(replicas)]
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - starting a child is brief; it runs on its own
            gateway_command(upstream, redis_url, namespace, port),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 20
        await asyncio.gather(*(_wait_healthy(url, deadline) for url in urls))
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run_demo(
    *,
    redis_url: str = "memory://",
    requests: int = 150,
    keys: int = 10,
    concurrency: int = 50,
    replicas: int = 1,
    work: float = 0.5,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DemoReport:
    """Run the storm and return what happened (see the module docstring)."""
    import httpx

    if replicas > 1 and redis_url.startswith("memory://"):
        raise ValueError("--replicas above 1 needs a shared --redis-url (memory:// is in-process)")
    agent = FakeAgent(work)
    agent_port = free_port()
    agent_server, agent_task = await _serve(agent, agent_port)
    upstream = f"http://127.0.0.1:{agent_port}"
    run_id = f"{os.getpid()}-{time.time_ns()}"
    order = [i % keys for i in range(requests)]
    random.Random(seed).shuffle(order)
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    replayed = 0
    done = 0
    try:
        async with _gateways(redis_url, replicas, upstream, "strands-dedup-demo") as urls:
            limits = httpx.Limits(max_connections=concurrency)
            async with httpx.AsyncClient(limits=limits, timeout=120) as client:
                gate = asyncio.Semaphore(concurrency)
                started = time.perf_counter()

                async def one(i: int, key_index: int) -> None:
                    nonlocal replayed, done
                    url = urls[i % len(urls)] + "/invoke"
                    key = f"demo-{run_id}-{key_index}"
                    async with gate:
                        t0 = time.perf_counter()
                        response = await client.post(
                            url,
                            json={"prompt": f"question {key_index}"},
                            headers={"Idempotency-Key": key},
                        )
                        latencies.append((time.perf_counter() - t0) * 1000)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.headers.get("idempotent-replayed") == "true":
                        replayed += 1
                    done += 1
                    if progress is not None:
                        progress(done, requests)

                await asyncio.gather(*(one(i, k) for i, k in enumerate(order)))
                elapsed = time.perf_counter() - started
        executions = sum(
            count for key, count in agent.executions.items() if key.startswith(f"demo-{run_id}-")
        )
    finally:
        agent_server.should_exit = True
        await agent_task
    return DemoReport(
        requests=requests,
        keys=keys,
        replicas=replicas,
        executions=executions,
        statuses=statuses,
        replayed=replayed,
        latencies_ms=latencies,
        elapsed_s=elapsed,
        redis_url=redis_url,
    )
