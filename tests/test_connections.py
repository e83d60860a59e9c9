"""Connecting: URLs (redis://, rediss://, unix://, ACL users), failures surfacing as
StoreUnavailable in bounded time, and transient errors retried. Each test starts its own
redis-server on a free port (never 6379) where it needs special settings."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from servers import RedisServer, free_port
from side import side_of

from strands_dedup import Deduplicator, Role, StoreUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]


async def test_unreachable_redis_fails_fast_with_store_unavailable(namespace: str) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with Deduplicator.from_url(url, namespace=namespace, retry_attempts=2) as dedup:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable") as info:
            await dedup.execute("t", lambda: 1)
        assert time.monotonic() - started < 5
        assert isinstance(info.value.__cause__, redis.ConnectionError)
        assert "127.0.0.1" in str(info.value) and "password" not in str(info.value)


def test_unknown_url_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported Redis URL"):
        Deduplicator.from_url("http://user:secret@127.0.0.1:6379")
    try:
        Deduplicator.from_url("mongodb://u:topsecret@h/0")
    except ValueError as exc:
        assert "topsecret" not in str(exc)


async def test_password_and_acl_users(
    redis_server_factory: type[RedisServer], namespace: str
) -> None:
    server = redis_server_factory("--requirepass", "s3cret-pw")
    admin = redis.Redis(port=server.port, password="s3cret-pw")
    admin.execute_command("ACL", "SETUSER", "agent", "on", ">agent-pw", "~*", "&*", "+@all")
    admin.close()
    base = f"127.0.0.1:{server.port}/0"

    async with Deduplicator.from_url(f"redis://:s3cret-pw@{base}", namespace=namespace) as d:
        assert (await d.execute("t", lambda: "pw")).role is Role.PRIMARY
    async with Deduplicator.from_url(f"redis://agent:agent-pw@{base}", namespace=namespace) as d:
        assert (await d.execute("t", lambda: "acl")).value == "pw"

    for bad in (f"redis://:wrong@{base}", f"redis://agent:wrong@{base}", f"redis://{base}"):
        # retried, an error would take the retry deadline (10 s)
        async with Deduplicator.from_url(bad, namespace=namespace, retry_attempts=20) as d:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="credentials") as info:
                await d.execute("t", lambda: 1)
            assert time.monotonic() - started < 5, "credential errors are not retried"
            assert "wrong" not in str(info.value)
        # and closing does not wait out the counters' publisher (refused the same way)
        assert time.monotonic() - started < 5


async def test_unix_socket_url(redis_server_factory: type[RedisServer], namespace: str) -> None:
    server = redis_server_factory()
    async with Deduplicator.from_url(
        f"unix://{server.unixsocket}?db=0", namespace=namespace
    ) as dedup:
        gate = asyncio.Event()

        async def call() -> str:
            await gate.wait()
            return "over a socket"

        primary = asyncio.create_task(dedup.execute("t", call))
        dup = asyncio.create_task(dedup.execute("t", call))
        while dedup.activity().listening < 1:
            await asyncio.sleep(0.005)
        gate.set()
        assert {(await primary).value, (await dup).value} == {"over a socket"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test CA")
async def test_tls_url(
    redis_server_factory: type[RedisServer], tmp_path: Path, namespace: str
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    tls_port = free_port()
    redis_server_factory(
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    )
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
    async with Deduplicator.from_url(url, namespace=namespace) as dedup:
        assert (await dedup.execute("t", lambda: "tls")).role is Role.PRIMARY
        assert (await dedup.execute("t", lambda: "x")).value == "tls"


async def test_killed_connections_are_retried_transparently(
    redis_server_factory: type, namespace: str
) -> None:
    server = redis_server_factory()  # of its own: it kills every client connection
    async with Deduplicator.from_url(server.url, namespace=namespace) as dedup:
        assert (await dedup.execute("a", lambda: 1)).role is Role.PRIMARY
        admin = redis.Redis.from_url(server.url)
        try:
            name = f"strands-dedup:{socket.gethostname()}:{os.getpid()}"  # CLIENT SETNAME
            killed = admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            assert killed >= 1
            assert not any(c["name"] == name for c in admin.client_list(_type="normal"))
        finally:
            admin.close()
        # The pooled connection is dead; the claim fails once and is retried on a new one.
        assert (await dedup.execute("b", lambda: 2)).role is Role.PRIMARY
        assert (await dedup.execute("a", lambda: 3)).value == 1


async def test_redis_restart_is_survived(
    redis_server_factory: type[RedisServer], namespace: str
) -> None:
    server = redis_server_factory()
    async with Deduplicator.from_url(server.url, namespace=namespace, retry_deadline=5) as dedup:
        assert (await dedup.execute("a", lambda: 1)).role is Role.PRIMARY
        server.stop()
        with pytest.raises(StoreUnavailable):
            await dedup.execute("b", lambda: 2)
        server.start()
        assert (await dedup.execute("b", lambda: 2)).role is Role.PRIMARY


class LateReplies:
    """A TCP proxy to Redis that holds the replies of the connection whose request carries
    ``marker`` (set it to arm the proxy) until ``release`` is set: a reply that comes back late
    (a stalled process, a slow network). ``held`` is set when Redis has answered that request."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.marker: bytes | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.links: list[tuple[asyncio.Task[Any], asyncio.StreamWriter, asyncio.StreamWriter]] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        holding = False

        async def requests() -> None:
            nonlocal holding
            while data := await reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker, holding = None, True  # before Redis can answer
                up_writer.write(data)
                await up_writer.drain()

        pump = asyncio.ensure_future(requests())
        serving = asyncio.current_task()
        assert serving is not None
        self.links.append((serving, writer, up_writer))
        try:
            while data := await up_reader.read(65536):
                if holding:
                    self.held.set()
                    await self.release.wait()
                    holding = False
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            pump.cancel()
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        """Stop listening, cut every connection and wait until each one's proxying ended."""
        self.release.set()
        if self.server is not None:
            self.server.close()
        for _, writer, up_writer in self.links:
            writer.close()
            up_writer.close()
        await asyncio.gather(*(serving for serving, _, _ in self.links), return_exceptions=True)


