"""What the gateway lets through between clients, its upstream and its operators, played over raw
sockets against real gateway processes on a real Redis, in front of the recording upstream.

No cookie of one client reaches another's request; the upstream gets the client's headers and
the gateway's forwarding headers, nothing else; CONNECT and TRACE are refused; clients' forwarding
headers are dropped unless they come through a trusted proxy; Content-Type is part of the
fingerprint; clients never read where Redis is; the library's warnings reach the operator's
stderr; limits the store cannot honour, and credentials as a scope, are refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner
from pydantic import ValidationError
from recording_upstream import pattern
from servers import (
    RedisServer,
    free_port,
    gateway_command,
    namespace_of_its_own,
    recording_upstream,
    wait_http,
)

from strands_dedup import Deduplicator
from strands_dedup.cli import main
from strands_dedup.http import HttpConfig, IdempotencyMiddleware

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]
HERE = Path(__file__).parent
MiB = 1024 * 1024


@dataclass
class Running:
    """A gateway process and the file its stderr goes to."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, text: str, seconds: float = 15) -> str:
        deadline = time.monotonic() + seconds
        while text not in (found := self.stderr()):
            assert time.monotonic() < deadline, f"{text!r} never logged; stderr:\n{found}"
            time.sleep(0.05)  # polling a child's log file against a deadline
        return found


@contextlib.contextmanager
def gateway_process(
    directory: Path, upstream: int, redis_url: str, namespace: str, *extra: str
) -> Iterator[Running]:
    port = free_port()
    log = directory / f"gateway-{port}.log"
    args = gateway_command(f"http://127.0.0.1:{upstream}/api", redis_url, namespace, port, *extra)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRANDS_DEDUP_IDENTITY_SECRET")}
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sink, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", time.monotonic() + 20)
        yield Running(port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with recording_upstream() as port:
        yield port


@pytest.fixture(scope="module")
def space(redis_url: str) -> Iterator[str]:
    with namespace_of_its_own(redis_url, "bnd") as ns:
        yield ns


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="module")
def gateway(upstream: int, redis_url: str, space: str, logs: Path) -> Iterator[Running]:
    """A gateway with the defaults (no identity secret, no trusted proxy)."""
    with gateway_process(logs, upstream, redis_url, space) as running:
        yield running


def seen(upstream: int, marker: str) -> list[dict[str, Any]]:
    """The requests the upstream received whose query holds ``marker``."""
    every = httpx.get(f"http://127.0.0.1:{upstream}/seen").json()
    return [request for request in every if marker in request["query"]]


def header_names(request: dict[str, Any]) -> list[str]:
    return sorted(name.lower() for name, _ in request["headers"])


def header(request: dict[str, Any], name: str) -> list[str]:
    return [value for n, value in request["headers"] if n.lower() == name]


def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; read until the server closes: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


# --- no state shared between clients in the upstream client ------------------------------------


def keyed(headers: dict[str, str], suffix: str) -> dict[str, str]:
    """``headers`` with their Idempotency-Key, if any, made unique by ``suffix``."""
    if "Idempotency-Key" not in headers:
        return headers
    return {**headers, "Idempotency-Key": f"{headers['Idempotency-Key']}-{suffix}"}


async def _fresh(method: str, url: str, headers: dict[str, str]) -> httpx.Response:
    """One request from a client of its own (no cookie jar shared on the test's side either)."""
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.request(method, url, headers=headers)


