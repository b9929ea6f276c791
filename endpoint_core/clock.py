"""Time helpers shared by the domain: one monotonic clock, ISO-8601 instants."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]

monotonic: Clock = time.monotonic


def iso_instant(unix_seconds: float) -> str:
    """`2011-12-03T10:15:30.123Z`: UTC, millisecond precision, `Z` suffix."""
    moment = datetime.fromtimestamp(unix_seconds, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def wall_time_of(monotonic_instant: float, clock: Clock = monotonic) -> float:
    """The Unix time of a future or past instant given on the monotonic clock."""
    return time.time() + (monotonic_instant - clock())
