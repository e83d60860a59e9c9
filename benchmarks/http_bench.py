"""The HTTP scenario: servers in their own processes, a client in this one.

    python -m benchmarks.http_bench serve KIND PORT REDIS_URL NAMESPACE [UPSTREAM]

KIND is ``app`` (a trivial ASGI app), ``strands-dedup`` (the app behind strands-dedup's
middleware), ``idemkit`` (the app behind idemkit's ASGI middleware) or ``gateway``
(strands-dedup's gateway in front of UPSTREAM). The app answers ``POST /call`` at once and
``POST /slow`` after 0.2 s, counting executions of ``/slow`` in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
REPLICAS = 3


def make_app(url: str, namespace: str) -> Any:
    import redis.asyncio as aredis

    side = aredis.Redis.from_url(url)
    body = json.dumps({"ok": True}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await side.incr(f"{namespace}:executions")
            await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(kind: str, port: int, url: str, namespace: str, upstream: str | None) -> None:
    import uvicorn

    if kind == "app":
        app = make_app(url, namespace)
    elif kind == "strands-dedup":
        from strands_dedup import Deduplicator
        from strands_dedup.http import IdempotencyMiddleware

        dedup = Deduplicator.from_url(url, namespace=namespace, lease_ttl=2, metrics=False)
        app = IdempotencyMiddleware(make_app(url, namespace), dedup=dedup)
    elif kind == "idemkit":
        from idemkit import HttpConfig, IdempotencyMiddleware, RedisBackend

        backend = RedisBackend.from_url(url, namespace=namespace)
        config = HttpConfig(scope_mode="single_tenant", lease_ttl_seconds=2)
        app = IdempotencyMiddleware(make_app(url, namespace), backend=backend, config=config)
    elif kind == "gateway":
        from strands_dedup import Deduplicator
        from strands_dedup.http import Gateway

        assert upstream is not None
        dedup = Deduplicator.from_url(url, namespace=namespace, lease_ttl=2, metrics=False)
        app = Gateway(upstream, dedup=dedup)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Servers:
    """Server processes, all stopped on exit."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url, self.namespace = url, namespace
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, kind: str, upstream: str | None = None) -> str:
        port = free_port()
        args = [
            "serve",
            kind,
            str(port),
            self.url,
            self.namespace,
            *([upstream] if upstream else []),
        ]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.http_bench", *args, cwd=ROOT
        )
        self.procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    await client.post(base + "/call")
                    return base
                if proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": ordered[len(ordered) // 2] * 1e3,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3,
        "n": len(ordered),
    }


async def sequential(base: str, requests: int, keyed: bool) -> dict[str, float]:
    samples = []
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(requests + 50):
            headers = {"Idempotency-Key": uuid.uuid4().hex} if keyed else {}
            started = time.perf_counter()
            response = await client.post(base + "/call", headers=headers, content=b"{}")
            elapsed = time.perf_counter() - started
            assert response.status_code == 200, response.text
            if i >= 50:
                samples.append(elapsed)
    return _stats(samples)


async def storm(bases: list[str], n: int, url: str, namespace: str) -> dict[str, Any]:
    import redis.asyncio as aredis

    side = aredis.Redis.from_url(url)
    await side.delete(f"{namespace}:executions")
    key = uuid.uuid4().hex
    statuses: Counter[int] = Counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        started = time.perf_counter()

        async def one(i: int) -> None:
            response = await client.post(
                bases[i % len(bases)] + "/slow", headers={"Idempotency-Key": key}, content=b"{}"
            )
            statuses[response.status_code] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - started
    executions = int(await side.get(f"{namespace}:executions") or 0)
    await side.aclose()
    return {
        "requests": n,
        "replicas": len(bases),
        "executions": executions,
        "statuses": dict(statuses),
        "all_done_s": elapsed,
    }


async def run_http(url: str, requests: int, storm_n: int) -> dict[str, Any]:
    namespace = f"bench-http-{uuid.uuid4().hex[:8]}"
    servers = Servers(url, namespace)
    out: dict[str, Any] = {"latency": {}, "storm": {}}
    try:
        app = await servers.start("app")
        targets = {
            "app alone": (app, False),
            "strands-dedup middleware": (await servers.start("strands-dedup"), True),
            "idemkit middleware": (await servers.start("idemkit"), True),
            "strands-dedup gateway (proxy)": (await servers.start("gateway", app), True),
        }
        for name, (base, keyed) in targets.items():
            out["latency"][name] = await sequential(base, requests, keyed)
        floor = out["latency"]["app alone"]["median"]
        for row in out["latency"].values():
            row["overhead_ms"] = row["median"] - floor
        for kind in ("strands-dedup", "idemkit", "gateway"):
            bases = [
                await servers.start(kind, app if kind == "gateway" else None)
                for _ in range(REPLICAS)
            ]
            out["storm"][kind] = await storm(bases, storm_n, url, namespace)
    finally:
        await servers.stop()
    return out


if __name__ == "__main__":
    if sys.argv[1] != "serve":
        raise SystemExit(__doc__)
    serve(
        sys.argv[2],
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
        sys.argv[6] if len(sys.argv) > 6 else None,
    )