def test_no_cookie_of_one_client_reaches_another(gateway: Running, upstream: int) -> None:
    marker = uuid.uuid4().hex
    url = f"{gateway.url}/echo?m={marker}"
    alice = httpx.post(
        url + "&who=alice",
        headers={"Authorization": "Bearer alice", "Idempotency-Key": f"a-{marker}"},
    )
    assert alice.headers["set-cookie"] == "session=secret-cookie"  # the upstream sets one
    calls = [
        ("bob", "POST", {"Authorization": "Bearer bob", "Idempotency-Key": "b"}),
        ("anon", "POST", {}),
        ("get", "GET", {}),
        ("carol", "POST", {"Authorization": "Bearer carol", "Cookie": "mine=1"}),
    ]

    async def concurrently() -> list[httpx.Response]:
        return await asyncio.gather(
            *(
                _fresh(method, f"{url}&who={who}&n={n}", keyed(headers, f"{marker}-{n}"))
                for who, method, headers in calls
                for n in range(5)
            )
        )

    assert {r.status_code for r in asyncio.run(concurrently())} == {200}
    arrived = seen(upstream, marker)
    assert len(arrived) == 1 + 5 * len(calls)
    for request in arrived:
        who = request["query"].split("who=", 1)[1].split("&")[0]
        expected = ["mine=1"] if who == "carol" else []
        assert header(request, "cookie") == expected, (who, request["headers"])


