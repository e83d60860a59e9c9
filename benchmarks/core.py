"""Latency of the core paths against the raw Redis round trip they are built on.

Run from the repository root::

    python -m benchmarks.core                       # throwaway redis-server on a free port
    python -m benchmarks.core --redis-url redis://127.0.0.1:6379/0
    python -m benchmarks.core --cluster             # throwaway 3+3-node Redis Cluster

In one run, on one Redis and one event loop, it measures:

floor
    A raw redis-py asyncio ``SET key val NX PX 30000`` on a fresh key, over a client with the
    options the library gives its own (same pool bound, timeouts, RESP2, no retries; hiredis
    when installed), called directly.
fresh
    ``await dedup.execute(new_token, call)``, one call at a time: claim, run a trivial
    ``async def`` returning a small dict, store the result and publish it.
replay
    ``await dedup.execute(token, call)`` on a token whose result is already stored.
wake N
    N duplicates (N + 1 calls in all) wait on one token while its primary's call awaits an
    `asyncio.Event`. Once all N are parked on the shared subscriber, ``t0 = time.perf_counter()``
    is taken right before the event is set; each waiter's ``execute`` return time is measured
    from ``t0``. Reported: the last waiter (everyone woken), the median waiter, the primary's own
    return, and the garbage collector's pauses inside that window.

Floor, fresh and replay are measured in interleaved blocks so that drift of the machine affects
them alike. A table goes to stdout, progress to stderr, and everything (with the environment) to
``benchmarks/results/core-latest.json``, with the share of CPU time the hypervisor stole during
the run (on a shared host, compare ratios rather than absolute times). The namespace is unique
per run; its keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

import strands_dedup
from benchmarks._common import describe_url
from benchmarks._common import floor_client as plain_client
from strands_dedup import Deduplicator, Role

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "core-latest.json"
CLUSTER_JSON = ROOT / "benchmarks" / "results" / "core-cluster-latest.json"

LEASE_TTL = 30.0
MAX_CONNECTIONS = 32
BLOCK = 10  # samples per scenario per interleaved round (fine-grained against drift)
WARMUP = 200  # untimed calls per scenario before measuring

# The project's latency targets.
FRESH_TARGET_RATIO = 2.5  # fresh call median <= 2.5 x floor median
REPLAY_TARGET_RATIO = 1.3  # replay median <= 1.3 x floor median
WAKE_TARGET_WAITERS = 10_000
WAKE_TARGET_MS = 100.0  # 10,000 waiters all woken within 100 ms of the completion


_STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]) of a non-empty sample."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "p90": quantile(values, 0.90),
        "p99": quantile(values, 0.99),
        "max": max(values),
    }


# -- the scenarios ------------------------------------------------------------------------------


async def work() -> dict[str, Any]:
    """The deduplicated call: trivial, so only the library's own cost is measured."""
    return {"status": "ok", "answer": 42}


def floor_client(url: str) -> aredis.Redis | aredis.RedisCluster:
    """A plain redis-py asyncio client with the options the library gives its own.

    Same pool bound, timeouts, RESP2 and no client-side retries; hiredis parses replies when it
    is installed. Commands go to it directly, with none of the library's code in between.
    """
    client: aredis.Redis | aredis.RedisCluster = plain_client(
        url, MAX_CONNECTIONS, "strands-dedup-bench:floor"
    )
    return client


@dataclass
class Sequential:
    """Per-call latencies (µs) of the sequential scenarios."""

    floor: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    replay: list[float] = field(default_factory=list)


async def timed_block(
    samples: list[float], count: int, op: Callable[[int], Awaitable[Any]], start: int
) -> None:
    clock = time.perf_counter_ns
    for i in range(start, start + count):
        t = clock()
        await op(i)
        samples.append((clock() - t) / 1000)


