"""Event-loop lag, sampled: how late a callback runs after the moment it was due.

A callback that blocks the loop delays every connection; this shows it. One timer every
SAMPLE_INTERVAL seconds measures it, so it costs nothing per packet or request.
"""

from __future__ import annotations

import asyncio
import time

from endpoint_core.counting import SECONDS_BUCKETS, BucketCounts

SAMPLE_INTERVAL = 0.5


class LoopLagSampler:
    def __init__(self, interval: float = SAMPLE_INTERVAL) -> None:
        self.interval = interval
        self.lag_seconds = BucketCounts(SECONDS_BUCKETS)
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        self._due = time.monotonic() + self.interval
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._sample)

    def _sample(self) -> None:
        self.lag_seconds.observe(max(0.0, time.monotonic() - self._due))
        self._schedule()
