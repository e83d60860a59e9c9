"""A worker of the fault-injection run: calls over a few tokens, logging a history.

    python tests/faults/worker.py URL NAMESPACE WORKER SEED HISTORY --tokens M --lease-ttl T
        --wait-timeout W --concurrency C

C tasks each loop until the key ``<NAMESPACE>:stop`` exists: pick one of M tokens of the current
quarter second (every worker uses the same ones, so callers collide: duplicates, and later calls
replay), then ``dedup.execute`` a call that
logs ``exec``, works 50-400 ms and returns ``{"id", "fence"}``. Records go to HISTORY as JSON
lines, flushed at once (see history.py). Prints ``ready`` once connected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from typing import Any

from strands_dedup import DedupConfig, DedupError, Deduplicator, LeaseLost, Role, current_call
from strands_dedup.store import client_from_url


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
    args = parser.parse_args()
    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    out = open(args.history, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def log(kind: str, **fields: Any) -> None:
        out.write(json.dumps({"k": kind, "w": args.worker, **fields}) + "\n")

    side = client_from_url(args.url, DedupConfig(), client_name="fault-worker-side")
    stop_key = f"{args.namespace}:stop"
    async with Deduplicator.from_url(
        args.url,
        namespace=args.namespace,
        lease_ttl=args.lease_ttl,
        wait_timeout=args.wait_timeout,
        retry_deadline=args.retry_deadline,
        retry_attempts=args.retry_attempts,
        min_replicas=args.min_replicas,
        metrics=False,
    ) as dedup:
        await dedup.engine.store.probe()
        print("ready", flush=True)

        async def one(token: str) -> None:
            work = rng.uniform(0.05, 0.4)
            mine: dict[str, Any] = {}

            async def call() -> dict[str, Any]:
                ctx = current_call()
                assert ctx is not None
                mine["id"], mine["fence"] = uuid.uuid4().hex, ctx.fence
                log("exec", tok=token, fence=ctx.fence, id=mine["id"], t0=time.time())
                await asyncio.sleep(work)
                return {"id": mine["id"], "fence": ctx.fence}

            def finished(accepted: bool) -> None:
                log(
                    "done",
                    tok=token,
                    fence=mine.get("fence"),
                    id=mine.get("id"),
                    t1=time.time(),
                    accepted=accepted,
                )

            def called(value: Any, error: BaseException | None, role: str | None) -> None:
                log(
                    "call",
                    tok=token,
                    t0=t0,
                    t1=time.time(),
                    ok=error is None,
                    val=value,
                    err=None if error is None else type(error).__name__,
                    role=role,
                    work=work,
                )

            t0 = time.time()
            try:
                outcome = await dedup.execute(token, call, returns=dict)
            except DedupError as exc:
                if isinstance(exc, LeaseLost):
                    finished(False)
                called(None, exc, None)
                return
            if outcome.role in (Role.PRIMARY, Role.TAKEOVER):
                finished(True)
            called(outcome.value, None, str(outcome.role))

        async def stopped() -> bool:
            try:
                return bool(await side.exists(stop_key))
            except Exception:  # Redis is restarting: keep going
                await asyncio.sleep(0.1)
                return False

        async def loop() -> None:
            while not await stopped():
                window = int(time.time() * 4)  # every worker uses the same tokens for 0.25 s
                await one(f"t{window}-{rng.randrange(args.tokens)}")
                await asyncio.sleep(rng.uniform(0, 0.05))

        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    await side.aclose()
    out.close()
    print("finished", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
