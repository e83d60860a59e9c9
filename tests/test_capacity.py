"""No client holds shared capacity: played by hostile clients over raw sockets against real
gateway processes on a real Redis, in front of the recording upstream.

Clients that stop reading a large response are cut off and free their upstream connections;
uploads that stall are answered 408 and their memory freed (the gateway's RSS is measured); one
identity's new keys and stored bytes are bounded fleet-wide (two gateways, one Redis), while its
replays and other identities are served. Small limits keep each test to a few seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from recording_upstream import pattern
from servers import free_port, gateway_command, namespace_of_its_own, process, recording_upstream
from test_security import status_of

import strands_dedup
from strands_dedup import Deduplicator
from strands_dedup.http import IdempotencyMiddleware

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]
HERE = Path(__file__).parent
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with recording_upstream() as port:
        yield port


@pytest.fixture
def space(redis_url: str) -> Iterator[str]:
    """A namespace of the test's own; its keys are deleted at the end."""
    with namespace_of_its_own(redis_url, "cap") as ns:
        yield ns


@contextlib.contextmanager
def gateway(
    upstream: int, redis_url: str, namespace: str, *extra: str
) -> Iterator[tuple[int, int]]:
    """(port, pid) of a gateway process in front of ``http://127.0.0.1:<upstream>/api``."""
    port = free_port()
    args = gateway_command(f"http://127.0.0.1:{upstream}/api", redis_url, namespace, port, *extra)
    with process(args, f"http://127.0.0.1:{port}/healthz") as proc:
        yield port, proc.pid


