"""CPU accounting over a window: the service, the generator, and whatever else ran on the machine.

All figures are in % of one core (so 200% is both cores of a 2-core machine).
The machine-wide figure shows when another job on the box stole CPU from a
measurement; it is reported, never subtracted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

# A single process above this share of a core is taken as CPU-bound.
SATURATED_PCT = 90.0
# The machine above this share of all its cores is taken as CPU-bound: on 2 cores,
# three busy Python processes already queue for CPU well before 100%.
MACHINE_SATURATED = 0.8
# Someone else's load above this, during a window, is worth a note.
OTHER_LOAD_PCT = 25.0
# CPU shares over shorter windows are too coarse (10 ms ticks) to draw conclusions from.
MIN_WINDOW_S = 0.25


def _busy(times: Any) -> tuple[float, float]:
    """(all busy time, time in processes): interrupts and loopback networking are in the first only."""
    in_processes = times.user + times.system + getattr(times, "nice", 0.0)
    interrupts = getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0) + getattr(times, "steal", 0.0)
    return float(in_processes + interrupts), float(in_processes)


def _process_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


@dataclass
class CpuReport:
    seconds: float
    service_pct: float
    service_by_process: dict[str, float]
    generator_pct: float
    generator_max_pct: float  # the busiest single generator process
    machine_pct: float
    other_pct: float
    # The service's processes share one pinned core, and the generator's another.
    pinned: bool = False

    @property
    def limit(self) -> str:
        """What most likely capped this window: service, generator, machine (both), or none."""
        if self.seconds < MIN_WINDOW_S:
            return "unknown"
        busiest_service = max(self.service_by_process.values(), default=0.0)
        if (self.service_pct if self.pinned else busiest_service) >= SATURATED_PCT:
            return "service"
        if (self.generator_pct if self.pinned else self.generator_max_pct) >= SATURATED_PCT:
            return "generator"
        if self.pinned:
            # Each side has its own core: a busy machine means someone else's load (see other_pct).
            return "none"
        if self.machine_pct >= MACHINE_SATURATED * (os.cpu_count() or 1) * 100:
            # All cores busy: whoever burnt more of them is the one that held the other back.
            return "generator" if self.generator_pct > self.service_pct else "machine"
        return "none"

    def notes(self) -> list[str]:
        """Only what the CPU table does not show: someone else's load."""
        if self.seconds >= MIN_WINDOW_S and self.other_pct >= OTHER_LOAD_PCT:
            return [f"other load on the machine: {self.other_pct:.0f}% of a core"]
        return []

    def as_dict(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 3),
            "service_pct": round(self.service_pct, 1),
            "service_by_process": {k: round(v, 1) for k, v in self.service_by_process.items()},
            "generator_pct": round(self.generator_pct, 1),
            "generator_max_pct": round(self.generator_max_pct, 1),
            "machine_pct": round(self.machine_pct, 1),
            "other_pct": round(self.other_pct, 1),
            "limit": self.limit,
        }


class CpuWindow:
    """Snapshot at start(); stop() returns the shares used since."""

    def __init__(self, service: dict[str, psutil.Process], generator: list[psutil.Process],
                 pinned: bool = False) -> None:
        self.service, self.generator, self.pinned = service, generator, pinned
        self.me = psutil.Process()

    def start(self) -> CpuWindow:
        self.t0 = time.perf_counter()
        self.machine0 = _busy(psutil.cpu_times())
        self.service0 = {name: _process_seconds(p) for name, p in self.service.items()}
        self.generator0 = [_process_seconds(p) for p in self.generator]
        self.me0 = _process_seconds(self.me)
        return self

    def stop(self) -> CpuReport:
        elapsed = max(1e-9, time.perf_counter() - self.t0)

        def pct(seconds: float) -> float:
            return 100.0 * seconds / elapsed

        service = {name: pct(_process_seconds(p) - self.service0[name]) for name, p in self.service.items()}
        generator = [pct(_process_seconds(p) - s0) for p, s0 in zip(self.generator, self.generator0, strict=True)]
        me = pct(_process_seconds(self.me) - self.me0)
        busy, in_processes = _busy(psutil.cpu_times())
        machine = pct(busy - self.machine0[0])
        # The bench's own parent process counts as generator: it only coordinates.
        generator_total = sum(generator) + me
        return CpuReport(
            seconds=elapsed,
            service_pct=sum(service.values()),
            service_by_process=service,
            generator_pct=generator_total,
            generator_max_pct=max([*generator, me]),
            machine_pct=machine,
            other_pct=max(0.0, pct(in_processes - self.machine0[1]) - sum(service.values()) - generator_total),
            pinned=self.pinned,
        )
