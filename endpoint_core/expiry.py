"""Drives the table's timers from the asyncio loop: one TimerHandle, armed for the earliest deadline.

Deadlines are rounded up to RESOLUTION, so that thousands of endpoints with
spread-out deadlines cost a few timer wake-ups a second, each handling a batch,
rather than one wake-up (and one loop timer) per endpoint. Measured with 10,000
endpoints pinging every 10 s: re-arming a loop timer per deadline was about half
of the service's CPU.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from endpoint_core.clock import Clock, monotonic
from endpoint_core.table import EndpointTable

log = logging.getLogger("endpoint_broker.expiry")

RESOLUTION = 0.05  # seconds: how late a keepalive deadline, reminder or redelivery may run


class ExpiryDriver:
    def __init__(self, table: EndpointTable, clock: Clock = monotonic) -> None:
        self._table = table
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def start(self) -> None:
        self._table.on_earlier_deadline = self._arm
        self._fire()

    def stop(self) -> None:
        self._table.on_earlier_deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        when = math.ceil(when / RESOLUTION) * RESOLUTION
        if self._handle is not None and self._armed_for <= when:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        delay = max(0.0, when - self._clock())
        self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = math.inf
        started = time.perf_counter()
        try:
            self._table.advance()
            self._table.stats.timer_batch_seconds.observe(time.perf_counter() - started)
        except Exception:
            log.exception("expiry pass failed; retrying in a second")
            self._arm(self._clock() + 1.0)
            return
        deadline = self._table.next_deadline()
        if deadline is not None:
            self._arm(deadline)
