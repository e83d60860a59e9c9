"""Behind Sentinel: a failover of the primary during a storm loses no waiting duplicate.

(The multi-process storm, takeover and zombie tests of test_processes.py run on Sentinel too,
through the ``target`` fixture.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import redis
from servers import REDIS_SERVER, SentinelSetup

from strands_dedup import Deduplicator, Role

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        await asyncio.sleep(0.01)


@pytest.mark.timeout(120)
@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on the PATH")
async def test_a_failover_during_a_storm_loses_no_waiter(namespace: str) -> None:
    setup = SentinelSetup()
    try:
        options = {
            "namespace": namespace,
            "lease_ttl": 5,
            "wait_timeout": 60,
            "retry_attempts": 20,
            "retry_deadline": 40,
            "metrics": False,
        }
        async with (
            Deduplicator.from_url(setup.url, **options) as primary,
            Deduplicator.from_url(setup.url, **options) as others,
        ):
            gate = asyncio.Event()
            runs = 0

            async def call() -> dict[str, str]:
                nonlocal runs
                runs += 1
                await gate.wait()
                return {"by": "primary"}

            first = asyncio.create_task(primary.execute("tok", call))
            await until(lambda: runs == 1, 10, "the primary runs")
            waiters = [asyncio.create_task(others.execute("tok", call)) for _ in range(50)]
            await until(lambda: others._subscriber.waiters == 50, 10, "50 duplicates wait")
            side = redis.Redis(port=setup.primary.port)
            assert side.execute_command("WAIT", 1, 2000) == 1  # the claim is on the replica
            side.close()

            assert setup.primary.proc is not None
            setup.primary.proc.kill()  # the primary Redis dies: Sentinel promotes the replica
            await until(
                lambda: setup.primary_port() == setup.replica.port, 30, "Sentinel fails over"
            )
            gate.set()
            outcomes = await asyncio.wait_for(asyncio.gather(first, *waiters), 60)
        assert runs == 1
        assert outcomes[0].role is Role.PRIMARY
        assert all(o.value == {"by": "primary"} for o in outcomes)
        assert {o.role for o in outcomes[1:]} == {Role.WAITER}
    finally:
        setup.close()


@pytest.mark.timeout(60)
async def test_min_replicas_waits_for_the_replica(
    sentinel_setup: SentinelSetup, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Deduplicator.from_url(
        sentinel_setup.url, namespace=namespace, min_replicas=1, metrics=False
    ) as dedup:
        first = await dedup.execute("tok", lambda: {"n": 1})
        again = await dedup.execute("tok", lambda: {"n": 2})
    assert (first.role, again.role, again.value) == (Role.PRIMARY, Role.REPLAY, {"n": 1})
    assert "replicas acknowledged" not in caplog.text
    async with Deduplicator.from_url(
        sentinel_setup.url, namespace=namespace, min_replicas=2, replica_timeout=0.2, metrics=False
    ) as dedup:
        started = time.monotonic()
        outcome = await dedup.execute("other", lambda: {"n": 3})
        assert time.monotonic() - started >= 0.2  # it waited for a second replica
    assert outcome.value == {"n": 3}
    assert "only 1 of 2 replicas acknowledged" in caplog.text
