"""The ``strands-dedup`` command line."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable

import click

from . import __version__
from .core import Deduplicator
from .errors import DedupError, StoreUnavailable
from .protocol import Outcome

__all__ = ["main"]

REDIS_URL_ENV = "STRANDS_DEDUP_REDIS_URL"
EXIT_UNREACHABLE = 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="strands-dedup")
def main() -> None:
    """Distributed idempotency and dedup for AI-agent calls, backed by Redis."""


@main.command()
@click.option(
    "--redis-url",
    envvar=REDIS_URL_ENV,
    default="memory://",
    show_default=True,
    help=f"Redis to use (env {REDIS_URL_ENV}); memory:// runs embedded, no server.",
)
@click.option(
    "--calls",
    default=500,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Calls to fire, duplicates included.",
)
@click.option(
    "--keys",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Distinct idempotency tokens among the calls.",
)
@click.option(
    "--work",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 60),
    help="Seconds each execution of the (fake) agent call takes.",
)
@click.option("--seed", default=None, type=int, help="Seed for the order of the calls.")
def demo(redis_url: str, calls: int, keys: int, work: float, seed: int | None) -> None:
    """Fire a storm of duplicate calls and show that each token ran once."""
    try:
        asyncio.run(_demo(redis_url, calls, keys, work, seed))
    except StoreUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(EXIT_UNREACHABLE) from None
    except (DedupError, ValueError) as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None


async def _demo(redis_url: str, calls: int, keys: int, work: float, seed: int | None) -> None:
    executions: dict[str, int] = {}
    run_id = f"demo-{os.getpid()}-{time.time_ns()}"

    async def agent_call(token: str) -> dict[str, str]:
        executions[token] = executions.get(token, 0) + 1
        await asyncio.sleep(work)
        return {"token": token, "answer": f"result for {token}"}

    tokens = [f"{run_id}-{i % keys}" for i in range(calls)]
    random.Random(seed).shuffle(tokens)
    roles: dict[str, int] = {}
    started = time.perf_counter()
    async with Deduplicator.from_url(redis_url, namespace="strands-dedup-demo") as dedup:

        async def one(token: str) -> None:
            def call() -> Awaitable[dict[str, str]]:
                return agent_call(token)

            outcome: Outcome[dict[str, str]] = await dedup.execute(token, call)
            roles[outcome.role.value] = roles.get(outcome.role.value, 0) + 1

        await asyncio.gather(*(one(t) for t in tokens))
    elapsed = time.perf_counter() - started
    total = sum(executions.values())
    click.echo(f"calls sent:        {calls} over {keys} tokens ({redis_url})")
    click.echo(f"executions:        {total} (one per token: {'yes' if total == keys else 'NO'})")
    for role in ("primary", "waiter", "replay", "takeover"):
        click.echo(f"  {role + ':':<16} {roles.get(role, 0)}")
    click.echo(f"wall time:         {elapsed:.2f}s (each execution takes {work:g}s)")
    if total != keys:
        raise SystemExit(1)
