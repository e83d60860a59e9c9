"""Fault injection: workers call, a driver breaks things, a checker verifies the history.

    python -m benchmarks.faults                          # the long run: 5 minutes, seed 1
    python -m benchmarks.faults --seconds 40 --seed 7    # what CI runs (tests/faults)
    python -m benchmarks.faults --cluster                # on a Redis Cluster (3 + 3 nodes)

A seeded, bounded, self-stopping run on its own ``redis-server`` (AOF with ``appendfsync always``,
so a restart loses nothing acknowledged): WORKERS processes (tests/faults/worker.py; every other
one calls from threads through the blocking facade) call over a few shared tokens while the
driver, every ``--interval`` seconds, picks one fault at random: SIGKILL a worker (a new one takes
its place), SIGSTOP a worker for 1.5 lease TTLs then SIGCONT it, restart Redis, or ``CLIENT KILL``
every client connection. Then the faults stop, the workers are told to finish, and one lease TTL
later the leases still held are counted. The history (tests/faults/history.py) is checked against
DESIGN.md's guarantees; the summary says how many calls, executions, duplicates, takeovers and
faults the run had, and every violation. Exit code 1 when there is one.

With ``--cluster`` the run has a Redis Cluster of its own (three primaries, three replicas, AOF
``always``) and the workers use ``min_replicas=1``; "restart Redis" becomes ``failover``: SIGKILL
the primary of a random shard (only while every shard has a replica online), wait until its
replica took over, then start the killed node again (it rejoins as a replica). ``CLIENT KILL``
goes to every node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "faults"))

from history import Violation, check, load  # noqa: E402
from servers import ClusterSetup, RedisServer, node_command  # noqa: E402

WORKER = ROOT / "tests" / "faults" / "worker.py"
FAULTS = ("kill", "stop", "restart", "clientkill")
CLUSTER_FAULTS = ("kill", "stop", "failover", "clientkill")
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


class Single:
    """One redis-server: restarted whole, its clients killed with one command."""

    faults = FAULTS

    def __init__(self) -> None:
        self.server = RedisServer(*DURABLE)
        self.url = self.server.url
        self.worker_options: list[str] = []

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def ports(self) -> list[int]:
        return [self.server.port]

    def can_restart(self) -> bool:
        return True

    def restart(self, rng: random.Random) -> None:
        self.server.stop()
        self.server.start()

    def close(self) -> None:
        self.server.close()


class Cluster:
    """Three primaries and three replicas; a failover kills one shard's primary."""

    faults = CLUSTER_FAULTS

    def __init__(self) -> None:
        self.cluster = ClusterSetup(*DURABLE)
        self.url = self.cluster.url
        self.worker_options = [
            *("--min-replicas", "1", "--retry-deadline", "8", "--retry-attempts", "20")
        ]

    def client(self) -> redis.RedisCluster:
        live = self.ports()
        return redis.RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port) for port in live])

    def ports(self) -> list[int]:
        return [n.port for n in self.cluster.nodes if n.proc is not None]

    def can_restart(self) -> bool:
        """Only while every shard has a replica online (one to take over, with the writes)."""
        return self.cluster.fully_replicated()

    def restart(self, rng: random.Random) -> None:
        """Fail over one shard: kill its primary, wait for its replica, start it again."""
        port = rng.choice(sorted(self.cluster.primaries()))
        node = self.cluster.node(port)
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait()
        node.proc = None
        deadline = time.monotonic() + 30
        while port in self.cluster.primaries() or len(self.cluster.primaries()) < 3:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took over from {port} within 30 s")
            time.sleep(0.05)
        self.cluster.wait_until_healthy()
        node.start()  # back as a replica of the new primary

    def close(self) -> None:
        self.cluster.close()


