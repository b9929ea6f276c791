"""Rate limits: token buckets per caller, bounded in memory.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each
request takes one, and a request that finds the bucket empty is refused with the
time until a token is back. A rate of 0 turns the limit off.

Buckets live in a TTL cache: a bucket idle for burst / rate seconds is full again,
so forgetting it changes nothing; and the cache holds at most `max_keys` buckets,
so a flood of distinct callers cannot grow memory without bound (the least
recently used bucket is dropped first, which at worst gives its caller a full
burst again).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from cachetools import TTLCache

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
        # (tokens left, when they were counted), by caller.
        self._buckets: TTLCache[Hashable, tuple[float, float]] | None = (
            TTLCache(maxsize=max_keys, ttl=burst / rate, timer=clock) if rate > 0 else None
        )

    def __len__(self) -> int:
        return 0 if self._buckets is None else len(self._buckets)

    @property
    def enabled(self) -> bool:
        return self._buckets is not None

    def wait_for(self, key: Hashable) -> float:
        """Take a token for `key`: 0.0 if one was there, else the seconds until one will be."""
        if self._buckets is None:
            return 0.0
        now = self._clock()
        tokens, counted_at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted_at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def take(self, key: Hashable, what: str) -> None:
        """Take a token for `key`, or raise RateLimited saying when to retry."""
        wait = self.wait_for(key)
        if wait > 0:
            raise RateLimited(
                f"too many {what}: at most {self.rate:g} a second (bursts of {self.burst}); "
                f"retry in {math.ceil(wait)} s",
                retry_after_seconds=wait,
            )
