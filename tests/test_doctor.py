"""`strands-dedup doctor`: the checks against a scripted Redis (a few lines of RESP that answer
what each case needs: versions, policies, clocks and latencies no test server can be made to
have), then the command against throwaway redis-servers configured to pass or fail each check,
and an unreachable port. Everything goes through the command and its ``--json``."""

from __future__ import annotations

import json
import re
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from servers import REDIS_SERVER, RedisServer, free_port, node_command, redis_server

import strands_dedup
from strands_dedup.cli import main

pytestmark = pytest.mark.timeout(60)
needs_server = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on the PATH")
CHECKS = [
    "version",
    "path",
    "eviction",
    "persistence",
    "replication",
    "cluster",
    "latency",
    "clock",
    "acl",
]


@dataclass
class Scripted:
    """What the scripted Redis answers."""

    info: dict[str, object] = field(
        default_factory=lambda: {
            "redis_version": "7.4.2",
            "maxmemory_policy": "noeviction",
            "maxmemory": 0,
            "aof_enabled": 1,
            "role": "master",
            "connected_slaves": 1,
            "cluster_enabled": 0,
        }
    )
    config: dict[str, str] = field(default_factory=lambda: {"save": "", "appendfsync": "everysec"})
    cluster: dict[str, str] = field(default_factory=dict)
    skew_s: float = 0.0
    """How far its clock (TIME) is from this host's."""
    slow_pings: int = 0
    """How many of the last PINGs take 250 ms."""
    user: str = "app"
    denied: set[str] = field(default_factory=set)
    """Commands ACL DRYRUN says the user may not run."""
    refused: set[str] = field(default_factory=set)
    """Commands answered NOPERM: ``INFO <section>``, ``CONFIG``, ``TIME``, ``ACL``."""
    dryrun: list[str] = field(default_factory=list)
    """The commands asked about with ACL DRYRUN, in order."""
    pings: int = 0


def _bulk(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return b"$%d\r\n%s\r\n" % (len(raw), raw)


def _array(items: list[str]) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(_bulk(item) for item in items)


class _Resp(socketserver.StreamRequestHandler):
    server: _ScriptedServer

    def handle(self) -> None:
        while line := self.rfile.readline():
            args = []
            for _ in range(int(line[1:])):
                size = int(self.rfile.readline()[1:])
                args.append(self.rfile.read(size + 2)[:-2].decode())
            self.wfile.write(self.server.answer(args))


class _ScriptedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, script: Scripted) -> None:
        super().__init__(("127.0.0.1", 0), _Resp)
        self.script = script

    def answer(self, args: list[str]) -> bytes:
        script = self.script
        name = " ".join(args[:2]).upper() if args[0].upper() in ("INFO", "ACL") else args[0]
        if args[0].upper() == "INFO" and f"INFO {args[1]}" in script.refused:
            return b"-NOPERM this user has no permissions to run the 'info' command\r\n"
        if name.split()[0].upper() in script.refused or name.upper() in script.refused:
            return b"-NOPERM this user has no permissions to run this command\r\n"
        command = args[0].upper()
        if command == "CLIENT":
            return b"+OK\r\n"
        if command == "PING":
            script.pings += 1
            if script.pings > 100 - script.slow_pings:
                time.sleep(0.25)
            return b"+PONG\r\n"
        if command == "INFO":
            lines = [f"{key}:{value}" for key, value in script.info.items()]
            return _bulk("\r\n".join([f"# {args[1]}", *lines]) + "\r\n")
        if command == "CONFIG":
            wanted = args[2]
            return _array([wanted, script.config[wanted]] if wanted in script.config else [])
        if command == "CLUSTER":
            return _bulk("".join(f"{k}:{v}\r\n" for k, v in script.cluster.items()))
        if command == "TIME":
            now = time.time() + script.skew_s
            return _array([str(int(now)), str(int(now % 1 * 1e6))])
        if command == "ACL" and args[1].upper() == "WHOAMI":
            return _bulk(script.user)
        if command == "ACL" and args[1].upper() == "DRYRUN":
            asked = args[3].upper()
            script.dryrun.append(asked)
            if asked in script.denied:
                return _bulk(f"User {script.user} has no permissions to run the '{asked}' command")
            return b"+OK\r\n"
        return b"-ERR unknown command\r\n"


