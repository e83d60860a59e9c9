"""Per-identity budgets of the HTTP surfaces: new keys per window, and bytes kept stored.

One identity (the digest that scopes its keys; every anonymous caller is one identity) may claim
``max_new_keys`` new keys per ``new_keys_window`` and keep ``max_stored_bytes`` stored (its
retained responses, plus `KEY_COST` per new key for the keys a claim leaves), across the fleet:
the counters live in Redis (budget.lua), in the identity's own hash slot.

So that a replay costs no round trip and a new key rarely one, each process reserves new keys
for an identity in blocks (1, 2, 4, ... up to 1/50 of the limit), checks before the claim that
one is left, and spends it once the claim made a new key (a replay or a duplicate spends
nothing). Stored bytes are
counted locally and reported with the next reservation, or at once past 1/64 of the byte
budget. The fleet can therefore pass a limit by at most one block (or one report) per process,
plus the requests in flight. A reservation that ended with its window is void.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

from .._engine.deduplicator import Deduplicator
from .._errors import DedupError
from ._policy import HttpConfig, Rejected

__all__ = ["KEY_COST", "Budgets", "Refusal", "stored_size"]

log = logging.getLogger("strands_dedup.http")

KEY_COST = 256
"""Bytes charged per new key for what it leaves in Redis besides its response's envelope: the
fence counter (136 bytes while the call runs or after a failure; a stored result deletes it) and
the result key's own overhead (about 100 bytes); MEMORY USAGE on Redis 7.0 for a 32-character
key in an identity's scope."""
_ENTRIES = 10_000  # identities remembered per process (the least recent is forgotten)
_OP_TTL_MS = 60_000  # how long a reservation's marker recognises a retried copy
_BUCKETS = 24  # stored bytes are counted in 24 buckets over the results' TTL


