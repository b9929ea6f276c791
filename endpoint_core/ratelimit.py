"""Rate limits: token buckets per caller, bounded in memory.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
request takes one, and a request that finds the bucket empty is refused with the
time until a token is back. A rate of 0 turns the limit off.

Buckets live in a dict kept in order of last use: a bucket idle for burst / rate
seconds is full again, so forgetting it changes nothing; and the dict holds at
most `max_keys` buckets, so a flood of distinct callers cannot grow memory
without bound (the least recently used bucket is dropped first, which at worst
gives its caller a full burst again). Every MQTT CONNECT takes a token, and a
plain dict costs a fraction of cachetools' TTLCache there.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from endpoint_core.clock import Clock, monotonic
from endpoint_core.errors import RateLimited

MAX_BUCKETS = 100_000  # per limit: about 20 MB at most


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Each limit's rate (per second, 0 = off) and burst. The defaults of the settings of the same names."""

    # One backend may rightly send thousands of events a second: off unless configured.
    send_event_rate_per_second: float = 0.0
    send_event_burst: int = 2000
    # REST registrations per caller; the burst is above the per-user cap of 100 endpoints.
    register_rate_per_second: float = 20.0
    register_burst: int = 200
    # MQTT CONNECTs per client id: a reconnect loop cannot keep the table and the log busy.
    connect_rate_per_second: float = 2.0
    connect_burst: int = 10


class TokenBuckets:
    def __init__(self, rate: float, burst: int, clock: Clock = monotonic, max_keys: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_keys = max_keys
        self._full_after = burst / rate if rate > 0 else 0.0  # idle this long, a bucket is full again
        # (tokens left, when they were counted), by caller, least recently used first.
        self._buckets: dict[Hashable, tuple[float, float]] | None = {} if rate > 0 else None

    def __len__(self) -> int:
        return 0 if self._buckets is None else len(self._buckets)

    @property
    def enabled(self) -> bool:
        return self._buckets is not None

    def wait_for(self, key: Hashable) -> float:
        """Take a token for `key`: 0.0 if one was there, else the seconds until one will be."""
        if self._buckets is None:
            return 0.0
        buckets = self._buckets
        now = self._clock()
        tokens, counted_at = buckets.pop(key, (float(self.burst), now))  # re-added last: in use
        tokens = min(float(self.burst), tokens + (now - counted_at) * self.rate)
        wait = 0.0
        if tokens < 1.0:
            wait = (1.0 - tokens) / self.rate
        else:
            tokens -= 1.0
        buckets[key] = (tokens, now)
        self._forget(buckets, now)
        return wait

    def _forget(self, buckets: dict[Hashable, tuple[float, float]], now: float) -> None:
        """Drop the least recently used buckets that are full again, or over max_keys."""
        while buckets:
            oldest = next(iter(buckets))
            if len(buckets) <= self._max_keys and now - buckets[oldest][1] < self._full_after:
                return
            del buckets[oldest]

    def take(self, key: Hashable, what: str) -> None:
        """Take a token for `key`, or raise RateLimited saying when to retry."""
        wait = self.wait_for(key)
        if wait > 0:
            raise RateLimited(
                f"too many {what}: at most {self.rate:g} a second (bursts of {self.burst}); "
                f"retry in {math.ceil(wait)} s",
                retry_after_seconds=wait,
            )
