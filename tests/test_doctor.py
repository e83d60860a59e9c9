"""`strands-dedup doctor`: the checks as functions of data, then the command against throwaway
redis-servers configured to pass or fail each check, and an unreachable port."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result
from servers import REDIS_SERVER, RedisServer, free_port, node_command, redis_server

from strands_dedup._store.facts import DRYRUN_ARGS, Facts, needed_commands, script_commands
from strands_dedup.cli import main
from strands_dedup.cli._doctor import Level, diagnose, exit_status, to_json

pytestmark = pytest.mark.timeout(60)
needs_server = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on the PATH")


def healthy(**changes: object) -> Facts:
    facts = Facts(
        "redis://db:6379/0",
        info={
            "redis_version": "7.4.2",
            "maxmemory_policy": "noeviction",
            "maxmemory": 0,
            "aof_enabled": 1,
            "role": "master",
            "connected_slaves": 1,
            "cluster_enabled": 0,
        },
        config={"save": "", "appendfsync": "everysec"},
        rtt_ms=[0.2] * 99 + [0.5],
        skew_ms=3.0,
        acl_user="app",
        acl_denied={},
    )
    for name, value in changes.items():
        setattr(facts, name, value)
    return facts


def levels(facts: Facts) -> dict[str, Level]:
    return {finding.check: finding.level for finding in diagnose(facts)}


def with_info(**info: object) -> Facts:
    facts = healthy()
    facts.info.update(info)
    return facts


def test_a_healthy_redis_passes_every_check() -> None:
    findings = diagnose(healthy())
    assert {f.level for f in findings} == {Level.OK}
    assert exit_status(findings) == 0
    replication = next(f for f in findings if f.check == "replication")
    assert replication.data["suggested_min_replicas"] == 1
    assert "min_replicas=1" in replication.summary


@pytest.mark.parametrize(
    ("policy", "maxmemory", "level"),
    [
        ("noeviction", 0, Level.OK),
        ("noeviction", 10**9, Level.OK),
        ("allkeys-lru", 10**9, Level.FAIL),
        ("allkeys-random", 10**9, Level.FAIL),
        ("volatile-ttl", 10**9, Level.FAIL),  # every key has a TTL
        ("volatile-lfu", 0, Level.WARN),  # nothing evicted until a limit is set
    ],
)
def test_anything_that_can_evict_the_keys_is_reported(
    policy: str, maxmemory: int, level: Level
) -> None:
    found = levels(with_info(maxmemory_policy=policy, maxmemory=maxmemory))["eviction"]
    assert found is level


@pytest.mark.parametrize(
    ("aof", "config", "level", "words"),
    [
        (1, {"appendfsync": "always"}, Level.OK, "no acknowledged write"),
        (1, {"appendfsync": "everysec"}, Level.OK, "last second"),
        (1, {"appendfsync": "no"}, Level.WARN, "kernel decides"),
        (0, {"save": "3600 1 300 100"}, Level.WARN, "since the last snapshot"),
        (0, {"save": ""}, Level.WARN, "restart forgets every lease"),
        (0, {}, Level.WARN, "could not be read"),
    ],
)
def test_persistence_says_what_each_choice_risks(
    aof: int, config: dict[str, str], level: Level, words: str
) -> None:
    facts = with_info(aof_enabled=aof)
    facts.config = config
    (finding,) = [f for f in diagnose(facts) if f.check == "persistence"]
    assert finding.level is level and words in finding.summary
    assert (finding.fix is None) == (level is Level.OK)


def test_replicas_cluster_latency_and_clock() -> None:
    assert levels(with_info(role="slave"))["replication"] is Level.FAIL
    assert levels(with_info(connected_slaves=0))["replication"] is Level.INFO
    assert exit_status(diagnose(with_info(connected_slaves=0))) == 0  # info is not a warning

    clustered = with_info(cluster_enabled=1)
    clustered.cluster = {"cluster_state": "ok", "cluster_slots_ok": "16384"}
    assert levels(clustered)["cluster"] is Level.OK
    clustered.cluster = {"cluster_state": "fail", "cluster_slots_ok": "16000"}
    assert levels(clustered)["cluster"] is Level.FAIL
    old = with_info(cluster_enabled=1, redis_version="6.2.14")
    old.cluster = {"cluster_state": "ok", "cluster_slots_ok": "16384"}
    (version,) = [f for f in diagnose(old) if f.check == "version"]
    assert version.level is Level.FAIL and "sharded pub/sub" in version.summary
    assert levels(with_info(redis_version="6.2.14"))["version"] is Level.WARN
    assert levels(with_info(redis_version="4.0.14"))["version"] is Level.FAIL

    assert levels(healthy(rtt_ms=[0.5] * 90 + [250.0] * 10))["latency"] is Level.WARN
    assert levels(healthy(skew_ms=-4000.0))["clock"] is Level.WARN


def test_acl_findings_name_the_missing_commands() -> None:
    (acl,) = [f for f in diagnose(healthy(acl_denied={"PUBLISH": "no"})) if f.check == "acl"]
    assert acl.level is Level.FAIL and "PUBLISH" in acl.summary
    assert acl.fix is not None and "ACL SETUSER app +publish" in acl.fix
    unknown = healthy(acl_denied=None, refused={"ACL": "NOPERM"})
    assert levels(unknown)["acl"] is Level.WARN


def test_unread_sections_are_warnings_not_crashes() -> None:
    facts = Facts("redis://db:6379/0", refused={"INFO server": "NOPERM"})
    findings = diagnose(facts)
    assert {f.level for f in findings} == {Level.WARN}
    assert "NOPERM" in findings[0].summary


def test_every_command_of_the_scripts_is_checked() -> None:
    assert script_commands() >= {"SET", "GET", "PEXPIRE", "XADD", "ZADD", "INCR", "TIME"}
    for cluster in (False, True):
        for name in needed_commands(cluster=cluster):
            assert name in DRYRUN_ARGS, name
    assert "SPUBLISH" in needed_commands(cluster=True)
    assert "PUBLISH" in needed_commands(cluster=False)


def test_json_shape() -> None:
    facts = healthy(acl_denied={"PUBLISH": "no"})
    document = json.loads(json.dumps(to_json(facts, diagnose(facts))))
    assert document["target"] == "redis://db:6379/0"
    assert document["status"] == "fail"
    assert [f["check"] for f in document["findings"]] == [
        "version",
        "eviction",
        "persistence",
        "replication",
        "cluster",
        "latency",
        "clock",
        "acl",
    ]
    for finding in document["findings"]:
        assert set(finding) == {"check", "level", "summary", "fix", "data"}
        assert finding["level"] in ("ok", "info", "warn", "fail")
    assert to_json(healthy(), diagnose(healthy()))["status"] == "ok"


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