def scripted_doctor(script: Scripted) -> tuple[Result, dict[str, dict[str, Any]]]:
    """`doctor --json` against a Redis that answers as ``script`` says; its findings by check."""
    script.pings, script.dryrun = 0, []  # this run's
    server = _ScriptedServer(script)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        result = doctor(f"redis://127.0.0.1:{port}/0")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    document = json.loads(result.output)
    assert document["target"] == f"redis://127.0.0.1:{port}/0"
    return result, {f["check"]: f for f in document["findings"]}


def levels(script: Scripted) -> dict[str, str]:
    return {name: f["level"] for name, f in scripted_doctor(script)[1].items()}


def with_info(**info: object) -> Scripted:
    script = Scripted()
    script.info.update(info)
    return script


def latency_level(found: dict[str, dict[str, Any]]) -> str:
    """The latency finding's level as the measured p99 decides it (100 ms): this host's round
    trips to the scripted Redis, which a loaded machine may stall."""
    return "warn" if found["latency"]["data"]["p99_ms"] > 100 else "ok"


def test_a_healthy_redis_passes_every_check() -> None:
    result, found = scripted_doctor(Scripted())
    assert found["latency"]["level"] == latency_level(found)
    assert {f["level"] for name, f in found.items() if name not in ("latency", "identity")} == {
        "ok"
    }
    assert result.exit_code == (0 if found["latency"]["level"] == "ok" else 1)
    replication = found["replication"]
    assert replication["data"]["suggested_min_replicas"] == 1
    assert "min_replicas=1" in replication["summary"]


@pytest.mark.parametrize(
    ("policy", "maxmemory", "level"),
    [
        ("noeviction", 0, "ok"),
        ("noeviction", 10**9, "ok"),
        ("allkeys-lru", 10**9, "fail"),
        ("allkeys-random", 10**9, "fail"),
        ("volatile-ttl", 10**9, "fail"),  # every key has a TTL
        ("volatile-lfu", 0, "warn"),  # nothing evicted until a limit is set
    ],
)
def test_anything_that_can_evict_the_keys_is_reported(
    policy: str, maxmemory: int, level: str
) -> None:
    found = levels(with_info(maxmemory_policy=policy, maxmemory=maxmemory))["eviction"]
    assert found == level


@pytest.mark.parametrize(
    ("aof", "config", "level", "words"),
    [
        (1, {"appendfsync": "always"}, "ok", "no acknowledged write"),
        (1, {"appendfsync": "everysec"}, "ok", "last second"),
        (1, {"appendfsync": "no"}, "warn", "kernel decides"),
        (0, {"save": "3600 1 300 100"}, "warn", "since the last snapshot"),
        (0, {"save": ""}, "warn", "restart forgets every lease"),
        (0, {}, "warn", "could not be read"),
    ],
)
def test_persistence_says_what_each_choice_risks(
    aof: int, config: dict[str, str], level: str, words: str
) -> None:
    script = with_info(aof_enabled=aof)
    script.config = config
    finding = scripted_doctor(script)[1]["persistence"]
    assert finding["level"] == level and words in finding["summary"]
    assert (finding["fix"] is None) == (level == "ok")


def test_replicas_cluster_latency_and_clock() -> None:
    assert levels(with_info(role="slave"))["replication"] == "fail"
    lonely, found = scripted_doctor(with_info(connected_slaves=0))
    assert found["replication"]["level"] == "info"
    if latency_level(found) == "ok":
        assert lonely.exit_code == 0  # info is not a warning

    clustered = with_info(cluster_enabled=1)
    clustered.cluster = {"cluster_state": "ok", "cluster_slots_ok": "16384"}
    assert levels(clustered)["cluster"] == "ok"
    clustered.cluster = {"cluster_state": "fail", "cluster_slots_ok": "16000"}
    assert levels(clustered)["cluster"] == "fail"
    old = with_info(cluster_enabled=1, redis_version="6.2.14")
    old.cluster = {"cluster_state": "ok", "cluster_slots_ok": "16384"}
    version = scripted_doctor(old)[1]["version"]
    assert version["level"] == "fail" and "sharded pub/sub" in version["summary"]
    assert levels(with_info(redis_version="6.2.14"))["version"] == "warn"
    assert levels(with_info(redis_version="4.0.14"))["version"] == "fail"

    slow = scripted_doctor(Scripted(slow_pings=10))[1]["latency"]
    assert slow["level"] == "warn" and slow["data"]["p99_ms"] >= 250
    assert levels(Scripted(skew_s=-4.0))["clock"] == "warn"


