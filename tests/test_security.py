"""The gateway played by a hostile client: raw sockets against a real uvicorn gateway process on a
real Redis, in front of a recording upstream, with a canary listener that must stay silent.

Request targets are fuzzed (Hypothesis); two identities send the same key; uploads of hundreds of
MiB are measured by the gateway's peak RSS; responses larger than the retained bound are checked
byte for byte; Redis is SIGSTOPped while a response is relayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from recording_upstream import pattern
from servers import (
    RedisServer,
    free_port,
    gateway_command,
    namespace_of_its_own,
    process,
    recording_upstream,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]
HERE = Path(__file__).parent
LIMIT = 8 * 1024 * 1024  # the gateways' --max-body
STORED = 1024 * 1024  # their --max-stored-body
MiB = 1024 * 1024


class Canary:
    """A TCP listener nothing may reach: it records every connection it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    self.hits.append(conn.recv(4096) or b"<connected>")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with recording_upstream() as port:
        yield port


@pytest.fixture(scope="module")
def space(redis_url: str) -> Iterator[str]:
    """The module's namespace; its keys are deleted at the end."""
    with namespace_of_its_own(redis_url, "sec") as ns:
        yield ns


def start_gateway(upstream: int, redis_url: str, namespace: str, *extra: str) -> Any:
    port = free_port()
    args = gateway_command(
        f"http://127.0.0.1:{upstream}/api",
        redis_url,
        namespace,
        port,
        "--max-body",
        str(LIMIT),
        "--max-stored-body",
        str(STORED),
        *extra,
    )
    return port, process(args, f"http://127.0.0.1:{port}/healthz")


@pytest.fixture(scope="module")
def gateway(upstream: int, redis_url: str, space: str) -> Iterator[tuple[int, int]]:
    """(port, pid) of a gateway in front of ``http://127.0.0.1:<upstream>/api``."""
    port, started = start_gateway(upstream, redis_url, space, "--lease-ttl", "2")
    with started as proc:
        yield port, proc.pid


def seen(upstream: int) -> list[dict[str, Any]]:
    return list(httpx.get(f"http://127.0.0.1:{upstream}/seen").json())


def raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are; read until the server closes (the requests ask it to)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def status_of(response: bytes) -> int:
    parts = response.split(b" ", 2)
    assert len(parts) >= 2 and parts[0].startswith(b"HTTP/1."), response[:200]
    return int(parts[1])


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def under_base(raw_path: str) -> bool:
    """What an upstream resolving the path (decode once, remove dot-segments) would reach."""
    decoded = unquote_to_bytes(raw_path)
    stack: list[bytes] = []
    for segment in decoded.split(b"/")[1:]:
        if segment.split(b";")[0] == b"..":
            if not stack:
                return False
            stack.pop()
        elif segment.split(b";")[0] != b".":
            stack.append(segment)
    return stack[:1] == [b"api"]


# --- the upstream is fixed by configuration ---------------------------------------------------

