"""Shared by the failover tests: wait for a condition, and a storm of duplicates carried across
a failover (or a slot migration) of the Redis that holds their token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from strands_dedup import Deduplicator, Role


async def until(
    predicate: Callable[[], bool], timeout: float, what: str, *, every: float = 0.01
) -> None:
    """Poll ``predicate`` until it holds; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await asyncio.sleep(every)


class Gated:
    """A call that counts its runs and returns ``value`` once ``gate`` is set."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.gate = asyncio.Event()
        self.runs = 0

    async def __call__(self) -> Any:
        self.runs += 1
        await self.gate.wait()
        return self.value


async def storm_across(
    url: str,
    namespace: str,
    disrupt: Callable[[Deduplicator], Awaitable[None]],
    *,
    waiters: int = 50,
    **options: Any,
) -> None:
    """A primary runs token ``tok`` while ``waiters`` duplicates of another deduplicator wait;
    ``disrupt(others)`` moves the token under them (kills the Redis primary holding it, migrates
    its slot) and returns once that is over; then the call finishes. Asserts one execution and
    the same result for every caller."""
    settings: dict[str, Any] = {
        "namespace": namespace,
        "lease_ttl": 5,
        "wait_timeout": 60,
        "retry_attempts": 20,
        "retry_deadline": 40,
        "metrics": False,
        **options,
    }
    async with (
        Deduplicator.from_url(url, **settings) as primary,
        Deduplicator.from_url(url, **settings) as others,
    ):
        call = Gated({"by": "primary"})
        first = asyncio.create_task(primary.execute("tok", call))
        await until(lambda: call.runs == 1, 10, "the primary runs")
        duplicates = [asyncio.create_task(others.execute("tok", call)) for _ in range(waiters)]
        await until(lambda: others.activity().listening == waiters, 10, "the duplicates wait")
        await disrupt(others)
        call.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(first, *duplicates), 60)
    assert call.runs == 1
    assert outcomes[0].role is Role.PRIMARY
    assert all(o.value == {"by": "primary"} for o in outcomes)
    assert {o.role for o in outcomes[1:]} == {Role.WAITER}