def test_acl_findings_name_the_missing_commands() -> None:
    acl = scripted_doctor(Scripted(denied={"PUBLISH"}))[1]["acl"]
    assert acl["level"] == "fail" and "PUBLISH" in acl["summary"]
    assert acl["fix"] is not None and "ACL SETUSER app +publish" in acl["fix"]
    assert levels(Scripted(refused={"ACL"}))["acl"] == "warn"


def test_unread_sections_are_warnings_not_crashes() -> None:
    sections = {f"INFO {s}" for s in ("server", "memory", "persistence", "replication", "cluster")}
    result, found = scripted_doctor(Scripted(refused={*sections, "CONFIG", "TIME", "ACL"}))
    assert result.exit_code == 1
    # every check but the round trips (PING is always answered) could not read its facts
    assert {found[name]["level"] for name in CHECKS if name != "latency"} == {"warn"}
    assert "INFO server" in found["version"]["summary"]
    assert "no permissions" in found["version"]["summary"]  # the server's refusal, told


def test_every_command_of_the_scripts_is_checked() -> None:
    lua = Path(strands_dedup.__file__).parent / "_store" / "lua"
    scripts = {
        name.upper()
        for path in lua.glob("*.lua")
        for name in re.findall(r"redis\.p?call\('([A-Za-z]+)'", path.read_text("utf-8"))
    }
    assert scripts >= {"SET", "GET", "PEXPIRE", "XADD", "ZADD", "INCR", "TIME"}
    single, clustered = Scripted(), with_info(cluster_enabled=1)
    clustered.cluster = {"cluster_state": "ok", "cluster_slots_ok": "16384"}
    for script in (single, clustered):
        acl = scripted_doctor(script)[1]["acl"]
        assert acl["level"] == "ok", acl  # every command asked about, none refused
        assert set(script.dryrun) >= scripts
    assert "SPUBLISH" in clustered.dryrun and "PUBLISH" not in clustered.dryrun
    assert "PUBLISH" in single.dryrun and "SPUBLISH" not in single.dryrun


def test_json_shape() -> None:
    result, _ = scripted_doctor(Scripted(denied={"PUBLISH"}))
    document = json.loads(result.output)
    assert document["status"] == "fail"
    assert [f["check"] for f in document["findings"]] == [*CHECKS, "identity"]
    for finding in document["findings"]:
        assert set(finding) == {"check", "level", "summary", "fix", "data"}
        assert finding["level"] in ("ok", "info", "warn", "fail")
    healthy, found = scripted_doctor(Scripted())
    expected = "ok" if latency_level(found) == "ok" else "warn"
    environment = found["identity"]["level"]  # this environment's identity secret: ok or info
    assert json.loads(healthy.output)["status"] == expected and environment in ("ok", "info")


# -- against real servers --------------------------------------------------------------------