def test_the_upstream_gets_what_the_client_sent_and_nothing_more(
    gateway: Running, upstream: int
) -> None:
    marker = uuid.uuid4().hex
    status, _, _ = raw_exchange(
        gateway.port,
        f"POST /echo?m={marker}&n=1 HTTP/1.1\r\nHost: x\r\nX-Custom: one\r\n"
        "Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".encode(),
    )
    assert status == 200
    status, _, _ = raw_exchange(
        gateway.port,
        f"GET /echo?m={marker}&n=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 200
    posted, got = sorted(seen(upstream, marker), key=lambda r: r["query"])
    forwarding = ["x-forwarded-for", "x-forwarded-proto"]
    # No Accept, Accept-Encoding, User-Agent or Connection of the gateway's own: the body's
    # framing (Content-Length) and the forwarding headers are all it adds.
    assert header_names(posted) == sorted(
        ["host", "x-custom", "content-type", "content-length", *forwarding]
    )
    assert header_names(got) == sorted(["host", *forwarding])
    assert header(posted, "host") == [f"127.0.0.1:{upstream}"]
    assert header(posted, "x-custom") == ["one"] and header(posted, "content-length") == ["3"]


def test_connect_and_trace_are_refused(gateway: Running, upstream: int) -> None:
    marker = uuid.uuid4().hex
    for line in (
        f"CONNECT /echo?m={marker} HTTP/1.1",
        f"CONNECT 127.0.0.1:{upstream} HTTP/1.1",
        f"TRACE /echo?m={marker} HTTP/1.1",
        f"trace /echo?m={marker} HTTP/1.1",
    ):
        status, headers, body = raw_exchange(
            gateway.port,
            f"{line}\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == 405, (line, body)
        assert headers["content-type"] == "application/problem+json"
        assert json.loads(body)["type"].endswith("/method-not-allowed")
        assert "CONNECT" not in headers["allow"] and "TRACE" not in headers["allow"]
    assert seen(upstream, marker) == []


# --- forwarding ---------------------------------------------------------------------------------

SPOOFED = {
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Port": "443",
    "X-Forwarded-Prefix": "/admin",
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Real-IP": "6.6.6.6",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-HTTP-Method-Override": "DELETE",
    "X-Method-Override": "DELETE",
    "True-Client-IP": "6.6.6.6",
}


def spoofing(port: int, marker: str) -> None:
    head = "".join(f"{name}: {value}\r\n" for name, value in SPOOFED.items())
    status, _, _ = raw_exchange(
        port,
        f"POST /echo?m={marker} HTTP/1.1\r\nHost: x\r\n{head}Content-Length: 0\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert status == 200


def test_clients_forwarding_headers_are_dropped(gateway: Running, upstream: int) -> None:
    marker = uuid.uuid4().hex
    spoofing(gateway.port, marker)  # from 127.0.0.1, which is no trusted proxy by default
    [request] = seen(upstream, marker)
    assert request["method"] == "POST" and request["raw_path"] == "/api/echo"
    assert header(request, "x-forwarded-for") == ["127.0.0.1"]
    assert header(request, "x-forwarded-proto") == ["http"]
    names = set(header_names(request))
    assert not names & {name.lower() for name in SPOOFED} - {
        "x-forwarded-for",
        "x-forwarded-proto",
    }


def test_only_trusted_proxies_are_believed(
    upstream: int, redis_url: str, space: str, logs: Path
) -> None:
    believed, doubted = uuid.uuid4().hex, uuid.uuid4().hex
    with gateway_process(logs, upstream, redis_url, space, "--trusted-proxies", "127.0.0.1") as gw:
        spoofing(gw.port, believed)
    with gateway_process(logs, upstream, redis_url, space, "--trusted-proxies", "10.0.0.0/8") as gw:
        spoofing(gw.port, doubted)
    [trusted] = seen(upstream, believed)
    assert header(trusted, "x-forwarded-for") == ["6.6.6.6"]
    assert header(trusted, "x-forwarded-proto") == ["https"]
    assert "x-forwarded-prefix" not in header_names(trusted)
    assert "x-original-url" not in header_names(trusted)
    [other] = seen(upstream, doubted)
    assert header(other, "x-forwarded-for") == ["127.0.0.1"]
    assert header(other, "x-forwarded-proto") == ["http"]


# --- limits and fingerprint ---------------------------------------------------------------------


def test_content_type_is_part_of_the_fingerprint(gateway: Running) -> None:
    key = {"Idempotency-Key": f"ct-{uuid.uuid4().hex}"}
    url = f"{gateway.url}/echo"
    as_json = {**key, "Content-Type": "application/json"}
    as_form = {**key, "Content-Type": "application/x-www-form-urlencoded"}
    first = httpx.post(url, headers=as_json, content=b"a=1")
    other = httpx.post(url, headers=as_form, content=b"a=1")
    again = httpx.post(url, headers=as_json, content=b"a=1")
    assert first.status_code == 200
    assert other.status_code == 422 and other.json()["type"].endswith("/key-reused")
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()


CEILING = 12_533_760
"""The largest response body the store holds under the default 16 MiB ``max_result_bytes``
(its base64 in JSON, with room for its headers), as docs/guides/http.md states it."""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "strands_dedup.cli", "gateway", "--upstream", "http://u:1",
         "--port", str(free_port()), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def test_limits_and_credential_scopes_are_refused_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    ceiling = CEILING  # under the default 16 MiB result bound
    cases = {
        "--max-stored-body": (["--max-stored-body", "100MiB"], str(ceiling)),
        "above by one": (["--max-stored-body", str(ceiling + 1)], str(ceiling)),
        "Authorization": (
            ["--identity-header", "X-Api-Key", "--scope-header", "Authorization"],
            "credential",
        ),
        "Cookie": (["--scope-header", "Cookie"], "credential"),
        "Proxy-Authorization": (["--scope-header", "proxy-authorization"], "credential"),
        "identity": (["--identity-header", "X-Token", "--scope-header", "x-token"], "credential"),
        "trusted *": (["--trusted-proxies", "*"], "not an IP address"),
        "empty secret file": (["--identity-secret-file", str(empty)], "is empty"),
        "two secrets": (
            ["--identity-secret-file", str(empty), "--identity-secret", "s"],
            "not both",
        ),
    }
    # Two as real processes (nothing starts serving); the rest in-process, faster.
    started = {name: cli(*cases.pop(name)[0]) for name in ("--max-stored-body", "Authorization")}
    expected = {"--max-stored-body": str(ceiling), "Authorization": "credential"}
    try:
        for name, proc in started.items():
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 2, (name, err)
            assert expected[name] in " ".join(err.split()), (name, err)
    finally:
        for proc in started.values():  # one that started serving instead of refusing
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for name, (args, text) in cases.items():
        result = CliRunner().invoke(main, ["gateway", "--upstream", "http://u:1", *args])
        assert result.exit_code == 2, (name, result.output)
        assert text in " ".join(result.output.split()), (name, result.output)


async def test_the_middleware_refuses_a_stored_body_the_store_cannot_hold() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not called")

    dedup = Deduplicator.from_url(f"memory://{uuid.uuid4().hex[:8]}", max_result_bytes=MiB)
    try:
        lowered = IdempotencyMiddleware(app, dedup=dedup)  # the default 1 MiB: lowered to fit
        ceiling = lowered.config.max_stored_body
        assert 3 * MiB // 4 - 64 * 1024 <= ceiling < MiB  # base64 of the body, and its headers
        with pytest.raises(ValueError, match=f"at most {ceiling} bytes"):
            IdempotencyMiddleware(app, dedup=dedup, max_stored_body=MiB)
        with pytest.raises(ValueError, match=f"at most {ceiling} bytes"):
            IdempotencyMiddleware(app, dedup=dedup, max_stored_body=ceiling + 1)
        assert IdempotencyMiddleware(app, dedup=dedup, max_stored_body=ceiling)
        for name in ("Cookie", "authorization", "X-Api-Key", "Proxy-Authorization"):
            with pytest.raises(ValidationError, match="is a credential header"):
                HttpConfig(scope_header=name, identity_headers=("x-token",))
    finally:
        await dedup.aclose()


async def test_a_body_at_the_ceiling_is_stored_and_replayed() -> None:
    """The ceiling the middleware takes is one the store holds: a response of that many bytes
    is replayed to a retry without running again."""
    runs = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        runs.append(1)
        body = b"b" * size
        headers = [(b"content-length", str(size).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with Deduplicator.from_url(
        f"memory://{uuid.uuid4().hex[:8]}", max_result_bytes=MiB
    ) as dedup:
        middleware = IdempotencyMiddleware(app, dedup=dedup)
        size = middleware.config.max_stored_body
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            key = {"Idempotency-Key": "at-the-ceiling"}
            first = await http.post("/x", headers=key)
            again = await http.post("/x", headers=key)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert len(again.content) == size and runs == [1]


async def test_a_response_the_store_cannot_hold_is_not_retained_rather_than_failed() -> None:
    """A body within max_stored_body whose headers take it over the store's bound: the waiting
    duplicate gets 409 not-retained, not a 502 as if the primary had failed."""
    limit = 64 * 1024
    started, release = asyncio.Event(), asyncio.Event()
    runs = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        runs.append(1)
        started.set()
        await release.wait()
        headers = [(b"content-length", str(size).encode()), (b"x-pad", b"p" * 16384)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"b" * size})

    url = f"memory://{uuid.uuid4().hex[:8]}"
    async with Deduplicator.from_url(url, max_result_bytes=limit) as dedup:
        middleware = IdempotencyMiddleware(app, dedup=dedup)
        size = middleware.config.max_stored_body
        assert 0 < size < limit  # the default lowered to what the store holds
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            key = {"Idempotency-Key": "too-large"}
            primary = asyncio.create_task(http.post("/x", headers=key))
            await asyncio.wait_for(started.wait(), 5)
            duplicate = asyncio.create_task(http.post("/x", headers=key))
            deadline = time.monotonic() + 5
            # listening: subscribed and its re-read done (a duplicate still re-reading when the
            # primary releases the token finds it free and takes it over)
            while dedup.activity().listening < 1:
                assert time.monotonic() < deadline, "the duplicate never waited"
                await asyncio.sleep(0.005)
            release.set()
            first, second = await primary, await duplicate
    assert first.status_code == 200 and len(first.content) == size
    assert second.status_code == 409, second.text  # never a 502 as if the first had failed
    assert second.json()["type"].endswith("/not-retained")
    assert len(runs) == 1


# --- what clients and operators read ------------------------------------------------------------


def test_clients_never_read_where_redis_is(upstream: int, space: str, logs: Path) -> None:
    port = free_port()  # nothing listens there
    with gateway_process(logs, upstream, f"redis://127.0.0.1:{port}/0", space) as gw:
        ready = httpx.get(gw.url + "/readyz")
        refused = httpx.post(gw.url + "/echo", headers={"Idempotency-Key": "k"}, timeout=30)
        for response in (ready, refused):
            assert response.status_code == 503
            assert str(port) not in response.text and "127.0.0.1" not in response.text
        assert refused.json()["type"].endswith("/store-unavailable")
        assert ready.json()["store_reachable"] is False and ready.json()["error"]
        assert str(port) in gw.wait_log(f"127.0.0.1:{port}")  # the operator reads it


def test_the_operator_reads_the_librarys_warnings(
    gateway: Running, upstream: int, redis_url: str, space: str, logs: Path
) -> None:
    text = gateway.wait_log("no identity secret is configured")
    assert "WARNING strands_dedup.http" in text
    ready = httpx.get(gateway.url + "/readyz").json()
    assert ready["identity_secret"] is False
    assert any("no identity secret" in warning for warning in ready["warnings"])
    secret = logs / "secret"
    secret.write_text("a long random secret\n")
    with gateway_process(
        logs, upstream, redis_url, space, "--share-keys-across-identities",
        "--identity-secret-file", str(secret), "--log-format", "json",
    ) as shared:  # fmt: skip
        shared.wait_log("share_keys_across_identities is on")
        lines = [json.loads(line) for line in shared.stderr().splitlines() if line.strip()]
        ready = httpx.get(shared.url + "/readyz").json()
    warned = [line for line in lines if "share_keys_across_identities" in line["message"]]
    assert (
        warned
        and warned[0]["level"] == "WARNING"
        and warned[0]["logger"].startswith("strands_dedup")
    )
    assert not [line for line in lines if "identity secret" in line["message"]]
    assert ready["identity_secret"] is True
    assert not [w for w in ready["warnings"] if "identity secret" in w]


def test_a_response_sent_but_not_stored_is_logged(
    upstream: int, redis_server_factory: type[RedisServer], logs: Path
) -> None:
    server = redis_server_factory()
    size = 256 * 1024
    url = f"/slow?size={size}&parts=4&pause=0.2"
    admin = redis.Redis(port=server.port)
    with (
        gateway_process(logs, upstream, server.url, "unstored", "--log-format", "json") as gw,
        httpx.Client(timeout=30) as http,
        http.stream("POST", gw.url + url, headers={"Idempotency-Key": "unstored"}) as primary,
    ):
        body = primary.iter_raw()
        received = next(body)
        # Scripts refused from now on: the completion is, once the response is sent.
        admin.execute_command("ACL", "SETUSER", "default", "-@scripting")
        try:
            received += b"".join(body)
            assert primary.status_code == 200 and received == pattern(size)
            gw.wait_log("was sent but not stored")
        finally:
            admin.execute_command("ACL", "SETUSER", "default", "+@all")
            admin.close()
        [line] = [json.loads(line) for line in gw.stderr().splitlines() if "not stored" in line]
        assert line["level"] == "WARNING" and "NOPERM" in line["message"]


def test_doctor_says_whether_an_identity_secret_is_configured(
    tmp_path: Path, redis_url: str
) -> None:
    def identity(**environ: str) -> dict[str, Any]:
        unset: dict[str, str | None] = {
            "STRANDS_DEDUP_IDENTITY_SECRET": None,
            "STRANDS_DEDUP_IDENTITY_SECRET_FILE": None,
        }
        result = CliRunner().invoke(
            main, ["doctor", "--redis-url", redis_url, "--json"], env={**unset, **environ}
        )
        [found] = [f for f in json.loads(result.output)["findings"] if f["check"] == "identity"]
        return dict(found)

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    missing = identity()
    assert missing["level"] == "info" and "public key" in missing["summary"]
    assert identity(STRANDS_DEDUP_IDENTITY_SECRET="x")["level"] == "ok"
    assert identity(STRANDS_DEDUP_IDENTITY_SECRET_FILE=str(secret))["level"] == "ok"
    unreadable = identity(STRANDS_DEDUP_IDENTITY_SECRET_FILE=str(tmp_path / "no"))
    assert unreadable["level"] == "warn"
    empty = identity(STRANDS_DEDUP_IDENTITY_SECRET="", STRANDS_DEDUP_IDENTITY_SECRET_FILE="")
    assert empty["level"] == "info" and "public key" in empty["summary"]
