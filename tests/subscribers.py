"""A shared subscriber without a connection, driven by hand (unit tests of its bookkeeping)."""

from __future__ import annotations

import asyncio

from strands_dedup._store.subscriber import Subscriber


class HandDriven(Subscriber):
    """Never connects; `confirm` plays Redis confirming a subscription."""

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def confirm(self, channel: bytes) -> None:
        self._channels[channel].ready.set_result(None)
