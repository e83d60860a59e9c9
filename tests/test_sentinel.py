"""Behind Sentinel: a failover of the primary during a storm loses no waiting duplicate.

(The multi-process storm, takeover and zombie tests of test_processes.py run on Sentinel too,
through the ``target`` fixture.)
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from failover import Gated, storm_across, until
from servers import REDIS_SERVER, SentinelSetup

from strands_dedup import Deduplicator, Role

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.mark.timeout(120)
@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not on the PATH")
async def test_a_failover_during_a_storm_loses_no_waiter(namespace: str) -> None:
    setup = SentinelSetup()
    try:

        async def fail_over(_: Deduplicator) -> None:
            side = redis.Redis(port=setup.primary.port)
            assert side.execute_command("WAIT", 1, 2000) == 1  # the claim is on the replica
            side.close()
            assert setup.primary.proc is not None
            setup.primary.proc.kill()  # the primary Redis dies: Sentinel promotes the replica
            await until(
                lambda: setup.primary_port() == setup.replica.port, 30, "Sentinel fails over"
            )

        await storm_across(setup.url, namespace, fail_over)
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


@pytest.mark.timeout(60)
async def test_a_claims_wait_for_replicas_costs_at_most_a_quarter_of_the_lease(
    sentinel_setup: SentinelSetup, namespace: str
) -> None:
    # two replicas wanted, one exists: WAIT runs to its timeout, which for a claim is capped at
    # a quarter of the lease (not replica_timeout), so the lease is still alive when the call
    # starts and renewals keep it: the duplicate waits instead of taking over
    options = {
        "namespace": namespace,
        "min_replicas": 2,
        "replica_timeout": 3,
        "lease_ttl": 1,
        "metrics": False,
    }
    async with (
        Deduplicator.from_url(sentinel_setup.url, **options) as first,
        Deduplicator.from_url(sentinel_setup.url, **options) as second,
    ):
        call = Gated("once")
        started = time.monotonic()
        primary = asyncio.create_task(first.execute("tok", call))
        await until(lambda: call.runs == 1, 10, "the call runs")
        assert time.monotonic() - started < 2.5  # WAIT capped at 0.25 s, not 3 s
        duplicate = asyncio.create_task(second.execute("tok", call))
        await until(lambda: second.activity().listening == 1, 10, "the duplicate waits")
        await asyncio.sleep(1.5)  # 1.5 lease TTLs: only renewals keep the lease
        call.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(primary, duplicate), 20)
    assert call.runs == 1
    assert [(o.role, o.value) for o in outcomes] == [(Role.PRIMARY, "once"), (Role.WAITER, "once")]
    assert outcomes[0].fence == outcomes[1].fence  # no takeover