def stored_size(payload: int) -> int:
    """What Redis takes to hold a result of ``payload`` bytes: its envelope's header added, and
    rounded up to the allocator's size class (jemalloc: four classes per power of two)."""
    size = payload + 256
    spacing = 1 << max(3, size.bit_length() - 3)
    return -(-size // spacing) * spacing


@dataclass(frozen=True, slots=True)
class Refusal:
    """An identity over one of its budgets: which one, and when to try again."""

    budget: Literal["keys", "bytes"]
    retry_after: float
    """Seconds until the budget has room again."""
    limit: int

    def rejected(self, window: float) -> Rejected:
        """The 429 problem of this refusal."""
        seconds = str(max(1, math.ceil(self.retry_after))).encode()
        if self.budget == "keys":
            return Rejected(
                429,
                "key-budget",
                "Too many new keys",
                f"this caller used its {self.limit} new Idempotency-Keys per {window:g}s; "
                "keys already stored or running are still answered",
                [(b"retry-after", seconds)],
            )
        return Rejected(
            429,
            "byte-budget",
            "Too much stored",
            f"this caller's stored responses reached {self.limit} bytes; "
            "keys already stored or running are still answered",
            [(b"retry-after", seconds)],
        )


class _Entry:
    """One identity's budget as this process sees it."""

    __slots__ = (
        "block",
        "full_until",
        "keys",
        "lock",
        "pending",
        "refused_until",
        "reporting",
        "until",
    )

    def __init__(self) -> None:
        self.keys = 0
        """Keys reserved here and not spent yet."""
        self.until = 0.0
        """When the window they were reserved in ends (monotonic)."""
        self.refused_until = 0.0
        """The window's keys are all taken until then."""
        self.full_until = 0.0
        """The byte budget is spent until then."""
        self.block = 1
        self.pending = 0
        """Bytes stored and not reported yet."""
        self.reporting = False
        self.lock = asyncio.Lock()


class Budgets:
    """The budgets of one middleware's callers (see the module docstring)."""

    def __init__(self, dedup: Deduplicator, config: HttpConfig) -> None:
        self._dedup = dedup
        result_ttl_ms = dedup.config.result_ttl_ms
        self.max_keys = config.max_new_keys
        self.window = config.new_keys_window
        self.max_bytes = config.max_stored_bytes
        self._window_ms = max(1, int(config.new_keys_window * 1000))
        self._bucket_ms = max(1000, -(-result_ttl_ms // _BUCKETS))
        self._buckets = -(-result_ttl_ms // self._bucket_ms) + 1
        self._max_block = max(1, self.max_keys // 50)
        self._report_every = max(64 * 1024, self.max_bytes // 64)
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._reports: set[asyncio.Task[None]] = set()

    def _entry(self, identity: str) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = self._entries[identity] = _Entry()
            if len(self._entries) > _ENTRIES:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(identity)
        return entry

    def _local(self, entry: _Entry) -> Refusal | bool:
        """Decided without Redis: a refusal, True (room for a new key) or False (reserve)."""
        now = time.monotonic()
        if self.max_bytes and entry.full_until > now:
            return Refusal("bytes", entry.full_until - now, self.max_bytes)
        if not self.max_keys or (entry.keys > 0 and entry.until > now):
            return True
        if entry.refused_until > now:
            return Refusal("keys", entry.refused_until - now, self.max_keys)
        return False

    async def admit(self, identity: str) -> Refusal | None:
        """Whether ``identity`` may claim a new key: None, or the `Refusal`. Nothing is spent
        here (a replay or a duplicate spends nothing): `spend` does, once the key is claimed.
        `StoreUnavailable` when Redis cannot be asked."""
        entry = self._entry(identity)
        decided = self._local(entry)
        while decided is False:
            async with entry.lock:  # one reservation at a time; the others then use it
                decided = self._local(entry)
                if decided is False:
                    if entry.until <= time.monotonic():
                        entry.keys = min(entry.keys, 0)  # what is left of a past window is void
                    await self._reserve(identity, entry, entry.block - entry.keys)
                    decided = self._local(entry)
                    if decided is False:  # granted nothing: the window is full
                        decided = Refusal(
                            "keys", max(0.0, entry.until - time.monotonic()), self.max_keys
                        )
        return decided if isinstance(decided, Refusal) else None

    def spend(self, identity: str) -> None:
        """``identity`` claimed a new key. Admissions in flight together may spend more than
        was reserved: the next reservation takes that debt first."""
        if self.max_keys:
            self._entry(identity).keys -= 1

    def charge(self, identity: str, size: int) -> None:
        """``size`` bytes were stored for ``identity`` (reported later, or now if many)."""
        if not self.max_bytes:
            return
        entry = self._entry(identity)
        entry.pending += size
        if entry.pending >= self._report_every and not entry.reporting:
            entry.reporting = True  # one report at a time: the next one takes what came since
            task = asyncio.get_running_loop().create_task(self._report(identity, entry))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)

    async def _report(self, identity: str, entry: _Entry) -> None:
        try:
            with contextlib.suppress(DedupError):  # the bytes stay pending for the next one
                await self._reserve(identity, entry, 0)
        finally:
            entry.reporting = False

    async def _reserve(self, identity: str, entry: _Entry, wanted: int) -> None:
        added, entry.pending = entry.pending, 0
        args = (
            wanted,
            self.max_keys or wanted,
            self._window_ms,
            added,
            self.max_bytes,
            self._bucket_ms,
            self._buckets,
            _OP_TTL_MS,
        )
        try:
            reply = await self._dedup.reserve_budget(identity, os.urandom(8).hex(), args)
            granted, key_ms, stored, byte_ms = reply
        except BaseException:
            entry.pending += added
            raise
        now = time.monotonic()
        if wanted:
            entry.until = now + key_ms / 1000
            entry.keys += granted
            if entry.keys > 0:
                entry.block = min(2 * entry.block, self._max_block)
            else:
                entry.refused_until = entry.until
        if self.max_bytes and stored >= self.max_bytes:
            entry.full_until = now + max(byte_ms, 1000) / 1000
            log.debug("an identity's stored bytes reached its budget (%d bytes)", stored)
