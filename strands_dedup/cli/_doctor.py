"""`strands-dedup doctor`: does a Redis give what the guarantees need?

Two layers: `strands_dedup._store.facts.read_facts` reads a Redis (PING, INFO, CONFIG GET, CLUSTER
INFO, TIME, ACL DRYRUN), tolerating each command the credentials may not run; `diagnose` judges
those facts with plain functions of data, each `Finding` saying what it found, what that risks
and how to fix it.

Levels: ``ok``; ``info`` (worth knowing, not a risk to the guarantees); ``warn`` (a risk, or
something that could not be checked); ``fail`` (the guarantees do not hold). `exit_status`
is 0 when nothing is at ``warn`` or ``fail``, else 1.
"""

from __future__ import annotations

import enum
import re
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .._store.facts import Facts, read_facts

__all__ = [
    "Finding",
    "Level",
    "check_identity_secret",
    "diagnose",
    "exit_status",
    "read_facts",
    "to_json",
]

LATENCY_WARN_MS = 100.0
"""A p99 round trip above this is a warning: every claim and every completion is one."""
SKEW_WARN_MS = 1000.0
SECRET_ENV = "STRANDS_DEDUP_IDENTITY_SECRET"  # noqa: S105 - a variable name
SECRET_FILE_ENV = "STRANDS_DEDUP_IDENTITY_SECRET_FILE"  # noqa: S105 - a variable name


class Level(enum.StrEnum):
    """How a finding bears on the guarantees (see the module docstring)."""

    OK = "ok"
    INFO = "info"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's verdict: what was found, and how to fix it when it is not ``ok``."""

    check: str
    level: Level
    summary: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "level": self.level.value}


# -- judging: plain functions of the facts ---------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def check_version(facts: Facts) -> Finding:
    info = facts.info
    if "redis_version" not in info:
        return _unread("version", facts, "INFO server")
    server = str(info.get("server_name") or "redis")
    text = str(info.get("valkey_version") or info["redis_version"])
    version = _version(str(info["redis_version"]))
    cluster = bool(int(info.get("cluster_enabled", 0)))
    data = {"server": server, "version": text, "cluster": cluster}
    where = f"{server} {text}"
    if version < (5, 0):
        return Finding(
            "version",
            Level.FAIL,
            f"{where}: the scripts need Redis 5.0 or later (streams, script effects replication)",
            "upgrade to Redis 7 or Valkey 7.2 or later",
            data,
        )
    if cluster and version < (7, 0):
        return Finding(
            "version",
            Level.FAIL,
            f"{where} in cluster mode: waiters are woken by sharded pub/sub (SPUBLISH, "
            "SSUBSCRIBE), which needs Redis 7.0",
            "upgrade the cluster to Redis 7 or Valkey 7.2 or later",
            data,
        )
    if version < (7, 0):
        return Finding(
            "version",
            Level.WARN,
            f"{where}: works on a single Redis or behind Sentinel, but the tests run on Redis 7 "
            "and Valkey 8, and a move to Redis Cluster would need 7.0 (sharded pub/sub)",
            "upgrade to Redis 7 or Valkey 7.2 or later",
            data,
        )
    features = "sharded pub/sub (SPUBLISH, SSUBSCRIBE)" if cluster else "pub/sub, Lua, streams"
    return Finding("version", Level.OK, f"{where}: has every feature used ({features})", None, data)


