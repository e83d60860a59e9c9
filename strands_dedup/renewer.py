"""One renewer per deduplicator (so per event loop): every held lease, one round trip a period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .keys import TokenKeys
from .protocol import Role
from .store import HeldLeaseRef, RedisStore

__all__ = ["HeldLease", "Renewer"]

log = logging.getLogger("strands_dedup.renewer")


@dataclass(eq=False, slots=True)
class HeldLease:
    """A lease this process holds while its primary runs."""

    keys: TokenKeys
    owner: str
    fence: int
    value: bytes
    role: Role
    fingerprint: str | None
    started: float = field(default_factory=time.monotonic)
    lost: bool = False
    task: asyncio.Task[Any] | None = None
    """The primary's task, set only when a lost lease should cancel it."""
    cancelling: bool = False


class Renewer:
    """Renews all held leases together, every ``interval`` seconds, with one script call.

    The task exists only while leases are held. A lease found lost (another owner claimed the
    token, or a result is stored) is dropped and reported to ``on_lost``.
    """

    def __init__(
        self, store: RedisStore, interval: float, on_lost: Callable[[HeldLease], None]
    ) -> None:
        self._store = store
        self._interval = interval
        self._on_lost = on_lost
        self._held: dict[str, HeldLease] = {}
        self._task: asyncio.Task[None] | None = None
        self.last_renewal: float | None = None
        self.lag = 0.0
        """How late the last renewal finished after it was due (seconds)."""

    @property
    def held(self) -> int:
        return len(self._held)

    def add(self, lease: HeldLease) -> None:
        self._held[lease.owner] = lease
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="strands-dedup-renewer"
            )

    def discard(self, lease: HeldLease) -> None:
        self._held.pop(lease.owner, None)

    async def _run(self) -> None:
        while self._held:
            due = time.monotonic() + self._interval
            await asyncio.sleep(self._interval)
            leases = list(self._held.values())
            if not leases:
                break
            try:
                alive = await self._store.renew([HeldLeaseRef(x.keys, x.value) for x in leases])
            except Exception as exc:  # keep renewing: the next period may reach Redis again
                log.warning("lease renewal failed (%d leases): %s", len(leases), exc)
                continue
            self.last_renewal = time.monotonic()
            self.lag = max(0.0, self.last_renewal - due)
            for lease, ok in zip(leases, alive, strict=True):
                if not ok and self._held.pop(lease.owner, None) is not None:
                    lease.lost = True
                    self._on_lost(lease)

    async def aclose(self) -> None:
        self._held.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
