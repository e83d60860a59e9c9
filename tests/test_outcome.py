"""A completion whose reply is lost: the primary reads the token again once Redis answers.
Each test SIGSTOPs a redis-server of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest
from servers import STALL_OPTIONS

from strands_dedup import Deduplicator, OutcomeUnknown, Role, StoreUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def stalling(pid: int, resume_after: float) -> Any:
    """A call that stops Redis as it returns, and resumes it ``resume_after`` seconds later."""

    def call() -> str:
        os.kill(pid, signal.SIGSTOP)
        asyncio.get_running_loop().call_later(resume_after, os.kill, pid, signal.SIGCONT)
        return "value"

    return call


async def test_a_lost_completion_reply_is_recovered(redis_server_factory: type) -> None:
    server = redis_server_factory()
    pid = server.proc.pid
    try:
        async with Deduplicator.from_url(server.url, wait_timeout=20, **STALL_OPTIONS) as dedup:
            started = time.monotonic()
            outcome = await dedup.execute("tok", stalling(pid, 2.0))
            assert time.monotonic() - started >= 1.5  # it did wait for Redis
            assert (outcome.role, outcome.value) == (Role.PRIMARY, "value")
            again = await dedup.execute("tok", lambda: "never")
            assert (again.role, again.value, again.fence) == (Role.REPLAY, "value", outcome.fence)
    finally:
        os.kill(pid, signal.SIGCONT)


async def test_an_outcome_that_cannot_be_known_is_outcome_unknown(
    redis_server_factory: type,
) -> None:
    server = redis_server_factory()
    pid = server.proc.pid
    try:
        async with Deduplicator.from_url(server.url, wait_timeout=1, **STALL_OPTIONS) as dedup:
            with pytest.raises(OutcomeUnknown, match="cannot be known") as info:
                await dedup.execute("tok", stalling(pid, 4.0))
            assert isinstance(info.value, StoreUnavailable) and info.value.token == "tok"
            assert info.value.fence > 0
    finally:
        os.kill(pid, signal.SIGCONT)