def check_path(facts: Facts) -> Finding:
    """Which commands this server gets for each step of a call."""
    info = facts.info
    if "redis_version" not in info:
        return _unread("path", facts, "INFO server")
    server = str(info.get("server_name") or "redis")
    version = _version(str(info.get("valkey_version") or info["redis_version"]))
    native = version >= ((8, 1) if server == "valkey" else (8, 4))
    data = {
        "replay": "GET while replays are common, else EVALSHA claim.lua",
        "claim": "EVALSHA claim.lua (after a GET while replays are common)",
        "complete": "EVALSHA settle.lua",
        "renew": "EVALSHA renew.lua (one call for every lease a process holds)",
        "native_conditional_set": native,
    }
    summary = (
        "a fresh call sends the claim script, then the settle script (fenced, one round trip "
        "each); while replays are common a claim reads the result with a plain GET first, so a "
        "replay runs no script; renewals are one script call per period for every lease of a "
        "process"
    )
    if native:
        summary += (
            "; this server has a conditional SET (SET ... IFEQ), which this version does not use "
            "yet: the scripts run everywhere"
        )
    return Finding("path", Level.OK, summary, None, data)


def check_eviction(facts: Facts) -> Finding:
    policy = facts.info.get("maxmemory_policy") or facts.config.get("maxmemory-policy")
    if policy is None:
        return _unread("eviction", facts, "INFO memory")
    maxmemory = int(facts.info.get("maxmemory", 0) or 0)
    data = {"maxmemory_policy": policy, "maxmemory": maxmemory}
    fix = (
        "CONFIG SET maxmemory-policy noeviction (and maxmemory-policy noeviction in redis.conf), "
        "and size maxmemory for the leases and results you keep"
    )
    if policy == "noeviction":
        return Finding(
            "eviction",
            Level.OK,
            "noeviction: no lease, fence or result is ever dropped to free memory; when memory "
            "is full, writes fail with an error instead",
            None,
            data,
        )
    risk = (
        "every key strands-dedup writes has a TTL, so volatile-* policies evict them as "
        "readily as allkeys-* ones: an evicted lease lets a duplicate run the call again, an "
        "evicted result makes a retry run again, an evicted fence un-fences a late primary"
    )
    if maxmemory == 0:
        return Finding(
            "eviction",
            Level.WARN,
            f"{policy} with no maxmemory: nothing is evicted yet, but once a limit is set {risk}",
            fix,
            data,
        )
    return Finding("eviction", Level.FAIL, f"{policy}: {risk}", fix, data)


def check_persistence(facts: Facts) -> Finding:
    info = facts.info
    if "aof_enabled" not in info:
        return _unread("persistence", facts, "INFO persistence")
    aof = bool(int(info["aof_enabled"]))
    save = facts.config.get("save")
    fsync = facts.config.get("appendfsync")
    data = {"aof": aof, "appendfsync": fsync, "save": save}
    if aof:
        if fsync == "always":
            return Finding(
                "persistence",
                Level.OK,
                "append-only file, fsync always: a crash loses no acknowledged write",
                None,
                data,
            )
        if fsync == "everysec":
            return Finding(
                "persistence",
                Level.OK,
                "append-only file, fsync every second: a crash loses at most about the last "
                "second of claims, results and fences (those calls can run again)",
                None,
                data,
            )
        return Finding(
            "persistence",
            Level.WARN,
            f"append-only file, appendfsync {fsync or 'unknown (CONFIG GET refused)'}: the "
            "kernel decides when writes reach the disk, so a crash can lose an unknown span "
            "of claims, results and fences",
            "CONFIG SET appendfsync everysec (or always)",
            data,
        )
    fix = "CONFIG SET appendonly yes and CONFIG SET appendfsync everysec (and in redis.conf)"
    if save is None:
        return Finding(
            "persistence",
            Level.WARN,
            "no append-only file, and the RDB schedule could not be read (CONFIG GET "
            "refused): a restart may forget leases, results and fences",
            fix,
            data,
        )
    if save.strip():
        return Finding(
            "persistence",
            Level.WARN,
            f"RDB snapshots only (save {save!r}): a crash forgets every claim, result and fence "
            "written since the last snapshot; those calls can run again, and a fence counter "
            "that goes back no longer stops a late primary from storing its result",
            fix,
            data,
        )
    return Finding(
        "persistence",
        Level.WARN,
        "none: a restart forgets every lease, stored result and fence counter; completed calls "
        "run again on retry, and calls in flight can run twice",
        fix,
        data,
    )


