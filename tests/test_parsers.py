"""Both reply parsers: redis-py's pure-Python one (no hiredis) and hiredis.

The CI runs the contract tests a second time in an environment without hiredis; these tests
also force the pure-Python parser in a child process, where hiredis cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(60)

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.modules["hiredis"] = None  # as if it were not installed
    import redis.asyncio as aredis
    import redis.utils
    from strands_dedup import Deduplicator, Role

    assert not redis.utils.HIREDIS_AVAILABLE

    async def storm(dedup):
        started, release = asyncio.Event(), asyncio.Event()

        async def call():
            started.set()
            await release.wait()
            return "done"

        primary = asyncio.create_task(dedup.execute("tok", call))
        await started.wait()
        waiters = [asyncio.create_task(dedup.execute("tok", call)) for _ in range(5)]
        while dedup.activity().listening < 5:
            await asyncio.sleep(0.005)
        release.set()
        outcomes = await asyncio.gather(primary, *waiters)
        assert [o.role for o in outcomes] == [Role.PRIMARY] + [Role.WAITER] * 5, outcomes

    async def main(url, namespace):
        async with Deduplicator.from_url(url, namespace=namespace, wait_timeout=10) as dedup:
            await storm(dedup)
        if url.startswith("redis://"):  # a client built by the application: RESP3 by default
            client = aredis.Redis.from_url(url)
            async with Deduplicator(client, namespace=namespace + ":own", wait_timeout=10) as d:
                await storm(d)
            await client.aclose()
        print("ok")

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def run_without_hiredis(url: str, namespace: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, url, namespace],
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_duplicates_wait_on_memory_without_hiredis(namespace: str) -> None:
    run_without_hiredis("memory://parsers", namespace)


@pytest.mark.redis
def test_duplicates_wait_on_redis_without_hiredis(redis_url: str, namespace: str) -> None:
    run_without_hiredis(redis_url, namespace)