class Run:
    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.dir = directory
        self.rng = random.Random(args.seed)
        self.store: Single | Cluster = Cluster() if args.cluster else Single()
        self.namespace = f"faults-{args.seed}"
        self.faults = directory / "faults.jsonl"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.spawned = 0
        self.stopped: dict[str, float] = {}  # worker -> when to SIGCONT it
        self.skipped = 0  # failovers not injected: a shard had no replica online yet

    def log_fault(
        self, kind: str, worker: str | None = None, *, at: float | None = None, **extra: float
    ) -> None:
        record = {"k": "fault", "kind": kind, "w": worker, "t": at or time.time(), **extra}
        with self.faults.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def spawn(self) -> None:
        self.spawned += 1
        name = f"w{self.spawned}"
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                self.store.url,
                self.namespace,
                name,
                str(self.rng.randrange(1 << 30)),
                str(self.dir / f"{name}.jsonl"),
                "--tokens",
                str(self.args.tokens),
                "--lease-ttl",
                str(self.args.lease_ttl),
                "--wait-timeout",
                str(self.args.wait_timeout),
                *self.store.worker_options,
                *(["--blocking"] if self.spawned % 2 == 0 else []),  # every other: threads
            ],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"worker {name} did not start: {line!r}")
        self.workers[name] = proc

    def inject(self) -> str:
        kind = self.rng.choice(self.store.faults)
        running = [w for w in self.workers if w not in self.stopped]
        if kind in ("kill", "stop") and not running:
            kind = "clientkill"
        if kind in ("restart", "failover"):
            if self.store.can_restart():
                began = time.time()
                self.store.restart(self.rng)
                # a failover lasts until every node serves again (a cluster refuses commands on
                # every shard while one has no primary): the fault spans that window
                self.log_fault(kind, at=began, until=time.time())
                return kind
            self.skipped += 1
            kind = "clientkill"  # a shard still resyncs: no second failover yet
        if kind == "kill":
            name = self.rng.choice(running)
            self.log_fault("kill", name)
            self.workers.pop(name).kill()
            self.spawn()
        elif kind == "stop":
            name = self.rng.choice(running)
            self.log_fault("stop", name)
            self.workers[name].send_signal(signal.SIGSTOP)
            self.stopped[name] = time.monotonic() + 1.5 * self.args.lease_ttl
        else:
            self.log_fault("clientkill")
            for port in self.store.ports():
                with contextlib.suppress(redis.RedisError):
                    node_command(port, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                    node_command(port, "CLIENT", "KILL", "TYPE", "pubsub")
        return kind

    def resume_due(self, everyone: bool = False) -> None:
        now = time.monotonic()
        for name, when in list(self.stopped.items()):
            if everyone or now >= when:
                self.log_fault("cont", name)
                self.workers[name].send_signal(signal.SIGCONT)
                del self.stopped[name]

    def finish(self) -> int:
        """Stop the workers; return how many leases are still held one lease TTL later."""
        client = self.store.client()
        client.set(f"{self.namespace}:stop", 1)
        deadline = time.monotonic() + self.args.wait_timeout + 10
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        time.sleep(self.args.lease_ttl + 0.2)
        left = sum(1 for _ in client.scan_iter(match=f"{self.namespace}:{{*}}:lease", count=1000))
        client.close()
        with (self.dir / "left.jsonl").open("w") as out:
            out.write(json.dumps({"k": "left", "leases": left, "t": time.time()}) + "\n")
        return left

    def close(self) -> None:
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
        self.store.close()


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Violation]]:
    directory = Path(args.history_dir or tempfile.mkdtemp(prefix="strands-dedup-faults-"))
    directory.mkdir(parents=True, exist_ok=True)
    faults: Counter[str] = Counter()
    started = time.monotonic()
    state = Run(args, directory)
    try:
        for _ in range(args.workers):
            state.spawn()
        next_fault = time.monotonic() + args.interval
        while time.monotonic() - started < args.seconds:
            state.resume_due()
            if time.monotonic() >= next_fault:
                faults[state.inject()] += 1
                next_fault = time.monotonic() + args.interval * state.rng.uniform(0.5, 1.5)
                if args.progress:
                    print(
                        f"  {time.monotonic() - started:5.1f}s faults: {dict(faults)}",
                        file=sys.stderr,
                        flush=True,
                    )
            time.sleep(0.05)
        state.resume_due(everyone=True)
        state.finish()
    finally:
        state.close()
    records = load(sorted(directory.glob("*.jsonl")))
    violations = check(records, lease_ttl=args.lease_ttl, wait_timeout=args.wait_timeout)
    calls = [r for r in records if r["k"] == "call"]
    execs = [r for r in records if r["k"] == "exec"]
    roles = Counter(r.get("role") for r in calls if r["ok"])
    summary = {
        "seed": args.seed,
        "seconds": args.seconds,
        "workers": args.workers,
        "lease_ttl": args.lease_ttl,
        "store": "cluster" if args.cluster else "redis",
        "calls": len(calls),
        "calls_ok": sum(r["ok"] for r in calls),
        "calls_failed": Counter(r["err"] for r in calls if not r["ok"]),
        "roles": dict(roles),
        "executions": len(execs),
        "tokens": len({r["tok"] for r in calls}),
        "faults": dict(faults),
        "restarts_skipped": state.skipped,
        "left_locked": next((r["leases"] for r in records if r["k"] == "left"), None),
        "violations": [v.__dict__ for v in violations],
        "history": str(directory),
    }
    return summary, violations


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=300.0, help="how long faults go on")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=4, help="tokens per quarter second")
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--wait-timeout", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.5, help="mean seconds between faults")
    parser.add_argument("--history-dir", help="where the history goes (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--quiet", dest="progress", action="store_false")
    parser.add_argument(
        "--cluster", action="store_true", help="run on a Redis Cluster of its own (3 + 3 nodes)"
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.seconds <= 0 or args.lease_ttl <= 0 or args.interval <= 0:
        parser.error("--workers, --seconds, --lease-ttl and --interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary, violations = run(args)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