def check_replication(facts: Facts) -> Finding:
    info = facts.info
    if "role" not in info:
        return _unread("replication", facts, "INFO replication")
    role = str(info["role"])
    replicas = int(info.get("connected_slaves", 0) or 0)
    data = {"role": role, "replicas": replicas}
    if role != "master":
        return Finding(
            "replication",
            Level.FAIL,
            "this is a replica: it refuses the scripts' writes (READONLY)",
            "point --redis-url at the primary, or at the Sentinels (redis+sentinel://...)",
            data,
        )
    if replicas == 0:
        return Finding(
            "replication",
            Level.INFO,
            "no replica: losing this host loses everything its persistence does not keep, and "
            "nothing takes over while it is down",
            "for failover, add a replica and Sentinels (redis+sentinel://) or a cluster",
            data,
        )
    return Finding(
        "replication",
        Level.OK,
        f"{replicas} replica(s): replication is asynchronous, so a failover can lose the "
        "last writes; min_replicas=1 makes each claim and completion WAIT for one replica "
        "(one more round trip each)",
        None,
        {**data, "suggested_min_replicas": 1},
    )


def check_cluster(facts: Facts) -> Finding:
    if "cluster_enabled" not in facts.info:
        return _unread("cluster", facts, "INFO cluster")
    if not int(facts.info["cluster_enabled"]):
        return Finding("cluster", Level.OK, "standalone (not a cluster)", None, {"enabled": False})
    if facts.cluster is None:
        return _unread("cluster", facts, "CLUSTER INFO")
    state = str(facts.cluster.get("cluster_state"))
    data = {
        "enabled": True,
        "state": state,
        "slots_ok": int(facts.cluster.get("cluster_slots_ok", 0)),
        "known_nodes": int(facts.cluster.get("cluster_known_nodes", 0)),
    }
    if state != "ok" or data["slots_ok"] != 16384:
        return Finding(
            "cluster",
            Level.FAIL,
            f"cluster state {state}, {data['slots_ok']} of 16384 slots served: tokens in the "
            "other slots fail",
            "repair the cluster: redis-cli --cluster check / fix",
            data,
        )
    return Finding("cluster", Level.OK, "cluster state ok, every slot served", None, data)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_latency(facts: Facts) -> Finding:
    if not facts.rtt_ms:
        return _unread("latency", facts, "PING")
    p50, p99 = statistics.median(facts.rtt_ms), _percentile(facts.rtt_ms, 0.99)
    data = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "samples": len(facts.rtt_ms)}
    summary = f"round trip p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(facts.rtt_ms)} PINGs"
    if p99 > LATENCY_WARN_MS:
        return Finding(
            "latency",
            Level.WARN,
            f"{summary}: every claim and every completion costs one round trip",
            "run the deduplicators close to Redis (same zone); check Redis's own load "
            "(LATENCY DOCTOR, SLOWLOG GET)",
            data,
        )
    return Finding("latency", Level.OK, summary, None, data)


def check_clock(facts: Facts) -> Finding:
    if facts.skew_ms is None:
        return _unread("clock", facts, "TIME")
    data = {"skew_ms": round(facts.skew_ms, 3)}
    summary = f"this host's clock is {facts.skew_ms:+.1f} ms from Redis's"
    if abs(facts.skew_ms) > SKEW_WARN_MS:
        return Finding(
            "clock",
            Level.WARN,
            f"{summary}: leases and TTLs run on Redis's clock, so the guarantees hold, but the "
            "ages that `ls` and `show` report compare host clocks and will be off",
            "synchronize the hosts' clocks (NTP, chrony)",
            data,
        )
    return Finding("clock", Level.OK, summary + " (leases run on Redis's clock)", None, data)