async def run_sequential(
    client: aredis.Redis, dedup: Deduplicator, ns: str, iterations: int
) -> Sequential:
    run_id = uuid.uuid4().hex[:8]
    completed: list[str] = []

    async def floor_op(i: int) -> None:
        ok = await client.set(f"{ns}:floor:{run_id}:{i}", b"1", nx=True, px=30000)
        assert ok, "floor key was not fresh"

    async def fresh_op(i: int) -> None:
        token = f"fresh-{run_id}-{i}"
        outcome = await dedup.execute(token, work)
        assert outcome.role is Role.PRIMARY, outcome.role
        completed.append(token)

    async def replay_op(i: int) -> None:
        outcome = await dedup.execute(completed[i % len(completed)], work)
        assert outcome.role is Role.REPLAY, outcome.role

    progress(f"warm-up: {WARMUP} calls of each sequential scenario")
    await timed_block([], WARMUP, floor_op, -WARMUP)
    await timed_block([], WARMUP, fresh_op, -WARMUP)
    await timed_block([], WARMUP, replay_op, 0)

    result = Sequential()
    done = 0
    rounds = 0
    while done < iterations:
        count = min(BLOCK, iterations - done)
        await timed_block(result.floor, count, floor_op, done)
        await timed_block(result.fresh, count, fresh_op, done)
        await timed_block(result.replay, count, replay_op, done)
        done += count
        rounds += 1
        if rounds % 50 == 0 or done == iterations:
            progress(f"floor/fresh/replay: {done}/{iterations} calls each")
    return result


async def wait_parked(dedup: Deduplicator, expected: int, deadline: float) -> None:
    """Until ``expected`` duplicates are registered and each is blocked waiting for a message
    (`Deduplicator.activity`: ``waiters``, then ``listening``)."""
    while (waiters := dedup.activity().waiters) != expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {waiters} of {expected} waiters registered in time")
        await asyncio.sleep(0.005)
    # A registered duplicate may still be confirming its subscription or re-reading the token;
    # it is parked once it listens for the message.
    while (listening := dedup.activity().listening) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {listening} of {expected} waiters parked in time")
        await asyncio.sleep(0.02)


