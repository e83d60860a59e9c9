"""The ``strands-dedup`` operator commands on a real Redis, with real processes holding leases.

Commands run through click's CliRunner in a worker thread (each opens its own event loop), while
this test's loop keeps its own deduplicator's leases renewed and its waiters listening; exit codes
and stderr are also checked on real ``python -m strands_dedup.cli`` processes. Children are
tests/proc_worker.py in ``hold`` mode. Everything waits on reports or polls against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from children import WORKER, Child
from click.testing import CliRunner, Result
from failover import until

from strands_dedup import Deduplicator, Role, SessionGuard
from strands_dedup.cli import NAMESPACE_ENV, REDIS_URL_ENV, main

HOST = socket.gethostname()
LEASE_FIELDS = {
    "token", "scope", "owner", "host", "pid", "fence", "age_s", "ttl_s", "listeners",
    "fingerprint", "key",
}  # fmt: skip
RESULT_FIELDS = {
    "token", "scope", "status", "fence", "size", "age_s", "ttl_s", "serializer", "error_type",
    "error_message", "key", "value",
}  # fmt: skip

pytestmark = [pytest.mark.redis]

Invoke = Callable[..., Awaitable[Result]]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def holder(
    redis_url: str, namespace: str
) -> AsyncIterator[Callable[[str], Awaitable[Child]]]:
    """Start a child that claims a token (lease TTL 30 s) and holds it until told or killed."""
    started: list[Child] = []

    async def spawn(token: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            WORKER,
            "hold",
            redis_url,
            namespace,
            token,
            "--lease-ttl",
            "30",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = Child(proc)
        started.append(child)
        await child.expect("started", 15)
        return child

    yield spawn
    for child in started:
        await child.stop()


@pytest.fixture
def cli(redis_url: str, namespace: str) -> Invoke:
    """Run the CLI in a worker thread; the target comes from the environment unless overridden."""

    async def invoke(
        *args: str, input: str | None = None, env: dict[str, Any] | None = None
    ) -> Result:
        environ = {REDIS_URL_ENV: redis_url, NAMESPACE_ENV: namespace, **(env or {})}
        runner = CliRunner()
        return await asyncio.to_thread(
            runner.invoke, main, list(args), input=input, env=environ, catch_exceptions=False
        )

    return invoke


@pytest.fixture
async def local(redis_url: str, namespace: str) -> AsyncIterator[Deduplicator]:
    """A deduplicator of this process on the test's namespace.

    It publishes its counters every 0.5 s, and they expire 2 s after the last change: long enough
    for a command to read them on a loaded machine.
    """
    async with Deduplicator.from_url(
        redis_url, namespace=namespace, lease_ttl=30, stats_interval=0.5
    ) as dedup:
        yield dedup


@contextlib.asynccontextmanager
async def held(dedup: Deduplicator, token: str, scope: str | None = None) -> AsyncIterator[None]:
    """Hold ``token``'s lease in this process for the duration of the block."""
    started, finish = asyncio.Event(), asyncio.Event()

    async def call() -> dict[str, str]:
        started.set()
        await finish.wait()
        return {"by": "test"}

    task = asyncio.create_task(dedup.execute(token, call, scope=scope))
    await asyncio.wait_for(started.wait(), 5)
    try:
        yield
    finally:
        finish.set()
        await asyncio.wait_for(task, 5)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def key(namespace: str, token: str, part: str, scope: str = "") -> str:
    return f"{namespace}:{{{scope}:{token}}}:{part}"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STRANDS_DEDUP_")}
    return {**environ, **extra}


