"""A storm of duplicates must not starve the primary's renewals or completion."""

from __future__ import annotations

import asyncio
import time

import pytest

from strands_dedup import Deduplicator, Role

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]


async def test_storm_does_not_cost_the_primary_its_lease(redis_url: str, namespace: str) -> None:
    # 2,000 duplicates queue for 16 connections while the primary's 2.5 s call outlives its
    # 1 s lease 2.5 times over: renewals and the completion must still get through.
    async with Deduplicator.from_url(
        redis_url, namespace=namespace, lease_ttl=1.0, max_connections=16
    ) as dedup:
        runs = 0

        async def call() -> str:
            nonlocal runs
            runs += 1
            await asyncio.sleep(2.5)
            return "once"

        started = time.monotonic()
        outcomes = await asyncio.gather(*(dedup.execute("t", call) for _ in range(2000)))
        assert runs == 1
        assert [o.role for o in outcomes].count(Role.PRIMARY) == 1
        assert {o.value for o in outcomes} == {"once"}
        assert dedup.counters["lease_lost"] == 0
        assert time.monotonic() - started < 30
