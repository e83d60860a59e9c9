"""Effects across takeovers, with real processes on a real Redis.

- An outgoing POST: a primary (tests/effects_worker.py) is SIGKILLed right after its POST reached
  a counting service (`strands-dedup fake-agent`) behind a `strands-dedup gateway` process; a second
  process takes the token over after the lease and sends the POST again, with the same derived
  Idempotency-Key: the service ran once, and the taker gets the gateway's replay.
- A tool: a Strands agent's `idempotent_tool` ran (its executions counted in Redis), then the
  process was SIGKILLed before its turn ended; the taker's model calls the tool with the same
  arguments and gets the crashed attempt's result, not a second execution.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from children import Child
from servers import fake_agent_command, free_port, gateway_command, process

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]
HERE = Path(__file__).parent
WORKER = str(HERE / "effects_worker.py")
LEASE_TTL = "2"  # renewed in time by a worker that a loaded machine stalls a second


@pytest.fixture
def upstream() -> Iterator[str]:
    """The counting service: each POST counted per Idempotency-Key, answered after 3 s (the
    taker must be waiting on the first process's lease before then)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(fake_agent_command(port, 3.0), url + "/executions"):
        yield url


@pytest.fixture
def gateway(upstream: str, redis_url: str, namespace: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = gateway_command(upstream, redis_url, f"{namespace}:gw", port, "--lease-ttl", "5")
    with process(args, url + "/healthz"):
        yield url


@pytest.fixture
def workers(children: Callable[..., Awaitable[Child]]) -> Callable[..., Awaitable[Child]]:
    async def spawn(*args: str) -> Child:
        child = await children(*args, worker=WORKER)
        await child.expect("ready", 30)
        return child

    return spawn


def _executions(upstream: str) -> dict[str, int]:
    counts: dict[str, int] = httpx.get(upstream + "/executions", timeout=5).json()
    return counts


async def test_a_post_made_before_a_crash_is_not_run_again_by_the_taker(
    workers: Callable[..., Awaitable[Child]],
    gateway: str,
    upstream: str,
    redis_url: str,
    namespace: str,
) -> None:
    common = ("post", redis_url, namespace, "refund-7", "--target", gateway + "/invoke")
    first = await workers(*common, "--lease-ttl", LEASE_TTL)
    taker = await workers(*common, "--lease-ttl", LEASE_TTL)
    await first.send("go")
    await first.expect("posting", 10)
    deadline = time.monotonic() + 10
    while not (counts := _executions(upstream)):  # the POST reached the service
        assert time.monotonic() < deadline, "the service never saw the first POST"
        await asyncio.sleep(0.01)  # polling the service against a deadline
    await taker.send("go")
    await taker.expect("waiting", 10)  # on the first process's live lease
    os.kill(first.pid, signal.SIGKILL)
    done = await taker.expect("done", 20)
    assert first.of("done") == []  # killed before its response came back
    assert done["role"] == "takeover"
    assert done["status"] == 200 and done["replayed"] == "true"
    assert done["body"]["key"] == done["key"]
    assert done["sent_fence"] == done["fence"]
    assert _executions(upstream) == counts == {done["key"]: 1}


async def test_a_tool_that_ran_before_a_crash_is_replayed_to_the_taker(
    workers: Callable[..., Awaitable[Child]], redis_url: str, namespace: str
) -> None:
    common = ("tool", redis_url, namespace, "turn-1", "--session", "s-7")
    first = await workers(*common, "--hang", "--lease-ttl", LEASE_TTL)
    taker = await workers(*common, "--lease-ttl", LEASE_TTL)
    await first.send("go")
    ran = await first.expect("tool_result", 20)  # the tool ran and its result was stored
    await taker.send("go")
    await taker.expect("waiting", 10)
    os.kill(first.pid, signal.SIGKILL)
    done = await taker.expect("done", 20)
    side = redis.Redis.from_url(redis_url)
    try:
        assert side.get(f"{namespace}:tool-runs") == b"1"
    finally:
        side.close()
    assert done["model_calls"] == 2  # the taker's model ran the turn and called the tool again
    assert done["tool_results"] == ran["results"]  # the crashed attempt's result, replayed
    assert f"in pid {first.pid} (execution 1)" in done["tool_results"][0]
    assert done["text"] == "refund done"