# -- 1. ls ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_ls_json_shows_leases_held_by_other_processes(
    redis_url: str, namespace: str, holder: Any, cli: Invoke, local: Deduplicator
) -> None:
    child = await holder("held-tok")
    async with held(local, "scoped-tok", scope="tenant-a"):
        result = await cli("ls", "--json")
        assert result.exit_code == 0, result.output
        views = json.loads(result.stdout)
        ages = [v["age_s"] for v in views]
        assert ages == sorted(ages, reverse=True)  # oldest first
        theirs, ours = sorted(views, key=lambda v: str(v["token"]))
        assert (theirs["token"], ours["token"]) == ("held-tok", "scoped-tok")
        assert set(theirs) == LEASE_FIELDS
        assert (theirs["host"], theirs["pid"]) == (HOST, child.pid)
        assert theirs["fence"] > 0
        assert 25 < theirs["ttl_s"] <= 30
        assert theirs["scope"] == ""
        assert theirs["listeners"] == 0
        assert theirs["age_s"] >= 0 and ours["age_s"] >= 0
        assert theirs["key"] == key(namespace, "held-tok", "lease")
        assert (ours["pid"], ours["scope"]) == (os.getpid(), "tenant-a") and ours["fence"] > 0

        scoped = json.loads((await cli("ls", "--json", "--scope", "tenant-a")).stdout)
        assert [v["token"] for v in scoped] == ["scoped-tok"]
        unscoped = json.loads((await cli("ls", "--json", "--scope", "")).stdout)
        assert [v["token"] for v in unscoped] == ["held-tok"]
        old = await cli("ls", "--json", "--older-than", "3600")
        assert (old.exit_code, json.loads(old.stdout)) == (0, [])

        # the target: before the command, on the command (over the environment), or the env
        before = await cli(
            "--redis-url", redis_url, "--namespace", namespace, "ls", "--json",
            env={REDIS_URL_ENV: None, NAMESPACE_ENV: None},
        )  # fmt: skip
        on_command = await cli(
            "ls", "--json", "--redis-url", redis_url, "--namespace", namespace,
            env={REDIS_URL_ENV: f"redis://127.0.0.1:{closed_port()}/0", NAMESPACE_ENV: "other"},
        )  # fmt: skip
        for listed in (before, on_command):
            assert listed.exit_code == 0, listed.output
            assert sorted(v["token"] for v in json.loads(listed.stdout)) == [
                "held-tok",
                "scoped-tok",
            ]


# -- 2. release -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_release_hands_a_stuck_token_to_its_waiter(
    namespace: str, holder: Any, cli: Invoke, local: Deduplicator, r: redis.Redis
) -> None:
    child = await holder("stuck")

    async def rerun() -> dict[str, str]:
        return {"by": "takeover"}

    waiter = asyncio.create_task(local.execute("stuck", rerun))
    channel = key(namespace, "stuck", "chan")
    await until(lambda: r.pubsub_numsub(channel)[0][1] == 1, 5, "the waiter listens")
    listed = json.loads((await cli("ls", "--json")).stdout)
    assert [(v["token"], v["listeners"]) for v in listed] == [("stuck", 1)]

    declined = await cli("release", "stuck", input="n\n")
    assert declined.exit_code == 1
    assert r.exists(key(namespace, "stuck", "lease")) == 1
    assert not waiter.done()

    started = time.monotonic()
    released = await cli("release", "stuck", "--yes")
    assert released.exit_code == 0, released.output
    fence = int(listed[0]["fence"])
    assert f"held by {HOST}:{child.pid}, fence {fence}" in released.stdout
    assert "1 waiting procs" in released.stdout
    outcome = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - started < 5  # the lease had 25+ s left
    # release moved the fence on (fencing the old primary off); the takeover claimed the next
    assert (outcome.role, outcome.fence, outcome.value) == (
        Role.TAKEOVER,
        fence + 2,
        {"by": "takeover"},
    )

    # the released primary, still alive, is fenced off
    await child.send("late")
    assert (await child.expect("error", 10))["type"] == "LeaseLost"

    again = await cli("release", "stuck", "--yes")
    assert again.exit_code == 1
    assert again.stderr.strip() == "Error: no lease is held on token 'stuck'"


