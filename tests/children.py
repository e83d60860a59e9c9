"""A worker child process (tests/proc_worker.py by default) whose JSON-line reports are read
against deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

WORKER = str(Path(__file__).with_name("proc_worker.py"))


class Child:
    """A proc_worker.py process whose JSON-line reports are read against deadlines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, *args: str, worker: str = WORKER) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            worker,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def expect(self, kind: str, timeout: float) -> dict[str, Any]:
        """Read reports until one of ``kind`` arrives; fail at the deadline or at EOF."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                line = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                raise AssertionError(
                    f"child {self.pid} did not report {kind!r} within {timeout}s: {self.events}"
                ) from None
            if not line:
                raise AssertionError(
                    f"child {self.pid} exited ({await self.proc.wait()}) before reporting "
                    f"{kind!r}: {self.events}"
                )
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == kind:
                return event

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        """Kill the child if it still runs (continuing it first if it was stopped) and reap it."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
            with contextlib.suppress(Exception):
                await self.proc.stdin.wait_closed()
        if self.proc.stdout is not None:
            await self.proc.stdout.read()
