"""What `strands-dedup doctor` reads from a Redis: PING, INFO, CONFIG GET, CLUSTER INFO, TIME and
ACL DRYRUN, each command the credentials may not run recorded rather than raised (`Facts`).
The judging is in `strands_dedup.cli._doctor`, as plain functions of these facts."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aredis
import redis.exceptions

from .._config import DedupConfig
from .._keys import KeySchema
from .connect import client_from_url, describe_url

__all__ = ["DRYRUN_ARGS", "PINGS", "Facts", "needed_commands", "read_facts", "script_commands"]

PINGS = 100
"""Round trips timed for the latency check."""

# Arguments for ACL DRYRUN of each command the library sends: K is a key of the namespace, C a
# channel of the namespace. The Lua scripts' own commands are checked too: Redis applies the ACL
# to each command a script runs.
DRYRUN_ARGS: dict[str, tuple[str, ...]] = {
    "DEL": ("K",),
    "EXISTS": ("K",),
    "GET": ("K",),
    "HDEL": ("K", "f"),
    "HEXISTS": ("K", "f"),
    "HGET": ("K", "f"),
    "HGETALL": ("K",),
    "HINCRBY": ("K", "f", "1"),
    "HSET": ("K", "f", "v"),
    "HSTRLEN": ("K", "f"),
    "INCR": ("K",),
    "INCRBY": ("K", "1"),
    "PEXPIRE": ("K", "1000"),
    "PTTL": ("K",),
    "SET": ("K", "v", "NX", "PX", "1000"),
    "TIME": (),
    "XADD": ("K", "*", "f", "v"),
    "XRANGE": ("K", "-", "+"),
    "XREVRANGE": ("K", "+", "-"),
    "ZADD": ("K", "1", "m"),
    "ZCARD": ("K",),
    "ZRANGE": ("K", "0", "-1"),
    "ZRANGEBYSCORE": ("K", "0", "1"),
    "ZRANK": ("K", "m"),
    "ZREM": ("K", "m"),
    "ZREMRANGEBYSCORE": ("K", "0", "1"),
    "ZSCORE": ("K", "m"),
    "EVALSHA": ("0" * 40, "1", "K"),
    "EVAL": ("return 1", "1", "K"),
    "SCRIPT": ("LOAD", "return 1"),
    "PING": (),
    "CLIENT": ("SETNAME", "strands-dedup"),
    "PUBLISH": ("C", "m"),
    "SUBSCRIBE": ("C",),
    "SPUBLISH": ("C", "m"),
    "SSUBSCRIBE": ("C",),
}
_CLIENT_COMMANDS = (
    "EVALSHA",
    "EVAL",
    "SCRIPT",
    "PING",
    "CLIENT",
    "GET",
    "HGETALL",
    "XRANGE",
    "HSET",
    "PEXPIRE",
)


@dataclass(slots=True)
class Facts:
    """What `read_facts` could read; a missing section is in ``refused`` with the reason."""

    target: str
    info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)
    cluster: dict[str, Any] | None = None
    rtt_ms: list[float] = field(default_factory=list)
    skew_ms: float | None = None
    acl_user: str | None = None
    acl_denied: dict[str, str] | None = None
    """Command -> ACL DRYRUN's reason, for every command refused; None when not checked."""
    refused: dict[str, str] = field(default_factory=dict)
    """What could not be read -> the error (NOPERM, unknown command, ...)."""


def script_commands() -> set[str]:
    """The commands the Lua scripts run (each checked against the ACL)."""
    found: set[str] = set()
    for path in resources.files("strands_dedup._store").joinpath("lua").iterdir():
        if path.name.endswith(".lua"):
            found |= set(re.findall(r"redis\.p?call\('([A-Za-z]+)'", path.read_text("utf-8")))
    return {name.upper() for name in found}


def needed_commands(*, cluster: bool) -> list[str]:
    """Every command the library sends or its scripts run, for a cluster or a single Redis."""
    pubsub = ("SPUBLISH", "SSUBSCRIBE") if cluster else ("PUBLISH", "SUBSCRIBE")
    return sorted({*script_commands(), *_CLIENT_COMMANDS, *pubsub})