def check_acl(facts: Facts) -> Finding:
    if facts.acl_denied is None:
        reason = facts.refused.get("ACL", "not checked")
        return Finding(
            "acl",
            Level.WARN,
            f"could not check the permissions the scripts need ({reason})",
            "as an admin, run ACL DRYRUN <user> <command> <key> for EVALSHA, the scripts' "
            "commands and PUBLISH/SUBSCRIBE, or run doctor with Redis 7 and a user allowed "
            "ACL DRYRUN",
            {"user": facts.acl_user},
        )
    data = {"user": facts.acl_user, "denied": facts.acl_denied}
    if facts.acl_denied:
        names = " ".join(sorted(facts.acl_denied))
        return Finding(
            "acl",
            Level.FAIL,
            f"user {facts.acl_user!r} may not run: {names}; calls fail with NOPERM",
            f"ACL SETUSER {facts.acl_user} "
            + " ".join(f"+{n.lower()}" for n in sorted(facts.acl_denied))
            + " (and key and channel patterns covering the namespace)",
            data,
        )
    return Finding(
        "acl",
        Level.OK,
        f"user {facts.acl_user!r} may run every command the library and its scripts send",
        None,
        data,
    )


def check_identity_secret(environ: Mapping[str, str]) -> Finding:
    """The HTTP surfaces' identity secret, as this environment gives it to a gateway: without
    one, credentials are digested with a public key (a finding of the environment, not of
    Redis: ``info`` when missing, as an application may name its own in code)."""
    inline, path = environ.get(SECRET_ENV), environ.get(SECRET_FILE_ENV)
    data: dict[str, Any] = {"variable": SECRET_ENV if inline else None, "file": path}
    if path:
        try:
            with open(path, encoding="utf-8") as file:
                readable = bool(file.read().strip())
        except (OSError, UnicodeDecodeError):
            readable = False
        if not readable:
            return Finding(
                "identity",
                Level.WARN,
                f"{SECRET_FILE_ENV} names {path}, which cannot be read or is empty: a gateway "
                "started here refuses to start",
                f"put the secret in {path}, readable by the gateway's user",
                data,
            )
    if inline or path:
        return Finding(
            "identity",
            Level.OK,
            "an identity secret is configured: credentials are digested with a key of yours",
            None,
            data,
        )
    return Finding(
        "identity",
        Level.INFO,
        f"no identity secret in this environment ({SECRET_ENV}, {SECRET_FILE_ENV}): a gateway "
        "started here digests callers' credentials with a public key, so whoever reads Redis "
        "can test guesses of short credentials against the keys' scopes",
        f"set {SECRET_FILE_ENV} (or the gateway's --identity-secret-file) to a file holding a "
        "long random secret, the same on every replica",
        data,
    )


def _unread(check: str, facts: Facts, what: str) -> Finding:
    reason = facts.refused.get(what, "no answer")
    return Finding(
        check,
        Level.WARN,
        f"could not read {what} ({reason}), so this was not checked",
        f"run doctor with credentials allowed {what}",
    )


CHECKS = (
    check_version,
    check_path,
    check_eviction,
    check_persistence,
    check_replication,
    check_cluster,
    check_latency,
    check_clock,
    check_acl,
)


def diagnose(facts: Facts) -> list[Finding]:
    """Every check's finding, in a fixed order."""
    return [check(facts) for check in CHECKS]


def exit_status(findings: list[Finding]) -> int:
    """0 when nothing is at ``warn`` or ``fail``, else 1."""
    return 1 if any(f.level in (Level.WARN, Level.FAIL) for f in findings) else 0


def to_json(facts: Facts, findings: list[Finding]) -> dict[str, Any]:
    """``doctor --json``: the target, the worst level (``ok`` when nothing is above ``info``)
    and every finding."""
    worst = max((list(Level).index(f.level) for f in findings), default=0)
    status = Level.OK if worst <= list(Level).index(Level.INFO) else list(Level)[worst]
    return {
        "target": facts.target,
        "status": status.value,
        "findings": [f.to_json() for f in findings],
    }