def doctor(url: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", "--redis-url", url, "--json", *args])


def findings(result: Result) -> dict[str, dict[str, object]]:
    return {f["check"]: f for f in json.loads(result.output)["findings"]}


@pytest.fixture
def safe_server() -> Iterator[RedisServer]:
    with redis_server(
        "--maxmemory-policy", "noeviction", "--appendonly", "yes", "--appendfsync", "everysec"
    ) as server:
        yield server


@needs_server
def test_a_well_configured_server_exits_0(safe_server: RedisServer) -> None:
    result = doctor(safe_server.url)
    found = findings(result)
    # The round trip's p99 is this host's (one stalled PING of 100 makes it a warning): every
    # other finding is the server's configuration, and decides the exit code here.
    latency_ok = found["latency"]["level"] == "ok"
    assert result.exit_code == (0 if latency_ok else 1), result.output
    assert all(f["level"] in ("ok", "info") for name, f in found.items() if name != "latency")
    assert found["eviction"]["level"] == "ok"
    assert found["persistence"]["level"] == "ok"
    assert found["replication"]["level"] == "info"  # no replica: noted, not a warning
    assert found["acl"]["level"] == "ok"
    assert found["latency"]["data"]["samples"] == 100  # type: ignore[index]


@needs_server
def test_an_evicting_server_without_persistence_exits_1() -> None:
    with redis_server("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as server:
        result = doctor(server.url)
        text = CliRunner().invoke(main, ["doctor", "--redis-url", server.url])
    assert result.exit_code == 1
    found = findings(result)
    assert found["eviction"]["level"] == "fail"
    assert found["persistence"]["level"] == "warn"
    assert text.exit_code == 1
    assert "allkeys-lru" in text.output and "fix: CONFIG SET maxmemory-policy noeviction" in (
        " ".join(text.output.split())
    )


@needs_server
def test_replicas_are_counted_and_a_replica_is_refused(safe_server: RedisServer) -> None:
    with redis_server("--replicaof", "127.0.0.1", str(safe_server.port)) as replica:
        deadline = time.monotonic() + 20
        while node_command(safe_server.port, "INFO", "replication")["connected_slaves"] < 1:
            assert time.monotonic() < deadline, "the replica never connected"
            time.sleep(0.05)  # waiting for a child redis-server to sync, against a deadline
        on_primary = findings(doctor(safe_server.url))["replication"]
        on_replica = doctor(replica.url)
    assert on_primary["level"] == "ok"
    assert on_primary["data"] == {"role": "master", "replicas": 1, "suggested_min_replicas": 1}
    assert on_replica.exit_code == 1
    assert findings(on_replica)["replication"]["level"] == "fail"


@needs_server
def test_a_user_lacking_a_permission_is_told_which(safe_server: RedisServer) -> None:
    port = safe_server.port
    node_command(port, "ACL", "SETUSER", "nopub", "on", ">pw", "~*", "&*", "+@all", "-publish")
    node_command(port, "ACL", "SETUSER", "noadmin", "on", ">pw", "~*", "&*", "+@all", "-@admin")
    lacking = doctor(f"redis://nopub:pw@127.0.0.1:{port}/0")
    blind = doctor(f"redis://noadmin:pw@127.0.0.1:{port}/0")
    assert lacking.exit_code == 1
    acl = findings(lacking)["acl"]
    assert acl["level"] == "fail" and acl["data"]["user"] == "nopub"  # type: ignore[index]
    assert set(acl["data"]["denied"]) == {"PUBLISH"}  # type: ignore[index]
    assert blind.exit_code == 1  # no ACL DRYRUN, no CONFIG GET: said, not crashed
    found = findings(blind)
    assert found["acl"]["level"] == "warn" and "could not check" in str(found["acl"]["summary"])
    assert found["eviction"]["level"] == "ok"  # INFO is still allowed


def test_an_unreachable_port_exits_3_at_once() -> None:
    started = time.monotonic()
    result = doctor(f"redis://127.0.0.1:{free_port()}/0")
    assert result.exit_code == 3
    assert "cannot reach Redis" in result.output
    assert time.monotonic() - started < 5


def test_memory_urls_are_refused() -> None:
    assert doctor("memory://").exit_code == 2


def test_doctor_says_which_commands_each_step_of_a_call_gets() -> None:
    _, found = scripted_doctor(Scripted())
    path = found["path"]
    assert path["level"] == "ok"
    assert path["data"]["replay"].startswith("GET")
    assert "settle.lua" in path["data"]["complete"]
    assert path["data"]["native_conditional_set"] is False
    assert "IFEQ" not in path["summary"]
    _, found = scripted_doctor(with_info(server_name="valkey", valkey_version="9.1.2"))
    assert found["path"]["data"]["native_conditional_set"] is True
    assert "IFEQ" in found["path"]["summary"]
    _, found = scripted_doctor(with_info(redis_version="8.4.0"))
    assert found["path"]["data"]["native_conditional_set"] is True