_REFUSED = (redis.exceptions.NoPermissionError, redis.exceptions.ResponseError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(reply: Any) -> dict[str, Any]:
    """``CLUSTER INFO``'s ``name:value`` lines (or redis-py's parsed dict of them)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    pairs = (line.partition(":") for line in _text(reply).splitlines() if ":" in line)
    return {name.strip(): value.strip() for name, _, value in pairs}


async def read_facts(
    url: str, namespace: str = "strands-dedup", *, pings: int = PINGS, timeout: float = 3.0
) -> Facts:
    """Read what `diagnose` needs from the Redis at ``url``.

    A command the credentials may not run (or the server does not know) is recorded in
    ``Facts.refused``; a connection that fails raises `redis.exceptions.ConnectionError` or
    `TimeoutError`.
    """
    config = DedupConfig.model_validate(
        {"namespace": namespace, "connect_timeout": timeout, "socket_timeout": timeout}
    )
    client = client_from_url(url, config, client_name="strands-dedup:doctor")
    facts = Facts(describe_url(url))
    try:
        cluster = isinstance(client, aredis.RedisCluster)
        if cluster:
            async with asyncio.timeout(timeout):
                await client.initialize()
        options: dict[str, Any] = (
            {"target_nodes": client.get_default_node()} if cluster else {}  # type: ignore[union-attr]
        )

        async def run(*args: Any) -> Any:
            async with asyncio.timeout(timeout):
                return await client.execute_command(*args, **options)

        for _ in range(pings):
            started = time.perf_counter()
            await run("PING")
            facts.rtt_ms.append((time.perf_counter() - started) * 1000)
        for section in ("server", "memory", "persistence", "replication", "cluster"):
            try:
                async with asyncio.timeout(timeout):
                    facts.info.update(await client.info(section, **options))
            except _REFUSED as exc:
                facts.refused[f"INFO {section}"] = str(exc)
        for name in ("save", "appendfsync", "maxmemory-policy"):
            try:
                reply = await run("CONFIG", "GET", name)
            except _REFUSED as exc:
                facts.refused[f"CONFIG GET {name}"] = str(exc)
                continue
            pairs = reply if isinstance(reply, list) else [x for kv in reply.items() for x in kv]
            values = dict(zip(map(_text, pairs[::2]), map(_text, pairs[1::2]), strict=True))
            if name in values:
                facts.config[name] = values[name]
        if int(facts.info.get("cluster_enabled", 0) or 0):
            try:
                facts.cluster = _fields(await run("CLUSTER INFO"))
            except _REFUSED as exc:
                facts.refused["CLUSTER INFO"] = str(exc)
        try:
            before = time.time()
            seconds, micros = await run("TIME")
            after = time.time()
            server = int(seconds) + int(micros) / 1e6
            facts.skew_ms = (server - (before + after) / 2) * 1000
        except _REFUSED as exc:
            facts.refused["TIME"] = str(exc)
        sharded = cluster or bool(int(facts.info.get("cluster_enabled", 0) or 0))
        await _read_acl(run, facts, namespace, cluster=sharded)
    finally:
        await client.aclose()
    return facts


async def _read_acl(run: Any, facts: Facts, namespace: str, *, cluster: bool) -> None:
    keys = KeySchema(namespace).for_token("strands-dedup-doctor")
    try:
        facts.acl_user = _text(await run("ACL", "WHOAMI"))
        denied: dict[str, str] = {}
        for name in needed_commands(cluster=cluster):
            args = [
                keys.lease if a == "K" else keys.channel if a == "C" else a
                for a in DRYRUN_ARGS[name]
            ]
            reply = _text(await run("ACL", "DRYRUN", facts.acl_user, name, *args))
            if reply != "OK":
                denied[name] = reply
        facts.acl_denied = denied
    except _REFUSED as exc:
        facts.refused["ACL"] = str(exc)