SEGMENTS = [
    "", ".", "..", "%2e", "%2E%2e", ".%2e", "%2e.", "..;", "..;x=1", "%2f", "%2F..", "%5c",
    "\\", "@", ":", "%00", "%0d%0a", "%252e%252e", "a", "seen", "echo", "%", "%zz", ";", "~",
    "%40", "%3a", "..%2f", "%2e%2e%2f",
]  # fmt: skip


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_request_target_reaches_another_host_port_or_path(
    data: st.DataObject, gateway: tuple[int, int], canary: Canary, upstream: int
) -> None:
    port, _ = gateway
    evil = f"127.0.0.1:{canary.port}"
    prefix = data.draw(
        st.sampled_from(
            ["", "/", "//", "///", "/\\", "*", f"http://{evil}", f"https://{evil}",
             f"http://user@{evil}", f"//{evil}", evil, f"@{evil}", "http:", f"/@{evil}",
             f"/{evil}", "/%2f%2f" + evil]
        )
    )  # fmt: skip
    path = "/".join(data.draw(st.lists(st.sampled_from(SEGMENTS), max_size=6)))
    query = data.draw(st.sampled_from(["", "?q=1", f"?next=http://{evil}/", "?%zz", "?a=..%2f"]))
    target = (prefix + path + query).encode("latin-1")
    if not target or any(c in target for c in b" \r\n"):
        target = b"/"
    method = data.draw(st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS"]))
    host = data.draw(st.sampled_from([f"127.0.0.1:{port}", evil, "localhost", ""]))
    extra = data.draw(
        st.sampled_from(
            [b"", f"X-Forwarded-Host: {evil}\r\n".encode(), f"Forwarded: host={evil}\r\n".encode()]
        )
    )
    key = f"Idempotency-Key: fuzz-{uuid.uuid4().hex}\r\n".encode() if method == b"POST" else b""
    before = len(seen(upstream))
    response = raw_exchange(
        port,
        method + b" " + target + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + extra + key
        + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    status = status_of(response)
    assert status < 500, response[:300]
    assert canary.hits == [], "a request reached the canary"
    arrived = seen(upstream)[before:]
    for request in arrived:
        assert request["host"] == f"127.0.0.1:{upstream}"
        assert request["raw_path"].startswith("/api/") and under_base(request["raw_path"])
    if not target.startswith(b"/") or target.startswith(b"//"):
        assert status == 400 and arrived == []


def test_hostile_targets_are_refused_with_a_problem(
    gateway: tuple[int, int], canary: Canary
) -> None:
    port, _ = gateway
    for target in [
        f"http://127.0.0.1:{canary.port}/x",
        "*",
        f"//127.0.0.1:{canary.port}/x",
        "/../seen",
        "/echo/%2e%2e/%2e%2e/seen",
        "/..;/seen",
        "/%2e%2e%2fseen",
        "/a%5c..%5c..%5cseen",
    ]:
        response = raw_exchange(
            port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        assert status_of(response) == 400, (target, response[:300])
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert body["type"].endswith("/bad-target"), target
    assert canary.hits == []


def test_a_normalized_path_stays_under_the_base(gateway: tuple[int, int], upstream: int) -> None:
    port, _ = gateway
    before = len(seen(upstream))
    response = httpx.post(
        f"http://127.0.0.1:{port}/x/../echo?z=1",
        headers={"Idempotency-Key": f"norm-{uuid.uuid4().hex}", "Host": "evil.example"},
    )
    assert response.status_code == 200
    [request] = seen(upstream)[before:]
    assert request["raw_path"] == "/api/echo" and request["query"] == "z=1"
    assert request["host"] == f"127.0.0.1:{upstream}"


# --- clients are isolated ---------------------------------------------------------------------


def test_two_identities_never_see_each_others_replay(
    gateway: tuple[int, int], redis_url: str, space: str
) -> None:
    port, _ = gateway
    url = f"http://127.0.0.1:{port}/echo"
    key = {"Idempotency-Key": f"shared-{uuid.uuid4().hex}"}
    alice = {**key, "Authorization": "Bearer alice-secret-token"}
    bob = {**key, "Authorization": "Bearer bob-secret-token"}
    first = httpx.post(url, headers=alice, content=b"same")
    second = httpx.post(url, headers=bob, content=b"same")
    assert first.json()["who"] == "Bearer alice-secret-token" and first.json()["run"] == 1
    assert second.json()["who"] == "Bearer bob-secret-token" and second.json()["run"] == 2
    assert "idempotent-replayed" not in second.headers
    assert first.headers["set-cookie"] == "session=secret-cookie"  # the primary's own response
    again = httpx.post(url, headers=alice, content=b"same")
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    assert "set-cookie" not in again.headers
    assert len(again.headers.get_list("date")) == 1
    anonymous = [httpx.post(url, headers=key, content=b"same") for _ in range(2)]
    assert anonymous[0].json()["run"] == 3 and anonymous[1].json()["run"] == 3
    assert anonymous[1].headers["idempotent-replayed"] == "true"
    # No credential is stored: scan every key of the namespace and every value.
    client = redis.Redis.from_url(redis_url)
    try:
        for name in client.scan_iter(match=f"{space}:*", count=10_000):
            assert b"secret-token" not in name and b"secret-cookie" not in name
            if client.type(name) == b"string":
                value = client.get(name) or b""
                assert b"secret-token" not in value and b"secret-cookie" not in value
    finally:
        client.close()


def test_the_cli_shows_a_digest_not_the_credentials(
    gateway: tuple[int, int], redis_url: str, space: str
) -> None:
    port, _ = gateway
    key = f"held-{uuid.uuid4().hex}"
    headers = {"Idempotency-Key": key, "Authorization": "Bearer carol-secret-token"}
    with httpx.Client(timeout=30) as http:
        held = threading.Thread(
            target=http.post, args=(f"http://127.0.0.1:{port}/sleep?seconds=3",), kwargs={
                "headers": headers}
        )  # fmt: skip
        held.start()
        try:
            deadline = time.monotonic() + 10
            while True:
                listed = subprocess.run(
                    [sys.executable, "-m", "strands_dedup.cli", "ls", "--json",
                     "--redis-url", redis_url, "--namespace", space],
                    capture_output=True, text=True, timeout=30, check=True,
                )  # fmt: skip
                leases = [lease for lease in json.loads(listed.stdout) if lease["token"] == key]
                if leases:
                    break
                assert time.monotonic() < deadline, "the held request never showed"
            assert "secret" not in listed.stdout
            assert leases[0]["scope"].startswith("id-")
        finally:
            held.join()


# --- bounded memory ----------------------------------------------------------------------------


def _upload(port: int, head: bytes, chunked_total: int = 0) -> tuple[int, int]:
    """Send a request head, then (chunked) up to ``chunked_total`` bytes until the gateway answers;
    returns (status, bytes of body sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sent = 0
    try:
        sock.sendall(head)
        piece = b"x" * MiB
        frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        while sent < chunked_total:
            if select.select([sock], [], [], 0)[0]:
                break  # the gateway answered
            try:
                sock.sendall(frame)
            except OSError:
                break  # it closed the connection after answering
            sent += len(piece)
        response = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in response and (chunk := sock.recv(4096)):
                response += chunk
        return status_of(response), sent
    finally:
        sock.close()


def test_uploads_are_bounded_whatever_the_method_or_key(gateway: tuple[int, int]) -> None:
    port, pid = gateway
    big = 300 * MiB
    before = peak_rss(pid)
    for method, key in [("POST", "k1"), ("PUT", None), ("POST", None), ("PATCH", "k2")]:
        keyed = f"Idempotency-Key: up-{key}-{uuid.uuid4().hex}\r\n" if key else ""
        declared = (
            f"{method} /upload HTTP/1.1\r\nHost: x\r\n{keyed}Content-Length: {big}\r\n\r\n"
        ).encode()
        started = time.monotonic()
        status, _ = _upload(port, declared)
        assert status == 413 and time.monotonic() - started < 5  # refused before any body
        chunked = (
            f"{method} /upload HTTP/1.1\r\nHost: x\r\n{keyed}Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        results: list[tuple[int, int]] = []
        threads = [
            threading.Thread(target=lambda: results.append(_upload(port, chunked, big)))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [status for status, _ in results] == [413] * 3
        assert all(sent < big for _, sent in results)  # refused once over, not at the end
    growth = peak_rss(pid) - before
    print(f"gateway peak RSS {before / MiB:.0f} MiB -> {peak_rss(pid) / MiB:.0f} MiB")
    assert growth < 6 * LIMIT, f"peak RSS grew by {growth / MiB:.0f} MiB"


def test_an_upload_under_the_limit_arrives_whole(gateway: tuple[int, int]) -> None:
    port, _ = gateway
    body = pattern(LIMIT - 1000)
    for headers in ({}, {"Idempotency-Key": f"ok-{uuid.uuid4().hex}"}):
        response = httpx.put(f"http://127.0.0.1:{port}/upload", content=body, headers=headers)
        if headers:
            response = httpx.post(
                f"http://127.0.0.1:{port}/upload", content=body, headers=headers, timeout=30
            )
        assert response.json() == {
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }


# --- responses are never cut --------------------------------------------------------------------


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_a_response_over_the_retained_bound_arrives_whole(
    gateway: tuple[int, int], chunked: str, redis_url: str, space: str
) -> None:
    port, _ = gateway
    size = 20 * MiB  # over --max-stored-body and over the stream bound (16 MiB)
    key = {"Idempotency-Key": f"big-{chunked}-{uuid.uuid4().hex}"}
    url = f"http://127.0.0.1:{port}/big?size={size}&chunked={chunked}"
    expected = hashlib.sha256(pattern(size)).hexdigest()
    with httpx.Client(timeout=60) as http:
        for _ in range(2):  # a retry runs again (not retained) and also arrives whole
            response = http.post(url, headers=key)
            assert response.status_code == 200
            assert hashlib.sha256(response.content).hexdigest() == expected
            assert "idempotent-replayed" not in response.headers
            if chunked == "0":
                assert response.headers["content-length"] == str(size)


def test_a_concurrent_duplicate_of_an_unretained_response_gets_409(
    gateway: tuple[int, int],
) -> None:
    port, _ = gateway
    key = {"Idempotency-Key": f"unretained-{uuid.uuid4().hex}"}
    url = f"http://127.0.0.1:{port}/slow?size={3 * MiB}&parts=6&pause=0.3"
    with httpx.Client(timeout=60) as http, http.stream("POST", url, headers=key) as primary:
        assert primary.status_code == 200
        body = primary.iter_raw()
        first = next(body)
        duplicate = httpx.post(url, headers=key, timeout=60)
        rest = b"".join(body)
    assert first + rest == pattern(3 * MiB)
    assert duplicate.status_code == 409
    assert duplicate.json()["type"].endswith("/not-retained")
    assert "retry-after" in duplicate.headers


def test_a_sized_response_is_stored_as_a_plain_result(
    gateway: tuple[int, int], redis_url: str, space: str
) -> None:
    port, _ = gateway
    key = f"plain-{uuid.uuid4().hex}"
    response = httpx.post(f"http://127.0.0.1:{port}/echo", headers={"Idempotency-Key": key})
    assert response.headers["content-length"] == str(len(response.content))
    client = redis.Redis.from_url(redis_url)
    try:
        mine = [n for n in client.scan_iter(match=f"{space}:*", count=10_000) if key.encode() in n]
        assert mine and not [n for n in mine if n.endswith(b":stream")]
    finally:
        client.close()


@pytest.mark.parametrize("chunked", ["0", "1"])
def test_redis_stopped_mid_response_leaves_the_primarys_body_whole(
    upstream: int, redis_server_factory: type[RedisServer], chunked: str
) -> None:
    server = redis_server_factory()
    port, started = start_gateway(upstream, server.url, "stall", "--lease-ttl", "2")
    size = 768 * 1024  # retained: a retry that follows the stream gets the rest from the result
    url = f"http://127.0.0.1:{port}/slow?size={size}&parts=8&pause=0.25&chunked={chunked}"
    key = {"Idempotency-Key": f"stall-{chunked}"}
    assert server.proc is not None
    with started, httpx.Client(timeout=60) as http:
        stopped = False
        try:
            with http.stream("POST", url, headers=key) as primary:
                body = primary.iter_raw()
                received = next(body)
                os.kill(server.proc.pid, signal.SIGSTOP)
                stopped = True
                duplicate = http.post(url, headers=key)  # a duplicate during the stall
                received += b"".join(body)
            assert primary.status_code == 200
            assert received == pattern(size)
            assert duplicate.status_code == 503, duplicate.text
            assert duplicate.json()["type"].endswith("/store-unavailable")
        finally:
            if stopped:
                os.kill(server.proc.pid, signal.SIGCONT)
        # Redis is back: the key is answered again (stored, or released and run again).
        deadline = time.monotonic() + 30
        while True:
            retry = http.post(url, headers=key)
            if retry.status_code == 200:
                break
            assert retry.status_code in (409, 503), retry.text
            assert time.monotonic() < deadline, "the key never came back"
        assert retry.content == pattern(size)


def test_an_upstream_timeout_keeps_the_key_claimed(
    upstream: int, redis_url: str, space: str
) -> None:
    port, started = start_gateway(
        upstream, redis_url, space, "--lease-ttl", "3", "--upstream-timeout", "0.5",
        "--on-duplicate", "reject",
    )  # fmt: skip
    key = {"Idempotency-Key": f"timeout-{uuid.uuid4().hex}"}
    url = f"http://127.0.0.1:{port}/sleep?seconds=2"
    with started:
        first = httpx.post(url, headers=key, timeout=30)
        assert first.status_code == 504
        assert "may still be running" in first.json()["detail"]
        assert 1 <= int(first.headers["retry-after"]) <= 4
        again = httpx.post(url, headers=key, timeout=30)  # the upstream may still be running
        assert again.status_code == 409 and again.json()["type"].endswith("/in-progress")


def test_several_keys_are_refused(gateway: tuple[int, int]) -> None:
    port, _ = gateway
    for keys in [b"Idempotency-Key: a\r\nIdempotency-Key: b\r\n", b"Idempotency-Key: a, b\r\n"]:
        response = raw_exchange(
            port,
            b"POST /echo HTTP/1.1\r\nHost: x\r\n" + keys
            + b"Content-Length: 0\r\nConnection: close\r\n\r\n",
        )  # fmt: skip
        assert status_of(response) == 400
        assert json.loads(response.split(b"\r\n\r\n", 1)[1])["type"].endswith("/key-invalid")


def test_a_store_that_refuses_writes_is_a_503_problem_and_unready(
    upstream: int, redis_server_factory: type[RedisServer]
) -> None:
    server = redis_server_factory("--maxmemory", "1", "--maxmemory-policy", "noeviction")
    port, started = start_gateway(upstream, server.url, "oom")
    base = f"http://127.0.0.1:{port}"
    with started:
        ready = httpx.get(base + "/readyz")
        assert ready.status_code == 503 and ready.json()["store_writable"] is False
        assert "OOM" in ready.json()["error"]
        refused = httpx.post(base + "/echo", headers={"Idempotency-Key": "oom-1"})
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("/store-unavailable")
        assert "OOM" in refused.json()["detail"] and "Traceback" not in refused.text
        redis.Redis(port=server.port).config_set("maxmemory", "0")
        assert httpx.get(base + "/readyz").status_code == 200
        accepted = httpx.post(base + "/echo", headers={"Idempotency-Key": "oom-1"})
        assert accepted.status_code == 200
