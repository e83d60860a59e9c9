"""An upstream for the gateway's security tests: ``python tests/recording_upstream.py PORT``.

Everything under ``/api/`` is what the gateway may reach; ``/seen`` (outside the base path, read
by the tests directly) lists every request that arrived: raw path, Host header, identity headers,
and every header as received.

- ``/api/echo``: counts runs per Idempotency-Key, answers with a ``Set-Cookie`` and a JSON body.
- ``/api/upload``: reads the body, answers its length and SHA-256.
- ``/api/big?size=N[&chunked=1]``: N bytes of a known pattern, with or without Content-Length.
- ``/api/slow?size=N&parts=K&pause=S[&chunked=1]``: N bytes in K parts, S seconds apart.
- ``/api/sleep?seconds=S``: answers after S seconds.
- ``/api/flood?size=N``: N bytes of the pattern, chunked, made as they are sent (any size).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any
from urllib.parse import parse_qs

import uvicorn

SEEN: list[dict[str, Any]] = []
RUNS: dict[str, int] = {}


def pattern(size: int) -> bytes:
    """``size`` bytes that differ from one offset to the next (a cut or a shift shows)."""
    block = b"".join(i.to_bytes(4, "big") for i in range(16384))  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


async def reply(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in scope["headers"]}
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
    if raw_path == b"/seen":
        await reply(send, 200, json.dumps(SEEN).encode(), [(b"content-type", b"application/json")])
        return
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    SEEN.append(
        {
            "method": scope["method"],
            "raw_path": raw_path.decode("latin-1"),
            "query": scope.get("query_string", b"").decode("latin-1"),
            "host": headers.get("host"),
            "authorization": headers.get("authorization"),
            "forwarded_for": headers.get("x-forwarded-for"),
            "body_length": len(body),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        }
    )
    path = raw_path.decode("latin-1")
    if path == "/api/echo":
        key = headers.get("idempotency-key", "")
        RUNS[key] = RUNS.get(key, 0) + 1
        payload = {"run": RUNS[key], "key": key, "who": headers.get("authorization")}
        await reply(
            send,
            200,
            json.dumps(payload).encode(),
            [(b"content-type", b"application/json"), (b"set-cookie", b"session=secret-cookie")],
        )
    elif path == "/api/upload":
        digest = hashlib.sha256(body).hexdigest()
        await reply(send, 200, json.dumps({"length": len(body), "sha256": digest}).encode(), [])
    elif path == "/api/big":
        data = pattern(int(query.get("size", "0")))
        if query.get("chunked") == "1":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            step = 256 * 1024
            for start in range(0, len(data), step):
                part = data[start : start + step]
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            await reply(send, 200, data, [])
    elif path == "/api/slow":
        data = pattern(int(query.get("size", "1000")))
        parts, pause = int(query.get("parts", "4")), float(query.get("pause", "0.5"))
        length = (
            [] if query.get("chunked") == "1" else [(b"content-length", str(len(data)).encode())]
        )
        await send({"type": "http.response.start", "status": 200, "headers": length})
        step = -(-len(data) // parts)
        for start in range(0, len(data), step):
            await send(
                {
                    "type": "http.response.body",
                    "body": data[start : start + step],
                    "more_body": True,
                }
            )
            await asyncio.sleep(pause)  # the pace of a slow upstream, not a synchronization
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/api/flood":
        block = pattern(64 * 1024)
        left = int(query.get("size", "0"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while left > 0:
            part = block[: min(left, len(block))]
            left -= len(part)
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/api/sleep":
        await asyncio.sleep(float(query.get("seconds", "1")))  # an upstream slower than allowed
        await reply(send, 200, b"late", [])
    else:
        await reply(send, 404, b"no such path", [])


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