# -- 3. forget --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_forget_makes_the_next_call_run_again(
    namespace: str, cli: Invoke, local: Deduplicator, r: redis.Redis
) -> None:
    runs: list[int] = []

    async def call() -> int:
        runs.append(1)
        return len(runs)

    first = await local.execute("once", call)
    assert first.role is Role.PRIMARY
    assert (await local.execute("once", call)).role is Role.REPLAY

    declined = await cli("forget", "once", input="n\n")
    assert declined.exit_code == 1
    assert r.exists(key(namespace, "once", "result")) == 1
    assert (await local.execute("once", call)).role is Role.REPLAY

    forgotten = await cli("forget", "once", "--yes")
    assert forgotten.exit_code == 0, forgotten.output
    assert "forgot the stored result of token 'once'" in forgotten.stdout
    outcome = await local.execute("once", call)
    assert (outcome.role, outcome.value, len(runs)) == (Role.PRIMARY, 2, 2)
    assert outcome.fence > first.fence  # the stored result took the counter: seeded from TIME

    missing = await cli("forget", "never-stored", "--yes")
    assert missing.exit_code == 1
    assert missing.stderr.strip() == "Error: no result is stored for token 'never-stored'"

    # a scope is part of the token's identity
    await local.execute("once", call, scope="tenant-b")
    assert (await cli("forget", "once", "--yes", "--scope", "tenant-c")).exit_code == 1
    assert (await cli("forget", "once", "--yes", "--scope", "tenant-b")).exit_code == 0
    assert r.exists(key(namespace, "once", "result", scope="tenant-b")) == 0


# -- 4. exit codes ----------------------------------------------------------------------------


def exit_3_with_one_line(url: str) -> str:
    """Run ``strands-dedup ls`` on ``url`` in a child: it must exit 3 with one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "strands_dedup.cli", "--redis-url", url, "ls"],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_environ(),
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.timeout(30)
def test_unreachable_redis_exits_3_with_one_line() -> None:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    assert exit_3_with_one_line(url).startswith(f"Error: Redis at {url} is unavailable")


@contextlib.contextmanager
def not_redis(reply: bytes | None) -> Iterator[int]:
    """A TCP port that accepts connections and answers ``reply`` (None: never answers)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if reply is not None:
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("reply", "cause"),
    [(None, "no reply within 5s"), (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not Redis")],
)
def test_an_endpoint_that_is_not_redis_fails_within_the_connect_timeout(
    reply: bytes | None, cause: str
) -> None:
    with not_redis(reply) as port:
        started = time.monotonic()
        line = exit_3_with_one_line(f"redis://127.0.0.1:{port}")
        took = time.monotonic() - started
    assert cause in line and not line.rstrip().endswith(":"), line
    # the connect timeout (5 s) and the interpreter's start; retried, it would take 3 x 5 s
    assert took < 12


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "--namespace", "no spaces"], "namespace 'no spaces' is invalid"),
        (["ls", "--redis-url", "http://127.0.0.1/0"], "unsupported Redis URL"),
        (["ls", "--redis-url", "redis://127.0.0.1:port/0"], "Port could not be cast"),
        (["ls", "--redis-url", "memory://"], "memory:// is private"),
        (["show", ""], "token must not be empty"),
    ],
)
async def test_invalid_input_exits_2_with_one_line(
    cli: Invoke, args: list[str], message: str
) -> None:
    result = await cli(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines


@pytest.mark.timeout(30)
async def test_usage_errors_exit_2(cli: Invoke) -> None:
    assert (await cli("ls", "--older-than", "soon")).exit_code == 2
    assert (await cli("show")).exit_code == 2
    assert (await cli("watch", "--interval", "0")).exit_code == 2


# -- 5. show and stats ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_show_and_stats_describe_a_stored_result(
    namespace: str, cli: Invoke, local: Deduplicator, r: redis.Redis
) -> None:
    async def call() -> dict[str, int]:
        return {"answer": 42}

    fence = (await local.execute("done", call)).fence
    await local.execute("done", call)

    shown = await cli("show", "done", "--json")
    assert shown.exit_code == 0, shown.output
    doc = json.loads(shown.stdout)
    assert doc["lease"] is None
    result = doc["result"]
    assert set(result) == RESULT_FIELDS
    assert (result["token"], result["status"], result["fence"]) == ("done", "ok", fence)
    assert result["value"] is None
    assert 0 < result["ttl_s"] <= 86400 and result["age_s"] >= 0

    with_value = json.loads((await cli("show", "done", "--json", "--show-value")).stdout)
    assert json.loads(with_value["result"]["value"]) == {"answer": 42}
    assert with_value["result"]["size"] == result["size"] == len(with_value["result"]["value"])

    table = await cli("show", "done")
    assert table.exit_code == 0 and "status" in table.stdout and "ok" in table.stdout
    assert "answer" not in table.stdout
    assert "answer" in (await cli("show", "done", "--show-value")).stdout

    missing = await cli("show", "not-there", "--json")
    assert missing.exit_code == 1
    assert json.loads(missing.stdout) == {"lease": None, "result": None}
    assert missing.stderr.strip() == "Error: nothing is in flight or stored for token 'not-there'"

    stats_keys = f"{namespace}:stats:*"
    await until(
        lambda: any(
            r.hget(k, "replays") == b"1" for k in r.scan_iter(match=stats_keys, count=10_000)
        ),
        5,
        "this process published its counters",
    )
    stats = await cli("stats", "--json")
    assert stats.exit_code == 0, stats.output
    counts = json.loads(stats.stdout)
    assert set(counts) == {
        "namespace", "in_flight", "results", "lease_bytes", "result_bytes", "counters",
        "eviction_policy", "warnings",
    }  # fmt: skip
    assert (counts["namespace"], counts["in_flight"], counts["results"]) == (namespace, 0, 1)
    assert counts["result_bytes"] > result["size"] and counts["lease_bytes"] == 0
    assert counts["counters"]["claims"] == 1 and counts["counters"]["replays"] == 1
    table = await cli("stats")
    assert "stored results" in table.stdout and "replays" in table.stdout


