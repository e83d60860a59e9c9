"""The retry-safe HTTP gateway: a reverse proxy with `IdempotencyMiddleware` in front of it.

``strands-dedup gateway --upstream http://agent:8080`` makes any HTTP agent backend retry-safe
without touching its code, and runs as many replicas as needed against one Redis:

- ``GET /healthz``: the process is alive. ``GET /readyz``: Redis reachable (JSON with in-flight
  and waiting counts; 503 when not). ``GET /metrics``: Prometheus metrics, when
  prometheus-client is installed. Everything else goes through the middleware to the upstream.
- One pooled `httpx.AsyncClient` with timeouts calls the upstream. An unreachable upstream is a
  502, a timeout a 504, both ``application/problem+json`` and never retained.
- On SIGTERM uvicorn stops accepting connections and lets requests in flight finish for up to
  ``shutdown_timeout`` seconds; primaries still running then are cancelled, which releases their
  tokens, so a duplicate waiting on another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .asgi import IdempotencyMiddleware, problem, strip_hop_by_hop
from .core import Deduplicator

__all__ = ["Gateway", "parse_size", "run_gateway"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
}


def parse_size(text: str) -> int:
    """``"10MB"`` -> 10_000_000, ``"512KiB"`` -> 524_288, ``"2048"`` -> 2048."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    if not number or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 2048, 512KiB, 10MB)")
    value = float(number) * _UNITS[unit]
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


async def _json(send: Send, status: int, payload: Any, content_type: bytes) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The gateway's ASGI app: its own endpoints, then the middleware, then the proxy."""

    def __init__(
        self,
        upstream: str,
        dedup: Deduplicator,
        *,
        upstream_timeout: float = 60.0,
        max_upstream_connections: int = 100,
        **middleware_options: Any,
    ) -> None:
        if not upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http:// or https:// URL, not {upstream!r}")
        self.upstream = upstream.rstrip("/")
        self.dedup = dedup
        self.upstream_timeout = upstream_timeout
        self.max_upstream_connections = max_upstream_connections
        self.middleware = IdempotencyMiddleware(self.proxy, dedup=dedup, **middleware_options)
        self._client: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not proxied; the server closes the connection
        path = scope.get("path", "")
        if scope.get("method") == "GET" and path in ("/healthz", "/readyz", "/metrics"):
            await self._own(path, send)
            return
        await self.dedup._observer.timed(self.middleware, scope, receive, send)

    async def _own(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await _json(send, 200, {"status": "alive"}, b"application/json")
        elif path == "/readyz":
            health = await self.dedup.health()
            status = 200 if health.store_reachable else 503
            payload = {"status": "ready" if status == 200 else "unready", **health.to_json()}
            await _json(send, status, payload, b"application/json")
        else:
            try:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            except ImportError:
                await problem(
                    send,
                    404,
                    "metrics-unavailable",
                    "Metrics unavailable",
                    "install strands-dedup[metrics] to expose Prometheus metrics",
                )
                return
            body = generate_latest()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def start(self) -> None:
        import httpx

        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.upstream_timeout, connect=min(10.0, self.upstream_timeout)),
            limits=httpx.Limits(max_connections=self.max_upstream_connections),
            follow_redirects=False,
        )

    async def stop(self) -> None:
        """Release what is still running (waiters elsewhere take over), then close."""
        cancel = getattr(self.middleware, "cancel_primaries", None)
        if cancel is not None:
            await cancel()
        if self._client is not None:
            await self._client.aclose()
        await self.dedup.aclose()

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request to the upstream and stream its response back."""
        import httpx

        if self._client is None:
            await self.start()
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        target = self.upstream + scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [h for h in strip_hop_by_hop(scope.get("headers", [])) if h[0].lower() != b"host"]
        client_addr = scope.get("client")
        if client_addr:
            headers.append((b"x-forwarded-for", str(client_addr[0]).encode()))
        headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
        request = self._client.build_request(
            scope["method"], target, headers=headers, content=b"".join(chunks)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            await problem(
                send, 504, "upstream-timeout", "Upstream timed out", str(exc) or "timeout"
            )
            return
        except httpx.HTTPError as exc:
            await problem(send, 502, "upstream-unreachable", "Upstream unreachable", str(exc))
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": strip_hop_by_hop(response.headers.raw),
                }
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def run_gateway(
    *,
    upstream: str,
    redis_url: str,
    host: str,
    port: int,
    namespace: str,
    lease_ttl: float,
    result_ttl: float,
    shutdown_timeout: float,
    upstream_timeout: float,
    log_level: str = "warning",
    **middleware_options: Any,
) -> None:
    """Serve a `Gateway` with uvicorn until SIGTERM/SIGINT (blocking)."""
    import uvicorn

    dedup = Deduplicator.from_url(
        redis_url, namespace=namespace, lease_ttl=lease_ttl, result_ttl=result_ttl
    )
    app = Gateway(upstream, dedup, upstream_timeout=upstream_timeout, **middleware_options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        timeout_graceful_shutdown=int(max(1, shutdown_timeout)),
        log_level=log_level,
    )
    asyncio.run(uvicorn.Server(config).serve())
