"""The retry-safe HTTP gateway: a reverse proxy with `IdempotencyMiddleware` in front of it.

``strands-dedup gateway --upstream http://agent:8080`` makes any HTTP agent backend retry-safe
without touching its code, and runs as many replicas as needed against one Redis:

- ``GET /healthz``: the process is alive. ``GET /readyz``: Redis reachable (JSON with in-flight
  and waiting counts; 503 when not). ``GET /metrics``: Prometheus metrics, when
  prometheus-client is installed. Everything else goes through the middleware to the upstream.
- One pooled `httpx.AsyncClient` with timeouts calls the upstream. It keeps no cookies (its jar
  cannot store one) and sends a request's own headers only, without hop-by-hop, ``Host`` or
  forwarding headers, plus ``X-Forwarded-For``/``-Proto`` of its own and the body's framing:
  nothing of one client reaches another's request. ``CONNECT`` and ``TRACE`` are refused (405).
  An unreachable upstream is a 502, a timeout a 504, both ``application/problem+json`` and
  never retained.
- On SIGTERM uvicorn stops accepting connections and lets requests in flight finish for up to
  ``shutdown_timeout`` seconds; primaries still running then are cancelled, which releases their
  tokens, so a duplicate waiting on another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.cookiejar
import ipaddress
import json
import logging
import logging.config
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote

from .._config import DedupConfig
from .._engine.deduplicator import Deduplicator
from .._protocol import LeaveClaimed
from ._asgi import Receive, Scope, Send, problem, read_body, reject, send_json
from ._middleware import KEYED, IdempotencyMiddleware
from ._policy import (
    GatewayConfig,
    Rejected,
    check_method,
    is_forwarding_header,
    public_health,
    relay_headers,
    retry_after,
    split_upstream,
    strip_hop_by_hop,
    upstream_target,
)

__all__ = [
    "Gateway",
    "GatewayConfig",
    "UpstreamBroken",
    "configure_logging",
    "parse_size",
    "parse_trusted_proxies",
    "run_gateway",
]

log = logging.getLogger("strands_dedup.http")
UNKEYED_DIGEST_WARNING = (
    "no identity secret is configured: credentials are digested with a public key "
    "(set --identity-secret-file or STRANDS_DEDUP_IDENTITY_SECRET)"
)
_TARGET = "strands_dedup.upstream_target"  # scope key: the checked upstream path and query
_NOT_FORWARDED = frozenset({b"host", b"content-length"})  # and `is_forwarding_header`
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


class Gateway:
    """The gateway's ASGI app: its own endpoints, then the middleware, then the proxy.

    Options: `GatewayConfig` (or its fields as keywords). The upstream's scheme, host, port and
    base path come from ``upstream`` only; a request contributes a normalized path below the
    base and its query (`upstream_target`), and every other target is a 400.

    ``dedup`` stays its creator's: the gateway's shutdown (`stop`) does not close it.
    """

    def __init__(
        self,
        upstream: str | None = None,
        *,
        dedup: Deduplicator,
        config: GatewayConfig | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(dedup, Deduplicator):
            raise TypeError(
                f"Gateway needs an asyncio Deduplicator (dedup=), not {type(dedup).__name__}"
            )
        if config is None:
            if upstream is None:
                raise TypeError("Gateway needs an upstream URL (or config=)")
            config = GatewayConfig(upstream=upstream, **options)
        elif upstream is not None or options:
            raise TypeError("give config= or the upstream and keyword options, not both")
        self.config = config
        self.dedup = dedup
        scheme, host, port, self._base = split_upstream(config.upstream)
        self._origin = f"{scheme}://{host if ':' not in host else f'[{host}]'}" + (
            f":{port}" if port is not None else ""
        )
        self.middleware = IdempotencyMiddleware(self.proxy, dedup=dedup, config=config)
        self._client: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not proxied; the server closes the connection
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("latin-1")
        if scope.get("method") == "GET" and raw_path in (b"/healthz", b"/readyz", b"/metrics"):
            await self._own(raw_path.decode(), send)
            return
        try:
            target = self._target(scope)
        except Rejected as rejected:
            await reject(send, rejected)
            return
        scope = dict(scope)
        path = target.split("?", 1)[0]
        scope["raw_path"] = path.encode("ascii")  # the fingerprint sees the normalized path
        scope["path"] = unquote(path)
        scope[_TARGET] = target
        await self.dedup.observe_request(self.middleware, scope, receive, send)

    def _target(self, scope: Scope) -> str:
        """The upstream path and query for this request; `Rejected` (400) if it is not safe,
        (405) for a method never proxied."""
        check_method(scope.get("method", ""))
        raw_path = scope.get("raw_path") or scope.get("path", "").encode("latin-1")
        return upstream_target(raw_path, scope.get("query_string", b""), self._base)

    async def _own(self, path: str, send: Send) -> None:
        if path == "/healthz":
            await send_json(send, 200, {"status": "alive"})
        elif path == "/readyz":
            health = await self.dedup.health()
            status = 200 if health.store_reachable and health.store_writable else 503
            if status != 200:
                log.warning("/readyz: unready: %s", health.error)
            payload = {
                "status": "ready" if status == 200 else "unready",
                **public_health(health.to_json(), self.dedup.where),
                "identity_secret": self.config.identity_secret is not None,
            }
            if self.config.identity_secret is None:
                payload["warnings"].append(UNKEYED_DIGEST_WARNING)
            await send_json(send, status, payload)
        else:
            try:
                from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
            except ImportError:
                await problem(
                    send,
                    404,
                    "metrics-unavailable",
                    "Metrics unavailable",
                    "install strands-dedup[http] (it brings prometheus-client) to expose metrics",
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

        timeout = self.config.upstream_timeout
        client = httpx.AsyncClient(
            base_url=self._origin,
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            limits=httpx.Limits(max_connections=self.config.max_upstream_connections),
            follow_redirects=False,
            trust_env=False,
            cookies=_NoCookies(),  # httpx.Cookies(jar) would copy it into a plain jar
        )
        for name in list(client.headers):  # httpx's defaults: Accept, Accept-Encoding, ...
            del client.headers[name]
        self._client = client

    async def stop(self) -> None:
        """Release what is still running (waiters elsewhere take over), then close the upstream
        client. The deduplicator is left open: whoever made it closes it."""
        await self.middleware.cancel_primaries()
        if self._client is not None:
            await self._client.aclose()

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward one request to the upstream and stream its response back."""
        import httpx

        if self._client is None:
            await self.start()
        try:
            # the target the gateway checked, or (proxy mounted on its own) checked here
            target = scope.get(_TARGET) or self._target(scope)
            body = await read_body(
                receive,
                scope.get("headers", []),
                self.config.max_request_body,
                None if scope.get(KEYED) else self.config.body_timeout,  # keyed: read already
            )
        except Rejected as rejected:
            if rejected.status == 408:
                self.dedup.count_refusal("body-timeout")
            await reject(send, rejected)
            return
        if body is None:
            return
        url = self._client.base_url.copy_with(raw_path=target.encode("ascii"))
        request = self._client.build_request(
            scope["method"], url, headers=_forwarded(scope), content=body
        )
        try:
            response = await self._client.send(request, stream=True)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            await problem(
                send,
                504,
                "upstream-timeout",
                "Upstream timed out",
                f"the upstream could not be reached in time ({type(exc).__name__}); "
                "it did not receive the request",
            )
            return
        except httpx.TimeoutException as exc:
            seconds = self.dedup.config.lease_ttl
            await problem(
                send,
                504,
                "upstream-timeout",
                "Upstream timed out",
                f"the upstream did not answer within {self.config.upstream_timeout:g}s and may "
                f"still be running this request; its key stays reserved for up to {seconds:g}s, "
                "then a retry runs it again",
                [(b"retry-after", retry_after(seconds, max(1, int(seconds) + 1)))],
            )
            if scope.get(KEYED):
                raise LeaveClaimed(f"upstream timed out ({type(exc).__name__})") from exc
            return
        except httpx.HTTPError as exc:
            await problem(
                send,
                502,
                "upstream-unreachable",
                "Upstream unreachable",
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
            )
            return
        # A keyed primary's response is read to its end whatever its client does (it is stored
        # for the retry); any other stops when its client is gone (left, or cut off for not
        # reading), which closes the upstream connection instead of draining it.
        gone = None if scope.get(KEYED) else asyncio.ensure_future(receive())
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": relay_headers(response.headers.raw),
                }
            )
            async for chunk in response.aiter_raw():
                if gone is not None and gone.done():
                    return
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            # The upstream broke off its response: never end it as if it were whole.
            raise UpstreamBroken(f"the upstream's response broke off: {exc!r}") from exc
        finally:
            if gone is not None:
                gone.cancel()
            await response.aclose()