# -- 6. tables and the live view --------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_ls_table_and_watch_show_the_token(cli: Invoke, local: Deduplicator) -> None:
    assert (await cli("ls")).stdout.startswith("nothing in flight")
    async with held(local, "visible-tok"):
        table = await cli("ls")
        assert table.exit_code == 0, table.output
        assert "visible-tok" in table.stdout
        assert f"{HOST}:{os.getpid()}" in table.stdout
        assert "waiting procs" in table.stdout

        shown = json.loads((await cli("show", "visible-tok", "--json")).stdout)
        assert shown["result"] is None and shown["lease"]["pid"] == os.getpid()

        watched = await cli("watch", "--iterations", "1", "--interval", "0.1")
        assert watched.exit_code == 0, watched.output
        assert "visible-tok" in watched.stdout and "takeovers" in watched.stdout
        twice = await cli("watch", "--iterations", "2", "--interval", "0.1")
        assert twice.exit_code == 0, twice.output
        assert "per second" in twice.stdout  # rates need two snapshots


@pytest.mark.timeout(30)
def test_rates_are_per_second_and_never_negative(redis_url: str, namespace: str) -> None:
    """`watch --json` between two samples: one process published its counters, then it stopped
    (its waits and takeovers left the totals) and another published higher ones."""
    client = redis.Redis.from_url(redis_url)
    gone, live = f"{namespace}:stats:host-a:1:a", f"{namespace}:stats:host-b:2:b"
    client.hset(gone, mapping={"claims": 5, "takeovers": 3, "waits": 7})
    watch = ["watch", "--json", "--interval", "2", "--iterations", "2"]
    environ = clean_environ(**{REDIS_URL_ENV: redis_url, NAMESPACE_ENV: namespace})
    try:
        with subprocess.Popen(
            [sys.executable, "-m", "strands_dedup.cli", *watch],
            stdout=subprocess.PIPE,
            text=True,
            env=environ,
        ) as proc:
            assert proc.stdout is not None
            try:
                first = json.loads(proc.stdout.readline())
                client.delete(gone)  # within the 2 s before the next sample
                client.hset(live, mapping={"claims": 9, "replays": 4, "waits": 1})
                second = json.loads(proc.stdout.readline())
                assert proc.wait(timeout=10) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()
    finally:
        client.delete(gone, live)
        client.close()
    assert first["rates"] is None and first["elapsed_s"] is None
    assert (first["counters"]["claims"], first["counters"]["waits"]) == (5, 7)
    assert first["counters"]["replays"] == 0  # unpublished: 0
    elapsed = second["elapsed_s"]
    assert elapsed >= 2
    rates = second["rates"]
    assert rates["claims"] == pytest.approx(4 / elapsed)
    assert rates["replays"] == pytest.approx(4 / elapsed)
    assert rates["takeovers"] == rates["waits"] == 0.0  # fell: not negative
    assert set(rates) == {"claims", "replays", "takeovers", "waits"}


