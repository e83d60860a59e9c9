"""A worker of the fault-injection run: calls over a few tokens, logging a history.

    python tests/faults/worker.py URL NAMESPACE WORKER SEED HISTORY --tokens M --lease-ttl T
        --wait-timeout W --concurrency C [--blocking]

C tasks (with ``--blocking``: C threads over a `SyncDeduplicator`) each loop until the key
``<NAMESPACE>:stop`` exists: pick one of M tokens of the current quarter second (every worker
uses the same ones, so callers collide: duplicates, and later calls replay), then
``dedup.execute`` a call that logs ``exec``, works 50-400 ms and returns ``{"id", "fence"}``.
Records go to HISTORY as JSON lines, flushed at once (see history.py). Prints ``ready`` once
connected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from strands_dedup import (
    DedupConfig,
    DedupError,
    Deduplicator,
    LeaseLost,
    Outcome,
    Role,
    SyncDeduplicator,
    current_call,
)
from strands_dedup._engine.deduplicator import engine_of
from strands_dedup._engine.sync import Bridge
from strands_dedup._store import client_from_url

Log = Callable[..., None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("worker")
    parser.add_argument("seed", type=int)
    parser.add_argument("history")
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--wait-timeout", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--min-replicas", type=int, default=0)
    parser.add_argument("--retry-deadline", type=float, default=3.0)
    parser.add_argument("--retry-attempts", type=int, default=3)
    parser.add_argument("--blocking", action="store_true")
    args = parser.parse_args()
    out = open(args.history, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def log(kind: str, **fields: Any) -> None:
        out.write(json.dumps({"k": kind, "w": args.worker, **fields}) + "\n")

    if args.blocking:
        run_blocking(args, log)
    else:
        asyncio.run(run(args, log))
    out.close()
    print("finished", flush=True)
    sys.exit(0)


def options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "namespace": args.namespace,
        "lease_ttl": args.lease_ttl,
        "wait_timeout": args.wait_timeout,
        "retry_deadline": args.retry_deadline,
        "retry_attempts": args.retry_attempts,
        "min_replicas": args.min_replicas,
        "metrics": False,
    }


class Attempt:
    """One call's records: ``exec`` when it runs as the primary, ``done`` when a primary's
    completion was accepted (or refused), ``call`` with what its caller got."""

    def __init__(self, log: Log, token: str, work: float) -> None:
        self.log, self.token, self.work = log, token, work
        self.t0 = time.time()
        self.mine: dict[str, Any] = {}

    def runs(self) -> dict[str, Any]:
        """The primary's call starts: its id and fence (the value it returns)."""
        ctx = current_call()
        assert ctx is not None
        self.mine["id"], self.mine["fence"] = uuid.uuid4().hex, ctx.fence
        self.log("exec", tok=self.token, fence=ctx.fence, id=self.mine["id"], t0=time.time())
        return {"id": self.mine["id"], "fence": ctx.fence}

    def got(self, outcome: Outcome[Any]) -> None:
        if outcome.role in (Role.PRIMARY, Role.TAKEOVER):
            self._finished(True)
        self._called(outcome.value, None, str(outcome.role))

    def failed(self, exc: DedupError) -> None:
        if isinstance(exc, LeaseLost):
            self._finished(False)
        self._called(None, exc, None)

    def _finished(self, accepted: bool) -> None:
        self.log(
            "done",
            tok=self.token,
            fence=self.mine.get("fence"),
            id=self.mine.get("id"),
            t1=time.time(),
            accepted=accepted,
        )

    def _called(self, value: Any, error: BaseException | None, role: str | None) -> None:
        self.log(
            "call",
            tok=self.token,
            t0=self.t0,
            t1=time.time(),
            ok=error is None,
            val=value,
            err=None if error is None else type(error).__name__,
            role=role,
            work=self.work,
        )


def next_token(rng: random.Random, tokens: int) -> str:
    window = int(time.time() * 4)  # every worker uses the same tokens for 0.25 s
    return f"t{window}-{rng.randrange(tokens)}"


def run_blocking(args: argparse.Namespace, log: Log) -> None:
    """The same loop over the blocking facade, one thread per caller."""
    side = client_from_url(args.url, DedupConfig(), client_name="fault-worker-side")
    stop_key = f"{args.namespace}:stop"
    with SyncDeduplicator.from_url(args.url, **options(args)) as dedup:
        bridge = Bridge(dedup, "fault worker")
        portal = bridge.portal
        assert portal is not None

        def stopped() -> bool:  # read on the facade's loop, where the side client lives
            try:
                return bool(portal.call(side.exists(stop_key)))
            except Exception:  # Redis is restarting: keep going
                time.sleep(0.1)
                return False

        portal.call(bridge.engine.store.probe())
        print("ready", flush=True)

        def loop(seed: int) -> None:
            rng = random.Random(seed)
            while not stopped():
                token = next_token(rng, args.tokens)
                attempt = Attempt(log, token, rng.uniform(0.05, 0.4))

                def call(attempt: Attempt = attempt) -> dict[str, Any]:
                    value = attempt.runs()
                    time.sleep(attempt.work)
                    return value

                try:
                    attempt.got(dedup.execute(token, call, returns=dict))
                except DedupError as exc:
                    attempt.failed(exc)
                time.sleep(rng.uniform(0, 0.05))

        threads = [
            threading.Thread(target=loop, args=(args.seed * 1000 + i,))
            for i in range(args.concurrency)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        portal.call(side.aclose())


async def run(args: argparse.Namespace, log: Log) -> None:
    rng = random.Random(args.seed)
    side = client_from_url(args.url, DedupConfig(), client_name="fault-worker-side")
    stop_key = f"{args.namespace}:stop"
    async with Deduplicator.from_url(args.url, **options(args)) as dedup:
        await engine_of(dedup).store.probe()
        print("ready", flush=True)

        async def one(token: str) -> None:
            attempt = Attempt(log, token, rng.uniform(0.05, 0.4))

            async def call() -> dict[str, Any]:
                value = attempt.runs()
                await asyncio.sleep(attempt.work)
                return value

            try:
                attempt.got(await dedup.execute(token, call, returns=dict))
            except DedupError as exc:
                attempt.failed(exc)

        async def stopped() -> bool:
            try:
                return bool(await side.exists(stop_key))
            except Exception:  # Redis is restarting: keep going
                await asyncio.sleep(0.1)
                return False

        async def loop() -> None:
            while not await stopped():
                await one(next_token(rng, args.tokens))
                await asyncio.sleep(rng.uniform(0, 0.05))

        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    await side.aclose()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
