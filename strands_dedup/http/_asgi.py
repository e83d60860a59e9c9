"""ASGI plumbing shared by the middleware and the gateway: the type aliases, the responses they
send (plain, JSON, ``application/problem+json``) and the bounded read of a request body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._policy import Rejected, body_timed_out, body_too_large, declared_length

__all__ = [
    "PROBLEM_BASE",
    "ASGIApp",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "problem",
    "read_body",
    "reject",
    "send_json",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBLEM_BASE = "https://strands-dedup.dev/problems/"


async def send_response(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send a whole response: ``headers`` plus its ``Content-Length``, then ``body``."""
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: Any) -> None:
    """Send ``payload`` as an ``application/json`` response."""
    body = json.dumps(payload).encode()
    await send_response(send, status, [(b"content-type", b"application/json")], body)


async def problem(
    send: Send,
    status: int,
    kind: str,
    title: str,
    detail: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send an ``application/problem+json`` error with a stable ``type``."""
    payload = {"type": PROBLEM_BASE + kind, "title": title, "status": status, "detail": detail}
    body = json.dumps(payload).encode()
    await send_response(
        send, status, [(b"content-type", b"application/problem+json"), *(headers or [])], body
    )


async def reject(send: Send, rejected: Rejected) -> None:
    """Send the problem of a `Rejected`."""
    await problem(
        send, rejected.status, rejected.kind, rejected.title, rejected.detail, rejected.headers
    )


async def read_body(
    receive: Receive,
    headers: Iterable[tuple[bytes, bytes]],
    limit: int,
    timeout: float | None = None,
) -> bytes | None:
    """The request body, at most ``limit`` bytes; None if the client left before sending it.

    A declared length over the limit is refused before anything is read; a chunked body is
    counted as it arrives and refused as soon as it passes the limit (`Rejected`, 413). A body
    that has not all arrived ``timeout`` seconds after the first read is refused (408), and what
    was buffered of it is dropped.
    """
    declared = declared_length(headers)
    if declared is not None and declared > limit:
        raise body_too_large(limit)
    if timeout is None:
        return await _read_body(receive, limit)
    try:
        async with asyncio.timeout(timeout):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise body_timed_out(timeout) from None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    chunk = message.get("body", b"")
    if len(chunk) > limit:
        raise body_too_large(limit)
    if not message.get("more_body", False):
        return bytes(chunk)
    # One growing buffer rather than a list of chunks: once large, it is one block of its
    # own, handed back to the system as a whole when dropped.
    buffer = bytearray(chunk)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if len(buffer) + len(chunk) > limit:
            raise body_too_large(limit)
        buffer += chunk
        if not message.get("more_body", False):
            return bytes(buffer)