async def test_a_claim_that_returns_late_is_checked_before_the_call_runs(
    redis_url: str, namespace: str
) -> None:
    # The first claim's reply comes back a whole lease TTL after Redis set the lease (a stalled
    # process, a slow network): meanwhile the lease ran out and another caller took the token.
    # The late claim is checked (claimed again, same owner) before the call runs: it sees the
    # other holder and waits, then takes over when that holder lets the token go.
    where = urlsplit(redis_url)
    proxy = LateReplies(where.hostname or "127.0.0.1", where.port or 6379)
    late_url = f"redis://127.0.0.1:{await proxy.start()}{where.path}"
    options = {"namespace": namespace, "lease_ttl": 1, "metrics": False}
    try:
        async with (
            Deduplicator.from_url(late_url, **options) as dedup,
            Deduplicator.from_url(redis_url, **options) as other,
            side_of(redis_url) as side,
        ):
            await dedup.execute("warm", lambda: 0)  # connected, its scripts loaded
            keys = dedup.token_keys("tok")
            runs = 0

            def call() -> str:
                nonlocal runs
                runs += 1
                return "mine"

            proxy.marker = keys.lease  # the claim of "tok" is the first request that names it
            late = asyncio.create_task(dedup.execute("tok", call))
            await asyncio.wait_for(proxy.held.wait(), 5)  # Redis ran the claim; no reply yet
            fence = int(await side.get(keys.fence))
            deadline = time.monotonic() + 5
            while await side.exists(keys.lease):  # nobody renews a lease it does not know of
                assert time.monotonic() < deadline, "the unanswered claim's lease never ran out"
                await asyncio.sleep(0.02)
            release = asyncio.Event()

            async def holds() -> str:
                await release.wait()
                return "theirs"

            taken = asyncio.create_task(other.execute("tok", holds))
            while other.activity().in_flight == 0:
                await asyncio.sleep(0.005)
            assert int(await side.get(keys.fence)) == fence + 1
            proxy.release.set()  # the first claim's reply arrives, over a lease TTL late
            while dedup.activity().listening == 0:  # it saw the other holder: it waits
                assert time.monotonic() < deadline + 5, "the late claim was not checked"
                await asyncio.sleep(0.005)
            assert runs == 0
            taken.cancel()  # the other holder lets the token go
            with pytest.raises(asyncio.CancelledError):
                await taken
            outcome = await asyncio.wait_for(late, 10)
    finally:
        await proxy.close()
    assert runs == 1
    # not its first fence (that would have run alongside the other holder's): the other
    # holder's claim took fence + 1, its release moved the fence on, the takeover claimed next
    assert (outcome.role, outcome.fence) == (Role.TAKEOVER, fence + 3)
