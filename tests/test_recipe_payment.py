"""examples/payment_tool.py: agent processes on a real Redis whose idempotent tool charges the
payment service (a real process) through IdempotentAsyncTransport; duplicated, retried and
crashed turns charge once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from recipes import ROOT, child_env, served, uvicorn

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]
PROMPT = "charge order o-7 500 cents"
Start = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
def payments(request: pytest.FixtureRequest) -> Iterator[str]:
    delay = getattr(request, "param", "0.3")
    with served(uvicorn("examples.payment_tool:payments"), "/charges", PAYMENTS_DELAY=delay) as url:
        yield url


@pytest.fixture
async def agent(payments: str, redis_url: str, namespace: str) -> Any:
    """Start one agent turn (``python -m examples.payment_tool``) as a process."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(request: str, session: str = "s-1") -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "examples.payment_tool", PROMPT),
            *("--payments", payments, "--redis-url", redis_url, "--namespace", namespace),
            *("--session", session, "--request", request, "--lease-ttl", "1"),
            cwd=ROOT,
            env=child_env(),
            stdout=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def reply(proc: asyncio.subprocess.Process) -> str:
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    text: str = json.loads(out)["reply"]
    return text


def charges(payments: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(payments + "/charges", timeout=5).json()
    return found


async def test_a_duplicated_and_a_retried_turn_charge_once(agent: Start, payments: str) -> None:
    # the same request delivered to two replicas at once
    first, duplicate = await asyncio.gather(
        *[reply(p) for p in await asyncio.gather(agent("req-1"), agent("req-1"))]
    )
    assert first == duplicate == "Done: charged ch_1: 500 cents for order o-7"
    # the client's retry with a new request id: the model asks for the same charge again
    assert await reply(await agent("req-2")) == first
    seen = charges(payments)
    assert [c["id"] for c in seen["charges"]] == ["ch_1"]
    assert list(seen["requests_by_key"].values()) == [1]  # the tool's result was replayed


@pytest.mark.parametrize("payments", ["0.5"], indirect=True)
async def test_a_turn_killed_while_the_charge_was_answered_charges_once_after_takeover(
    agent: Start, payments: str
) -> None:
    crashed = await agent("req-1")
    deadline = time.monotonic() + 20
    while not charges(payments)["charges"]:  # the charge is made; its answer takes 0.5 s
        assert time.monotonic() < deadline, "the charge never reached the service"
        await asyncio.sleep(0.01)  # polling the service against a deadline
    os.kill(crashed.pid, signal.SIGKILL)
    # the same request again: it takes the turn over, the tool runs again (it never returned)
    assert await reply(await agent("req-1")) == "Done: charged ch_1: 500 cents for order o-7"
    seen = charges(payments)
    assert [c["id"] for c in seen["charges"]] == ["ch_1"]
    assert list(seen["requests_by_key"].values()) == [2]  # sent twice, with the same key
