"""Start and stop throwaway redis-server processes on free ports for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import redis

SERVER_OVERRIDE = os.environ.get("STRANDS_DEDUP_TEST_SERVER") or None
"""A server binary to test against instead of redis-server (e.g. a Valkey build): every test
Redis, Sentinel and cluster node is then started from it, and the Redis on 6379 is not used."""
REDIS_SERVER = SERVER_OVERRIDE or shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


STALL_OPTIONS: dict[str, Any] = {
    "namespace": "ns",
    "lease_ttl": 30,
    "socket_timeout": 0.3,
    "connect_timeout": 0.3,
    "retry_attempts": 2,
    "retry_deadline": 0.5,
    "metrics": False,
}
"""Deduplicator options for a test that SIGSTOPs its own redis-server: short timeouts and
retries, and a lease that outlasts the stall."""


PORTS = range(20000, 32000)
"""Where `free_port` looks: below Linux's ephemeral range (32768-60999), so a port it hands out is
not taken meanwhile by some outgoing connection's local port, and drawn at random, so that test
processes running side by side (pytest-xdist workers) seldom draw the same one."""


def free_port() -> int:
    """A port nobody listens on now (a test server that fails to bind it starts again elsewhere:
    see `RedisServer`)."""
    for _ in range(100):
        port = random.choice(PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(RuntimeError):
    """A test server could not bind the port it was given."""


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


class RedisServer:
    """A redis-server child process on a free port (never 6379), stopped by `stop`."""

    def __init__(self, *args: str, port: int | None = None, binary: str | None = None) -> None:
        self.binary = binary or REDIS_SERVER
        if self.binary is None:
            raise RuntimeError("redis-server is not on the PATH")
        self.dir = tempfile.mkdtemp(prefix="strands-dedup-redis-")
        self.unixsocket = os.path.join(self.dir, "redis.sock")
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        for attempt in range(5):
            self.port = port or free_port()
            try:
                self.start()
                return
            except PortTaken:
                # another process bound the port between free_port and the server's bind
                if port is not None or attempt == 4:
                    shutil.rmtree(self.dir, ignore_errors=True)
                    raise

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--unixsocket",
                self.unixsocket,
                "--unixsocketperm",
                "700",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            # Ready once its unix socket (in a directory of its own) accepts: the server listens
            # on it only after it bound the TCP port, and a server of someone else on that port
            # cannot pass for it.
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.2)
                sock.connect(self.unixsocket)
                return
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                bus = [self.port + 10000] if "--cluster-enabled" in self.args else []
                if any(port_in_use(p) for p in (self.port, *bus)):
                    raise PortTaken(f"port {self.port} was taken before redis-server bound it")
                raise RuntimeError(f"redis-server exited with {code}")
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not start within 10 s")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[RedisServer]:
    server = RedisServer(*args)
    try:
        yield server
    finally:
        server.close()


def node_command(port: int, *args: Any, timeout: float = 10) -> Any:
    """One command to the Redis on ``port`` over a short-lived connection (bytes decoded)."""
    client = redis.Redis(port=port, socket_timeout=timeout, socket_connect_timeout=1)
    try:
        reply = client.execute_command(*args)
    finally:
        client.close()
    return reply.decode() if isinstance(reply, bytes) else reply


def reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class SentinelSetup:
    """A Redis primary, one replica and three Sentinels watching them (service ``mymaster``),
    all on free ports; `close` stops them all."""

    SERVICE = "mymaster"

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not on the PATH")
        fast_sync = ("--repl-diskless-sync-delay", "0")
        self.primary = RedisServer(*fast_sync)
        self.replica = RedisServer(*fast_sync, "--replicaof", "127.0.0.1", str(self.primary.port))
        self.dir = tempfile.mkdtemp(prefix="strands-dedup-sentinel-")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        try:
            for port in self.sentinel_ports:
                conf = os.path.join(self.dir, f"sentinel-{port}.conf")
                with open(conf, "w") as out:
                    out.write(
                        f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                        f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                        f"sentinel failover-timeout {self.SERVICE} 4000\n"
                    )
                self.sentinels.append(
                    subprocess.Popen(
                        [REDIS_SERVER, conf, "--sentinel"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            self._wait_until_watching()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}"

    def primary_port(self) -> int | None:
        """The primary's port as the first Sentinel that answers sees it."""
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    addr = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE
                    )
                finally:
                    client.close()
                if addr:
                    return int(addr[1])
        return None

    def _wait_until_watching(self, timeout: float = 30) -> None:
        """Until the replica is in sync and every Sentinel knows the primary, the replica and
        the other Sentinels."""
        deadline = time.monotonic() + timeout
        replica = redis.Redis(port=self.replica.port, socket_timeout=1)
        try:
            while replica.info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not sync within 30 s")
                time.sleep(0.05)
        finally:
            replica.close()
        while time.monotonic() < deadline:
            ready = 0
            for port in self.sentinel_ports:
                with contextlib.suppress(redis.RedisError):
                    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
                    try:
                        replicas = client.execute_command("SENTINEL", "REPLICAS", self.SERVICE)
                        others = client.execute_command("SENTINEL", "SENTINELS", self.SERVICE)
                    finally:
                        client.close()
                    ready += bool(replicas) and len(others) >= 2
            if ready == len(self.sentinel_ports):
                return
            time.sleep(0.1)
        raise RuntimeError("the Sentinels did not discover each other within 30 s")

    def close(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.replica.close()
        self.primary.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is also free."""
    for _ in range(200):
        port = random.choice(CLUSTER_PORTS)
        if not port_in_use(port) and not port_in_use(port + 10000):
            return port
    raise RuntimeError("found no free port pair for a cluster node")


CLUSTER_PORTS = range(10000, 20000)
"""Where cluster nodes listen (their bus ports, +10000, stay below the ephemeral range too)."""


def cluster_node(*args: str) -> RedisServer:
    """A cluster-enabled redis-server on a free port pair (drawn again if another process took
    the pair before the server bound it)."""
    for attempt in range(5):
        port = free_cluster_port()
        try:
            return RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                *args,
                port=port,
            )
        except PortTaken:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


class ClusterSetup:
    """A Redis Cluster of three primaries and three replicas on free ports (``redis-cli --cluster
    create``), with a short node timeout so a replica takes over a killed primary within
    seconds; `close` stops every node."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, *args: str, primaries: int = 3, replicas_each: int = 1) -> None:
        if REDIS_SERVER is None or REDIS_CLI is None:
            raise RuntimeError("redis-server and redis-cli must be on the PATH")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(primaries * (1 + replicas_each)):
                self.nodes.append(
                    cluster_node(
                        "--cluster-node-timeout",
                        str(self.NODE_TIMEOUT_MS),
                        "--repl-diskless-sync-delay",
                        "0",
                        *args,
                    )
                )
            subprocess.run(
                [
                    REDIS_CLI,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    str(replicas_each),
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self.wait_until_healthy()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[:3])
        return f"redis+cluster://{hosts}/0"

    def _nodes_view(self) -> list[list[str]]:
        for node in self.nodes:
            if node.proc is None:
                continue
            with contextlib.suppress(redis.RedisError):
                text = node_command(node.port, "CLUSTER", "NODES", timeout=1)
                return [line.split() for line in text.splitlines() if line.strip()]
        return []

    def primary_port_for(self, key: bytes | str) -> int:
        """The port of the live primary serving ``key``'s hash slot."""
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for fields in self._nodes_view():
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags:
                continue
            for spec in fields[8:]:
                low, _, high = spec.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rpartition(":")[2])
        raise LookupError(f"no live primary serves slot {slot}")

    def node_id(self, port: int) -> str:
        return str(node_command(port, "CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, source: int, target: int) -> None:
        """Move ``slot`` with its keys from the primary on port ``source`` to ``target``
        (the steps of ``redis-cli --cluster reshard``, for one chosen slot)."""
        src_id, dst_id = self.node_id(source), self.node_id(target)
        node_command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        node_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := node_command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            node_command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source):
            node_command(port, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def primaries(self) -> list[int]:
        """Ports of the live primaries."""
        return [
            int(fields[1].split("@")[0].rpartition(":")[2])
            for fields in self._nodes_view()
            if "master" in fields[2].split(",") and "fail" not in fields[2]
        ]

    def fully_replicated(self) -> bool:
        """Every live primary has a replica online (a primary may be killed without data loss
        once its writes reached it)."""
        ports = self.primaries()
        if len(ports) < 3:
            return False
        for port in ports:
            with contextlib.suppress(redis.RedisError):
                info = node_command(port, "INFO", "replication", timeout=1)
                if any(
                    key.startswith("slave")
                    and isinstance(value, dict)
                    and value.get("state") == "online"
                    for key, value in info.items()
                ):
                    continue
            return False
        return True

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def wait_until_healthy(self, timeout: float = 30) -> None:
        """Until every live node reports ``cluster_state:ok`` and every slot has a primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            healthy = 0
            live = [node for node in self.nodes if node.proc is not None]
            for node in live:
                with contextlib.suppress(redis.RedisError):
                    info = node_command(node.port, "CLUSTER", "INFO", timeout=1)
                    healthy += "cluster_state:ok" in str(info)
            if healthy == len(live):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster was not healthy within {timeout:g} s")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def wait_http(url: str, deadline: float) -> None:
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code < 500:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up")
        time.sleep(0.05)  # polling a child process's port against a deadline


@contextlib.contextmanager
def process(args: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A child process (an HTTP server) that answers ``ready_url`` within 20 s; stopped after.

    Its stderr goes to a file (a pipe nobody reads would block it once full).
    """
    with processes([(args, ready_url)]) as started:
        yield started[0]


@contextlib.contextmanager
def processes(
    commands: list[tuple[list[str], str]],
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes (HTTP servers) started together, each answering its ready URL within
    20 s; stopped after (each one's stderr goes to a file)."""
    with contextlib.ExitStack() as stack:
        started: list[subprocess.Popen[bytes]] = []
        for args, _ in commands:
            log = stack.enter_context(tempfile.TemporaryFile())
            started.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log))
            stack.callback(_stop, started[-1])
        deadline = time.monotonic() + 20
        for _, ready_url in commands:
            wait_http(ready_url, deadline)
        yield started


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gateway_command(
    upstream: str, redis_url: str, namespace: str, port: int, *extra: str
) -> list[str]:
    """The command line of one `strands-dedup gateway` replica on ``port``."""
    return [
        sys.executable,
        "-m",
        "strands_dedup.cli",
        "gateway",
        "--upstream",
        upstream,
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--port",
        str(port),
        *extra,
    ]


def fake_agent_command(port: int, work: float) -> list[str]:
    """The command line of `strands-dedup fake-agent` on ``port``: a POST answers after ``work``
    seconds (five times that under ``/slow``), counted per Idempotency-Key at ``GET
    /executions``."""
    return [
        sys.executable,
        "-m",
        "strands_dedup.cli",
        "fake-agent",
        "--port",
        str(port),
        "--work",
        str(work),
    ]


@contextlib.contextmanager
def recording_upstream() -> Iterator[int]:
    """tests/recording_upstream.py on a free port (the port), stopped after."""
    port = free_port()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recording_upstream.py")
    with process([sys.executable, script, str(port)], f"http://127.0.0.1:{port}/seen"):
        yield port


@contextlib.contextmanager
def namespace_of_its_own(redis_url: str, prefix: str) -> Iterator[str]:
    """A fresh namespace (``<prefix>-<8 hex>``) whose keys are deleted on the way out."""
    import uuid

    ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
    try:
        yield ns
    finally:
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{ns}:*", count=10_000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        finally:
            client.close()