def rss(pid: int) -> int:
    """The process's resident set size now, in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def refusals(port: int, reason: str) -> float:
    """The gateway's ``strands_dedup_http_refusals_total`` for ``reason``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("strands_dedup_http_refusals_total{") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def stalled_reader(port: int, target: str, headers: str = "") -> socket.socket:
    """A connection that asks for ``target`` and never reads (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"POST {target} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\n\r\n".encode()
    )
    return sock


def cut_off(sock: socket.socket, deadline: float) -> bool:
    """Whether the gateway reset ``sock`` before ``deadline`` (read as fast as it comes)."""
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 20):
                return False  # an orderly end
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def until(check: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.05)  # polling a condition with a deadline, not a synchronization by sleep


# --- clients that stop reading -------------------------------------------------------------------


def arrived(upstream: int, raw_path: str) -> int:
    """How many requests for ``raw_path`` the upstream has received."""
    seen = httpx.get(f"http://127.0.0.1:{upstream}/seen").json()
    return sum(1 for request in seen if request["raw_path"] == raw_path)


def test_readers_that_stop_reading_are_cut_off_and_free_the_upstream_pool(
    upstream: int, redis_url: str, space: str
) -> None:
    stalled: list[socket.socket] = []
    options = ("--max-upstream-connections", "2", "--send-timeout", "1")
    with gateway(upstream, redis_url, space, *options) as (port, pid):
        before = rss(pid)
        floods = arrived(upstream, "/api/flood")
        try:
            for _ in range(4):  # more than the pool: every upstream connection is held
                stalled.append(stalled_reader(port, f"/flood?size={64 * MiB}"))
            until(lambda: arrived(upstream, "/api/flood") >= floods + 2, 10, "no flood began")
            started = time.monotonic()
            served = httpx.post(f"http://127.0.0.1:{port}/echo", timeout=15)
            waited = time.monotonic() - started
            assert served.status_code == 200
            assert waited < 6, f"a reading client waited {waited:.1f}s"
            until(lambda: refusals(port, "send-timeout") >= 4, 10, "not all were cut off")
            assert all(cut_off(sock, time.monotonic() + 5) for sock in stalled)
            grown = rss(pid) - before
            print(f"gateway RSS {before / MiB:.0f} MiB, +{grown / MiB:.1f} MiB after the cut-offs")
            assert grown < 32 * MiB
        finally:
            for sock in stalled:
                sock.close()


def test_a_stalled_keyed_primary_does_not_hold_its_key(
    upstream: int, redis_url: str, space: str
) -> None:
    size = 16 * MiB  # over --max-stored-body: its retry runs again
    key = f"stall-{uuid.uuid4().hex}"
    target = f"/flood?size={size}"
    options = ("--send-timeout", "1", "--max-stored-body", "1MiB", "--lease-ttl", "30")
    with gateway(upstream, redis_url, space, *options) as (port, _):
        floods = arrived(upstream, "/api/flood")
        sock = stalled_reader(port, target, f"Idempotency-Key: {key}\r\n")
        try:
            until(lambda: arrived(upstream, "/api/flood") > floods, 10, "the primary never ran")
            expected = hashlib.sha256(pattern(size)).hexdigest()
            deadline = time.monotonic() + 15
            with httpx.Client(timeout=5) as http:
                while True:  # until the stalled primary is cut off and its key let go
                    with contextlib.suppress(httpx.TransportError):
                        retry = http.post(
                            f"http://127.0.0.1:{port}{target}", headers={"Idempotency-Key": key}
                        )
                        if retry.status_code == 200:
                            break
                        assert retry.status_code == 409, retry.text
                    assert time.monotonic() < deadline, "the retry never ran"
            assert hashlib.sha256(retry.content).hexdigest() == expected
            assert "idempotent-replayed" not in retry.headers
            assert arrived(upstream, "/api/flood") == floods + 2  # it ran again
            assert refusals(port, "send-timeout") == 1
        finally:
            sock.close()


# --- uploads that stall --------------------------------------------------------------------------


def _stall_uploads(port: int, count: int, limit: int) -> list[socket.socket]:
    """``count`` uploads (every other one keyed) stopped one byte short of ``limit``."""
    socks = []
    for i in range(count):
        key = f"Idempotency-Key: up-{uuid.uuid4().hex}\r\n" if i % 2 else ""
        sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        head = f"POST /upload HTTP/1.1\r\nHost: x\r\n{key}Content-Length: {limit}\r\n\r\n"
        sock.sendall(head.encode() + b"x" * (limit - 1))
        socks.append(sock)
    return socks


def _answers(socks: list[socket.socket]) -> list[bytes]:
    answers = []
    for sock in socks:
        response = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                response += chunk
        sock.close()
        answers.append(response)
    return answers


def test_stalled_uploads_get_408_and_their_memory_back(
    upstream: int, redis_url: str, space: str
) -> None:
    limit, count = 8 * MiB, 12
    options = ("--max-body", str(limit), "--body-timeout", "1.5")
    with gateway(upstream, redis_url, space, *options) as (port, pid):
        before = rss(pid)
        for wave in (1, 2):  # the second wave: memory handed back once is handed back again
            socks = _stall_uploads(port, count, limit)
            try:
                held = rss(pid) - before
                answers = _answers(socks)
            finally:
                for sock in socks:
                    sock.close()
            assert [status_of(a) for a in answers] == [408] * count
            assert all(b"/body-timeout" in a and b"connection: close" in a for a in answers)
            after = rss(pid) - before
            print(
                f"wave {wave}: gateway RSS {before / MiB:.0f} MiB, +{held / MiB:.0f} MiB while "
                f"{count} uploads of {limit / MiB:.0f} MiB stalled, +{after / MiB:.0f} MiB after"
            )
            assert held > count * limit // 2  # the bodies were held (the measure sees them) ...
            assert after < 2 * limit  # ... and are let go
        assert refusals(port, "body-timeout") == 2 * count


# --- per-identity budgets ------------------------------------------------------------------------


def test_new_keys_per_identity_are_bounded_across_the_fleet(
    upstream: int, redis_url: str, space: str
) -> None:
    options = ("--max-new-keys", "10", "--new-keys-window", "60")
    with (
        gateway(upstream, redis_url, space, *options) as (one, _),
        gateway(upstream, redis_url, space, *options) as (two, _),
        httpx.Client(timeout=10) as http,
    ):
        alice = {"Authorization": "Bearer alice"}
        statuses = []
        first_key = ""
        for i in range(16):
            key = f"k-{uuid.uuid4().hex}"
            first_key = first_key or key
            port = (one, two)[i % 2]
            response = http.post(
                f"http://127.0.0.1:{port}/echo", headers={**alice, "Idempotency-Key": key}
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["type"].endswith("/key-budget")
                assert 50 <= int(response.headers["retry-after"]) <= 60
        assert statuses.count(200) == 10 and statuses.count(429) == 6
        replay = http.post(
            f"http://127.0.0.1:{two}/echo", headers={**alice, "Idempotency-Key": first_key}
        )
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        bob = {"Authorization": "Bearer bob", "Idempotency-Key": f"k-{uuid.uuid4().hex}"}
        assert http.post(f"http://127.0.0.1:{one}/echo", headers=bob).status_code == 200
        assert refusals(one, "key-budget") + refusals(two, "key-budget") == 6


def test_stored_bytes_per_identity_are_bounded(upstream: int, redis_url: str, space: str) -> None:
    budget = 2 * MiB
    size = 400 * 1024  # retained (under --max-stored-body): ~530 KiB stored each
    options = ("--max-stored-bytes", str(budget), "--max-stored-body", "1MiB")
    client = redis.Redis.from_url(redis_url)

    def stored() -> list[int]:
        names = list(client.scan_iter(match=f"{space}:*result", count=10_000))
        return [client.memory_usage(n) or 0 for n in names]

    with gateway(upstream, redis_url, space, *options) as (port, _), httpx.Client() as http:
        url = f"http://127.0.0.1:{port}/big?size={size}"
        statuses = []
        for _ in range(12):
            headers = {"Authorization": "Bearer carol", "Idempotency-Key": uuid.uuid4().hex}
            response = http.post(url, headers=headers)
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["type"].endswith("/byte-budget")
                assert int(response.headers["retry-after"]) >= 1
        results = stored()
        used = sum(results)
        print(f"statuses {statuses}; {used / MiB:.2f} MiB of results stored in Redis")
        assert 3 <= statuses.count(200) <= 5 and statuses[-1] == 429
        # the budget, passed by at most the response that filled it and one in flight
        assert used <= budget + 2 * max(results)
        other = {"Authorization": "Bearer dave", "Idempotency-Key": uuid.uuid4().hex}
        assert http.post(url, headers=other).status_code == 200
    client.close()


def test_the_budget_script_is_safe_to_repeat(redis_url: str, space: str) -> None:
    """budget.lua run on Redis as the store runs it (its keys: an identity's key counter and
    byte buckets, one operation's marker, in one slot)."""
    script = Path(strands_dedup.__file__).parent / "_store" / "lua" / "budget.lua"
    client = redis.Redis.from_url(redis_url)
    try:
        budget = client.register_script(script.read_text())

        def op(name: str) -> list[str]:
            base = f"{space}:{{!budget|id-abc}}:"
            return [base + "keys", base + "bytes", base + "op:" + name]

        args = (5, 8, 60_000, 1000, 10_000, 1000, 25, 60_000)
        first = budget(keys=op("op1"), args=args)
        again = budget(keys=op("op1"), args=args)  # a retried copy of the same call
        assert first[0] == again[0] == 5 and first[2] == again[2] == 1000
        second = budget(keys=op("op2"), args=args)
        assert second[0] == 3 and second[2] == 2000  # only what the window had left
        third = budget(keys=op("op3"), args=args)
        assert third[0] == 0 and 0 < third[1] <= 60_000
    finally:
        client.close()


async def test_the_middleware_spends_budget_on_new_keys_only(
    backend_url: str, namespace: str
) -> None:
    import asyncio

    runs = 0
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        nonlocal runs
        runs += 1
        await release.wait()
        body = str(runs).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async with Deduplicator.from_url(backend_url, namespace=namespace) as dedup:
        middleware = IdempotencyMiddleware(app, dedup=dedup, max_new_keys=2)
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:

            def post(key: str, who: str = "erin") -> Any:
                headers = {"Idempotency-Key": key, "Authorization": who}
                return http.post("/", headers=headers)

            first = asyncio.create_task(post("a"))
            while runs < 1:
                await asyncio.sleep(0.005)  # polled, with the test's timeout as its deadline
            duplicates = [asyncio.create_task(post("a")) for _ in range(3)]
            while dedup.activity().waiters < 3:
                await asyncio.sleep(0.005)
            release.set()
            answers = await asyncio.gather(first, *duplicates, post("a"), post("b"))
            assert [a.status_code for a in answers] == [200] * 6 and runs == 2
            refused = await post("c")
            assert refused.status_code == 429 and refused.json()["type"].endswith("/key-budget")
            assert (await post("a")).headers["idempotent-replayed"] == "true"
            assert (await post("c", who="frank")).status_code == 200