class UpstreamBroken(Exception):
    """The upstream's response ended early: the client's connection is aborted, not ended."""


class _NoCookies(http.cookiejar.CookieJar):
    """The upstream client's cookie jar: it stores nothing, so no client's cookie can ride on
    another's request (a jar cleared per request would still share them between concurrent
    requests)."""

    def __init__(self) -> None:
        super().__init__(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None

    def set_cookie_if_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> None:
        return None

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


def _forwarded(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers as sent upstream: no hop-by-hop, Host or forwarding headers of the
    client's (the gateway sets its own), so nothing in them can choose where the request goes,
    whom it comes from or what it stands for."""
    headers = []
    for name, value in strip_hop_by_hop(scope.get("headers", [])):
        lower = name.lower()
        if lower not in _NOT_FORWARDED and not is_forwarding_header(lower):
            headers.append((name, value))
    client_addr = scope.get("client")
    if client_addr:
        headers.append((b"x-forwarded-for", str(client_addr[0]).encode()))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    return headers


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def configure_logging(level: str = "warning", fmt: str = "text") -> None:
    """Send the library's and uvicorn's log records at ``level`` and above to stderr, as text
    lines or JSON objects (``fmt``)."""
    if level not in LOG_LEVELS or fmt not in LOG_FORMATS:
        raise ValueError(f"log level one of {LOG_LEVELS} and format one of {LOG_FORMATS}")
    logger = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
                "json": {"()": _JsonFormatter},
            },
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stderr",
                    "formatter": fmt,
                }
            },
            "loggers": {"strands_dedup": logger, "uvicorn": logger},
        }
    )


def parse_trusted_proxies(text: str) -> list[str]:
    """``"10.0.0.1, 10.1.0.0/16"`` -> the addresses and networks whose ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` are believed; a `ValueError` for anything else (``*`` included)."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        try:
            found.append(
                str(
                    ipaddress.ip_network(item, strict=False)
                    if "/" in item
                    else ipaddress.ip_address(item)
                )
            )
        except ValueError:
            raise ValueError(
                f"not an IP address or network: {item!r} (name the proxies in front of the "
                "gateway, e.g. 10.0.0.5,10.1.0.0/16)"
            ) from None
    return found


def send_timeout_protocol(seconds: float, on_cut: Callable[[], None] | None = None) -> type[Any]:
    """uvicorn's HTTP/1.1 protocol (h11), cutting off a client that takes no response bytes for
    ``seconds``: its connection is aborted, so whatever relays to it stops waiting.

    The transport pauses the writer once its buffer passes the high-water mark (the socket
    accepts nothing more: the client stopped reading) and resumes it once the buffer drains; a
    pause that lasts ``seconds`` aborts the connection. A slow client that keeps reading is
    never cut off: each drain starts the count again.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SendTimeoutProtocol(H11Protocol):
        _stalled: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._stalled is None:
                self._stalled = asyncio.get_running_loop().call_later(seconds, self._cut_off)

        def resume_writing(self) -> None:
            self._forget()
            super().resume_writing()

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            super().connection_lost(exc)

        def _forget(self) -> None:
            if self._stalled is not None:
                self._stalled.cancel()
                self._stalled = None

        def _cut_off(self) -> None:
            self._stalled = None
            if on_cut is not None:
                on_cut()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # a reset: what the kernel still buffers for it is dropped too
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()  # connection_lost follows: the app's sends return at once

    return SendTimeoutProtocol


def _large_buffers_apart(threshold: int = 1024 * 1024) -> None:
    """glibc: give every allocation over ``threshold`` a mapping of its own, so that a large
    request body, once dropped (answered, refused, timed out), goes back to the system.

    glibc does so from 128 KiB by default, but raises that threshold to the size of each such
    block it frees (up to 32 MiB): after the first large body, the next ones would be carved
    from the heap, where a few live objects keep the freed pages resident. Elsewhere: no-op.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixing it turns the raising off


def run_gateway(
    config: GatewayConfig,
    dedup_config: DedupConfig | None = None,
    *,
    redis_url: str = "memory://",
    host: str = "127.0.0.1",
    port: int = 8787,
    log_level: str = "warning",
    log_format: str | None = "text",
    trusted_proxies: Sequence[str] = (),
) -> None:
    """Serve a `Gateway` with uvicorn until SIGTERM/SIGINT (blocking).

    ``config`` is the gateway's options; ``dedup_config`` those of the `Deduplicator` it makes
    on ``redis_url`` (namespace, TTLs, ...; default `DedupConfig()`) and closes when the server
    has stopped. Logs go to stderr (`configure_logging`; ``log_format=None`` leaves logging as
    it is). The client's address and scheme come from the connection, or from
    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` when the connection comes from one of
    ``trusted_proxies``.
    """
    import uvicorn

    if log_format is not None:
        configure_logging(log_level, log_format)
    _large_buffers_apart()
    given = dedup_config if dedup_config is not None else DedupConfig.model_validate({})
    dedup = Deduplicator.from_url(
        redis_url, **{name: getattr(given, name) for name in given.model_fields_set}
    )
    app = Gateway(dedup=dedup, config=config)
    server = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        timeout_graceful_shutdown=int(max(1, config.shutdown_timeout)),
        log_level=log_level,
        log_config=None,
        server_header=False,
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=list(trusted_proxies) or None,
        http=send_timeout_protocol(
            config.send_timeout, lambda: dedup.count_refusal("send-timeout")
        ),
    )

    async def serve() -> None:
        try:
            await uvicorn.Server(server).serve()
        finally:
            await dedup.aclose()

    asyncio.run(serve())
