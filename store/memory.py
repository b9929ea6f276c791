"""The `memory` store: nothing survives a restart, every commit is done at once (today's behaviour)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from endpoint_core.journal import Change, Snapshot, StoreStats


class MemoryStore:
    """A Store that keeps nothing: for tests, and for deployments that accept losing state on restart."""

    # The table then makes no records of QoS 1 events for it (endpoint_core.table.Journal).
    discards_changes = True

    def __init__(self) -> None:
        self._stats = StoreStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None  # one done future serves every caller

    def load(self) -> Snapshot:
        return Snapshot()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def append(self, changes: Sequence[Change]) -> None:
        # Dropped on purpose: the table in memory is the only copy.
        pass

    def committed(self) -> asyncio.Future[None]:
        # Already done, so an adapter awaiting it answers without yielding to the loop; a done
        # future cannot be cancelled or change, so one is shared (made in the loop that asks).
        loop, done = self._loop or asyncio.get_running_loop(), self._done
        if done is None or done.get_loop() is not loop:
            done = self._done = loop.create_future()
            done.set_result(None)
        return done

    @property
    def healthy(self) -> bool:
        return True

    @property
    def stats(self) -> StoreStats:
        return self._stats

    async def close(self) -> None:
        pass
