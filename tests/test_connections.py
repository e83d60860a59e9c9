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

import pytest
import redis
from servers import RedisServer, free_port

from strands_dedup import Deduplicator, Role, StoreUnavailable
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._protocol import Claimed

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


async def test_a_claim_that_returns_late_is_checked_before_the_call_runs(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first claim's reply comes back a whole lease TTL after Redis set the lease (a stalled
    # process, a slow network): meanwhile the lease ran out and another caller took the token.
    # The late claim is checked (claimed again, same owner) before the call runs: it sees the
    # other holder and waits, then takes over when that lease runs out.
    clock = {"skew": 0.0}

    options = {"namespace": namespace, "lease_ttl": 1, "metrics": False}
    async with (
        Deduplicator.from_url(redis_url, **options) as dedup,
        Deduplicator.from_url(redis_url, **options) as other,
    ):
        store = engine_of(dedup).store
        assert store.pipeline is not None
        first_claim = store.pipeline.execute  # the first script this deduplicator runs: a claim
        calls = 0
        fences: list[int] = []

        async def late_claim(*args: object) -> object:
            nonlocal calls
            reply: Any = await first_claim(*args)
            calls += 1
            if calls == 1:  # the lease runs out and another caller claims the token
                keys = engine_of(other).keys.for_token("tok")
                await engine_of(other).store.client.delete(keys.lease)
                taken = await engine_of(other).store.claim(
                    keys, engine_of(other).new_owner(), engine_of(other).lease_meta(keys, None)
                )
                fences.append(int(reply[1]))
                assert isinstance(taken, Claimed) and taken.fence == fences[0] + 1
                clock["skew"] += 1.0
            return reply

        monkeypatch.setattr(store.pipeline, "execute", late_claim)
        store.clock = lambda: time.monotonic() + clock["skew"]  # the store's injected clock
        runs = 0

        def call() -> str:
            nonlocal runs
            runs += 1
            return "mine"

        outcome = await asyncio.wait_for(dedup.execute("tok", call), 10)
    assert runs == 1
    # not its first fence (that would have run alongside the other holder's next one)
    assert (outcome.role, outcome.fence) == (Role.TAKEOVER, fences[0] + 2)