class GcMonitor:
    """Collections of the cyclic garbage collector (start, end, generation) while installed."""

    def __init__(self) -> None:
        self.collections: list[tuple[float, float, int]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.collections.append((self._start, time.perf_counter(), info["generation"]))

    def __enter__(self) -> GcMonitor:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def within(self, start: float, end: float) -> dict[str, Any]:
        """Count and total pause (ms) of the collections overlapping [start, end]."""
        spans = [(max(a, start), min(b, end), g) for a, b, g in self.collections]
        spans = [(a, b, g) for a, b, g in spans if b > a]
        return {
            "collections": len(spans),
            "pause_ms": sum(b - a for a, b, _ in spans) * 1000,
            "longest_ms": max((b - a for a, b, _ in spans), default=0.0) * 1000,
            "by_generation": {str(g): sum(1 for *_, x in spans if x == g) for g in (0, 1, 2)},
        }


async def wake_once(dedup: Deduplicator, waiters: int, token: str) -> dict[str, Any]:
    release = asyncio.Event()
    started = asyncio.Event()

    async def primary_call() -> dict[str, Any]:
        started.set()
        await release.wait()
        return {"status": "ok", "answer": 42}

    async def timed(call: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[Role, float]:
        outcome = await dedup.execute(token, call)
        return outcome.role, time.perf_counter()

    primary = asyncio.ensure_future(timed(primary_call))
    await asyncio.wait_for(started.wait(), 10)
    dups = [asyncio.ensure_future(timed(primary_call)) for _ in range(waiters)]
    await wait_parked(dedup, waiters, time.monotonic() + 30 + waiters / 200)
    # The same collector state at every release: a full collection now, so that the debt of
    # parking the waiters (and of the phases before) does not decide whether a full collection
    # lands inside the window (the collections that do are still counted below).
    gc.collect()
    with GcMonitor() as gcmon:
        t0 = time.perf_counter()
        release.set()
        p_role, p_done = await primary
        results = await asyncio.gather(*dups)
    roles = [role for role, _ in results]
    if p_role is not Role.PRIMARY or any(role is not Role.WAITER for role in roles):
        raise RuntimeError(f"unexpected roles: primary {p_role}, waiters {set(roles)}")
    latencies_ms = [(done - t0) * 1000 for _, done in results]
    last = max(done for _, done in results)
    return {
        "waiters": waiters,
        "last_ms": max(latencies_ms),
        "median_ms": statistics.median(latencies_ms),
        "first_ms": min(latencies_ms),
        "primary_ms": (p_done - t0) * 1000,
        "gc_in_window": gcmon.within(t0, last),
        "latencies_ms": latencies_ms,
    }


async def bare_asyncio_once(waiters: int) -> float:
    """The asyncio floor of a wake-up: N bare tasks, each awaiting a future, all resolved in one
    loop at t0; ms until the last task has returned. No Redis, no library code."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(waiters)]

    async def wait_one(future: asyncio.Future[None]) -> float:
        await future
        return time.perf_counter()

    tasks = [asyncio.ensure_future(wait_one(f)) for f in futures]
    await asyncio.sleep(0)
    t0 = time.perf_counter()
    for future in futures:
        future.set_result(None)
    done = await asyncio.gather(*tasks)
    return (max(done) - t0) * 1000


def default_reps(waiters: int) -> int:
    """Repetitions of one wake-up size: parking 10,000 duplicates takes ~20 s on 2 slow cores."""
    return 5 if waiters < 1000 else 2


async def run_wake(
    dedup: Deduplicator, counts: list[int], reps_option: int | None
) -> list[dict[str, Any]]:
    out = []
    for n in counts:
        reps = reps_option or default_reps(n)
        runs = []
        for rep in range(reps):
            progress(f"wake-up: {n} waiter(s), rep {rep + 1}/{reps}")
            run = await wake_once(dedup, n, f"wake-{n}-{rep}-{uuid.uuid4().hex[:8]}")
            runs.append(run)
            progress(
                f"  last woken {run['last_ms']:.2f} ms, primary returned {run['primary_ms']:.2f} ms"
                f" after t0; {run['gc_in_window']['collections']} GC collection(s) in the window"
            )
        pooled = [x for run in runs for x in run.pop("latencies_ms")]
        bare = [await bare_asyncio_once(n) for _ in range(reps)]
        out.append(
            {
                "waiters": n,
                "reps": runs,
                "last_ms": summarize([r["last_ms"] for r in runs]),
                "median_ms": summarize([r["median_ms"] for r in runs]),
                "primary_ms": summarize([r["primary_ms"] for r in runs]),
                "each_ms": summarize(pooled),
                "gc_pause_ms": summarize([r["gc_in_window"]["pause_ms"] for r in runs]),
                "bare_asyncio_ms": summarize(bare),
            }
        )
    return out


# -- environment, cleanup -----------------------------------------------------------------------


def git_commit() -> dict[str, Any] | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def environment(server_info: dict[str, Any], redis_where: str) -> dict[str, Any]:
    try:
        import hiredis

        hiredis_version: str | None = getattr(hiredis, "__version__", "unknown")
    except ImportError:
        hiredis_version = None
    from redis.utils import HIREDIS_AVAILABLE

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "gc_threshold": list(gc.get_threshold()),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "redis_py": redis.__version__,
        "hiredis": hiredis_version,
        "hiredis_in_use": bool(HIREDIS_AVAILABLE),
        "strands_dedup": strands_dedup.__version__,
        "redis_server": server_info.get("redis_version"),
        "redis_server_mode": server_info.get("redis_mode"),
        "redis": redis_where,
        "load_average_at_start": list(os.getloadavg()),
        "event_loop": type(asyncio.get_running_loop()).__module__,
        "git": git_commit(),
    }


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def host_cpu_ticks() -> dict[str, int] | None:
    """The machine's CPU time counters (Linux ``/proc/stat``), or None elsewhere."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()[1 : 1 + len(_CPU_FIELDS)]
    except OSError:
        return None
    return dict(zip(_CPU_FIELDS, map(int, fields), strict=False))


def cpu_share(
    before: dict[str, int] | None, after: dict[str, int] | None
) -> dict[str, float] | None:
    """Percent of all CPU time, per kind, between two readings (steal: taken by the host)."""
    if before is None or after is None:
        return None
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in _CPU_FIELDS}
    total = sum(delta.values()) or 1
    return {f"{k}_percent": round(100 * v / total, 1) for k, v in delta.items()}


async def delete_namespace(client: aredis.Redis | aredis.RedisCluster, ns: str) -> int:
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{ns}:*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.delete(*batch)
            batch.clear()
    if batch:
        deleted += await client.delete(*batch)
    return deleted


# -- report -------------------------------------------------------------------------------------


def build_rows(report: dict[str, Any]) -> list[tuple[str, int, str, str, str]]:
    floor_median = report["sequential"]["floor"]["median"]

    def ratio(value_us: float) -> str:
        return f"{value_us / floor_median:.2f}x"

    rows = []
    for name, label in (
        ("floor", "floor: redis-py SET NX PX"),
        ("fresh", "fresh call (claim+run+settle)"),
        ("replay", "replay (result stored)"),
    ):
        s = report["sequential"][name]
        rows.append(
            (label, s["n"], f"{s['median']:.0f} µs", f"{s['p99']:.0f} µs", ratio(s["median"]))
        )
    for wake in report["wake"]:
        n = wake["waiters"]
        noun = "waiter" if n == 1 else "waiters"
        for key, what in (
            ("last_ms", "last woken"),
            ("median_ms", "median woken"),
            ("primary_ms", "primary returned"),
            ("bare_asyncio_ms", "bare asyncio floor"),
        ):
            s = wake[key]
            rows.append(
                (
                    f"wake {n} {noun}: {what}",
                    s["n"],
                    f"{s['median']:.2f} ms",
                    f"{s['p99']:.2f} ms",
                    ratio(s["median"] * 1000),
                )
            )
    return rows


def render_table(rows: list[tuple[str, int, str, str, str]]) -> str:
    header = ("scenario", "n", "median", "p99", "median/floor")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for j, row in enumerate([header, *rows]):
        cells = [
            str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
            for i, c in enumerate(row)
        ]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    seq = report["sequential"]
    floor_median = seq["floor"]["median"]
    targets = [
        {
            "name": f"fresh call median <= {FRESH_TARGET_RATIO}x floor median",
            "measured": round(seq["fresh"]["median"] / floor_median, 3),
            "limit": FRESH_TARGET_RATIO,
        },
        {
            "name": f"replay median <= {REPLAY_TARGET_RATIO}x floor median",
            "measured": round(seq["replay"]["median"] / floor_median, 3),
            "limit": REPLAY_TARGET_RATIO,
        },
    ]
    for wake in report["wake"]:
        if wake["waiters"] == WAKE_TARGET_WAITERS:
            targets.append(
                {
                    "name": f"{WAKE_TARGET_WAITERS} waiters all woken <= {WAKE_TARGET_MS:g} ms "
                    "after the completion (worst rep of t0 -> last waiter)",
                    "measured": round(wake["last_ms"]["max"], 3),
                    "limit": WAKE_TARGET_MS,
                }
            )
    for target in targets:
        target["met"] = target["measured"] <= target["limit"]
    return targets


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.core", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--redis-url",
        help="Redis to measure against (default: a throwaway redis-server on a free port)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="measure on a throwaway Redis Cluster (three primaries, three replicas) instead",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=2000,
        help="timed calls of each of floor, fresh and replay (default: 2000)",
    )
    parser.add_argument(
        "--waiters",
        default="1,100,10000",
        help="comma-separated counts of waiting duplicates (default: 1,100,10000)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        help="repetitions of each wake-up size (default: 5 below 1000 waiters, else 2)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write results (default: {DEFAULT_JSON.relative_to(ROOT)}, "
        f"{CLUSTER_JSON.name} with --cluster)",
    )
    args = parser.parse_args(argv)
    if args.cluster and args.redis_url:
        parser.error("--cluster starts its own cluster: leave out --redis-url")
    if args.cluster and args.json == DEFAULT_JSON:
        args.json = CLUSTER_JSON
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    try:
        args.waiter_counts = [int(x) for x in args.waiters.split(",") if x.strip()]
    except ValueError:
        parser.error("--waiters must be comma-separated integers")
    if any(n < 1 for n in args.waiter_counts):
        parser.error("--waiters counts must be at least 1")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    return args


async def bench(args: argparse.Namespace, url: str, redis_where: str) -> dict[str, Any]:
    ns = f"bench-{uuid.uuid4().hex[:10]}"
    client = floor_client(url)
    dedup = Deduplicator.from_url(
        url, namespace=ns, lease_ttl=LEASE_TTL, max_connections=MAX_CONNECTIONS
    )
    try:
        if isinstance(client, aredis.RedisCluster):
            await client.initialize()
            server_info = await client.info("server", target_nodes=client.get_random_node())
        else:
            server_info = await client.info("server")
        env = environment(server_info, redis_where)
        progress(
            f"redis {env['redis_server']} at {redis_where}, namespace {ns}, "
            f"hiredis {'on' if env['hiredis_in_use'] else 'off'}"
        )
        started = time.perf_counter()
        cpu_before = host_cpu_ticks()
        seq = await run_sequential(client, dedup, ns, args.iterations)
        wake = await run_wake(dedup, args.waiter_counts, args.reps)
        elapsed = time.perf_counter() - started
        env["load_average_at_end"] = list(os.getloadavg())
        env["host_cpu_during_run"] = cpu_share(cpu_before, host_cpu_ticks())
    finally:
        await dedup.aclose()
        try:
            deleted = await delete_namespace(client, ns)
            progress(f"deleted {deleted} keys of namespace {ns}")
        finally:
            await client.aclose()
    return {
        "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks.core", *sys.argv[1:]]),
        "environment": env,
        "settings": {
            "namespace": ns,
            "iterations": args.iterations,
            "warmup": WARMUP,
            "block": BLOCK,
            "waiters": args.waiter_counts,
            "reps": {str(n): args.reps or default_reps(n) for n in args.waiter_counts},
            "lease_ttl": LEASE_TTL,
            "max_connections": MAX_CONNECTIONS,
        },
        "units": {"sequential": "µs per call", "wake": "ms from t0 (event set)"},
        "sequential": {
            "floor": summarize(seq.floor),
            "fresh": summarize(seq.fresh),
            "replay": summarize(seq.replay),
        },
        "wake": wake,
        "elapsed_s": round(elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server: Any = None
    if args.redis_url:
        url = args.redis_url
        if not url.lower().startswith(("redis://", "rediss://", "unix://", "redis+cluster://")):
            sys.exit(
                "--redis-url must be a real Redis: redis://, rediss://, unix:// or redis+cluster://"
            )
        redis_where = describe_url(url)
    elif args.cluster:
        sys.path.insert(0, str(ROOT / "tests"))
        from servers import ClusterSetup

        server = ClusterSetup()
        url = server.url
        redis_where = "throwaway Redis Cluster, 3 primaries + 3 replicas on 127.0.0.1"
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from servers import RedisServer

        server = RedisServer()
        url = server.url
        redis_where = f"throwaway redis-server on 127.0.0.1:{server.port}"
    try:
        report = asyncio.run(bench(args, url, redis_where))
    finally:
        if server is not None:
            server.close()
    report["targets"] = evaluate_targets(report)
    print(render_table(build_rows(report)))
    for wake in report["wake"]:
        pause = wake["gc_pause_ms"]
        print(
            f"  wake {wake['waiters']}: garbage collector paused {pause['median']:.1f} ms "
            f"(median of reps; max {pause['max']:.1f} ms) inside the t0 -> last waiter window"
        )
    share = report["environment"].get("host_cpu_during_run")
    if share is not None:
        print(
            f"  host CPU during the run: {share['steal_percent']:.1f}% stolen by the hypervisor, "
            f"{share['idle_percent']:.1f}% idle (of {report['environment']['cpu_count']} CPUs)"
        )
    print()
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        print(f"target {verdict}: {target['name']} (measured {target['measured']:g})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    progress(f"wrote {args.json} in {report['elapsed_s']:.1f} s of measuring")
    return 0


if __name__ == "__main__":
    sys.exit(main())