@pytest.mark.timeout(30)
def test_watch_ends_cleanly_on_ctrl_c(redis_url: str, namespace: str) -> None:
    """A real terminal (a pty): the view renders live, and SIGINT ends it with exit 0."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "strands_dedup.cli", "watch", "--interval", "0.1"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=clean_environ(**{REDIS_URL_ENV: redis_url, NAMESPACE_ENV: namespace, "TERM": "xterm"}),
    )
    os.close(slave)
    output = b""

    def read_until(marker: bytes | None, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker is None or marker not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{marker!r} not seen within {timeout}s: {output!r}")
            if not select.select([master], [], [], remaining)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                if marker is None:
                    return
                raise AssertionError(f"watch exited before {marker!r}: {output!r}")
            output += chunk

    try:
        read_until(b"Ctrl-C quits", 15)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, output
        read_until(None, 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"Traceback" not in output
    assert b"Aborted" not in output


async def test_release_fences_a_live_primary_off_even_without_waiters(
    redis_url: str, namespace: str
) -> None:
    """With nobody to take over, a released primary must not quietly take its lease back."""
    from strands_dedup import Deduplicator, LeaseLost
    from strands_dedup.cli import Inspector

    async with (
        Deduplicator.from_url(redis_url, namespace=namespace, lease_ttl=0.3) as dedup,
        Inspector.from_url(redis_url, namespace=namespace) as inspector,
    ):
        release = asyncio.Event()

        async def call() -> str:
            await release.wait()
            return "late"

        primary = asyncio.create_task(dedup.execute("alone", call))
        while dedup.activity().in_flight == 0:
            await asyncio.sleep(0.005)
        assert (await inspector.release("alone")) is not None
        deadline = time.monotonic() + 2
        while dedup.activity().in_flight:  # the next renewal finds the lease lost
            assert time.monotonic() < deadline, "the released lease was renewed"
            await asyncio.sleep(0.01)
        release.set()
        with pytest.raises(LeaseLost):
            await primary
        assert await inspector.lease("alone") is None


@pytest.mark.timeout(30)
async def test_ls_sessions_shows_holders_and_queue_depth(cli: Invoke, local: Deduplicator) -> None:
    assert (await cli("ls", "--sessions")).stdout.startswith("no guarded session")
    guard = SessionGuard(local, first_seq=1, gap_timeout=60)
    async with guard.hold("chat-7", seq=1):
        waiters = [asyncio.create_task(guard.hold("chat-7", seq=n).__aenter__()) for n in (3, 4)]
        try:
            while (await local.health()).sessions_waiting < 2:
                await asyncio.sleep(0.01)
            found = json.loads((await cli("ls", "--sessions", "--json")).stdout)
            assert len(found) == 1
            view = found[0]
            assert view["session"] == "chat-7" and view["fence"] == 1 and view["next_seq"] == 2
            assert [(h["host"], h["pid"]) for h in view["holders"]] == [(HOST, os.getpid())]
            assert [w["seq"] for w in view["waiting"]] == [3, 4]
            table = await cli("ls", "--sessions")
            assert table.exit_code == 0, table.output
            assert "chat-7" in table.stdout and f"{HOST}:{os.getpid()}" in table.stdout
            health = await local.health()
            assert health.sessions_held == 1 and health.sessions_waiting == 2
            assert [(s.session, s.holders, s.queue_depth) for s in health.sessions] == [
                ("chat-7", 1, 2)
            ]
            misuse = await cli("ls", "--sessions", "--scope", "x")
            assert misuse.exit_code == 2 and "cannot be combined" in misuse.output
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
