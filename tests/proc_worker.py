"""A child process for the multi-process tests in test_processes.py.

Usage::

    python tests/proc_worker.py storm URL NAMESPACE TOKEN --calls N --seconds S --lease-ttl T
    python tests/proc_worker.py hold URL NAMESPACE TOKEN --lease-ttl T
    python tests/proc_worker.py stream URL NAMESPACE TOKEN --calls N --seconds S --lease-ttl T

It writes one JSON object per line to stdout (flushed at once), each with an ``event`` field:

- ``ready``: connected to Redis; ``storm`` then waits for the barrier: one item pushed by the
  test on the list ``<NAMESPACE>:barrier`` (BLPOP), so every process starts its calls together.
- ``started``: (``hold``) this process claimed TOKEN and its call is running; the call then
  blocks until a line arrives on stdin (never, if the test kills the process instead).
- ``result``: one finished call: ``value``, ``role``, ``fence``.
- ``error``: one failed call: ``type`` (the exception's class name) and ``message``.
- ``streaming``: (``stream``) the third chunk of TOKEN's stream was produced.
- ``finished``: every call returned (the deduplicator is still open).
- ``closed``: the deduplicator is closed; the process exits 0 right after.

Each execution of a call increments the Redis counter ``<NAMESPACE>:executions`` first, so the
test can count executions across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from side import Side, open_side

from strands_dedup import Deduplicator, Outcome


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
    sys.stdout.flush()


def emit_outcome(outcome: Outcome[Any]) -> None:
    emit("result", value=outcome.value, role=str(outcome.role), fence=outcome.fence)


def emit_error(exc: BaseException) -> None:
    emit("error", type=type(exc).__name__, message=str(exc))


async def storm(args: argparse.Namespace, side: Side) -> None:
    """``--calls`` concurrent calls of TOKEN, each taking ``--seconds``, after the barrier."""

    async def call() -> dict[str, Any]:
        n = await side.incr(f"{args.namespace}:executions")
        await asyncio.sleep(args.seconds)
        return {"pid": os.getpid(), "execution": n}

    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl, max_connections=8
    ) as dedup:
        await dedup.health()  # connect before the barrier, so the calls start together
        emit("ready")
        if await side.blpop([f"{args.namespace}:barrier"], timeout=30) is None:
            emit("error", type="BarrierTimeout", message="the barrier was not released in 30 s")
            return
        outcomes = await asyncio.gather(
            *(dedup.execute(args.token, call) for _ in range(args.calls)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                emit_error(outcome)
            else:
                emit_outcome(outcome)
        emit("finished")


async def hold(args: argparse.Namespace, side: Side) -> None:
    """One call of TOKEN that says it started and finishes when a line arrives on stdin."""

    async def call() -> dict[str, Any]:
        await side.incr(f"{args.namespace}:executions")
        emit("started")
        line = await asyncio.to_thread(sys.stdin.readline)
        return {"pid": os.getpid(), "by": "child", "line": line.strip()}

    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl, max_connections=4
    ) as dedup:
        await dedup.health()  # connected before it reports ready
        emit("ready")
        try:
            emit_outcome(await dedup.execute(args.token, call))
        except Exception as exc:
            emit_error(exc)
        emit("finished")


async def stream(args: argparse.Namespace, side: Side) -> None:
    """Stream TOKEN: ``--calls`` chunks ``{"pid", "i"}``, one every ``--seconds``; reports
    ``streaming`` after the third chunk."""

    async def chunks() -> Any:
        for i in range(args.calls):
            if i == 3:
                emit("streaming")
            await asyncio.sleep(args.seconds)
            yield {"pid": os.getpid(), "i": i}

    async with Deduplicator.from_url(
        args.url, namespace=args.namespace, lease_ttl=args.lease_ttl, max_connections=4
    ) as dedup:
        await dedup.health()  # connected before it reports ready
        emit("ready")
        async for _ in dedup.stream(args.token, chunks):
            pass
        emit("finished")


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["storm", "hold", "stream"])
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("token")
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument(
        "--side-url", help="redis:// (or redis+cluster://) URL for the side client (default: URL)"
    )
    args = parser.parse_args(argv)
    side_url = args.side_url or args.url
    side = open_side(side_url, client_name="proc-worker-side")
    try:
        await {"storm": storm, "hold": hold, "stream": stream}[args.mode](args, side)
    finally:
        await side.aclose()
    emit("closed")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
