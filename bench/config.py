"""Profiles (full, --quick, --issue13), the sessions they expand to, and the machine limits that cap them."""

from __future__ import annotations

import math
import os
import resource
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

from bench.systems import DEFAULT_SYSTEMS

SCENARIOS = ("send", "connect", "memory", "keepalive")
# `reconnect` (the storm after a restart) runs by default in the issue13 profile only.
ALL_SCENARIOS = (*SCENARIOS, "reconnect")
# Keep-alive of connect-only sessions, whose endpoints never ping: long enough
# that no service expires a silent subscriber during a session.
SILENT_KEEP_ALIVE_S = 300
# Descriptors each process keeps for itself besides one per connection.
FD_MARGIN = 500
# Budget per connection for the capacity check: bare amqtt's ~51 KB plus the
# generator's share and the kernel's socket buffers, with room to spare.
BYTES_PER_CONNECTION_BUDGET = 160 * 1024
# Connections per loopback source address (127.0.0.1, .2, ...). Linux picks the
# ephemeral port per source address, from 32768-60999 (~28k), and connect() tries
# even ports first: past ~14k connections to one destination each connect()
# scans thousands of taken ports, and the generator, not the broker, slows down.
CONNECTIONS_PER_SOURCE_IP = 10_000


@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    send_sizes: tuple[int, ...]  # scenario 1: connected endpoints while sendEvent runs
    connect_sizes: tuple[int, ...]  # scenario 2
    idle_size: int  # scenarios 3 and 4
    send_seconds: float  # HTTP load per QoS level
    send_concurrency: int  # concurrent HTTP requests
    ping_period_s: float
    ping_keep_alive_s: int
    keepalive_warmup_s: float
    keepalive_window_s: float
    settle_s: float  # after connecting, before reading RSS
    mqtt_workers: int  # generator processes holding the subscribers
    connect_concurrency: int  # CONNECT handshakes in flight, all workers together
    max_minutes: float  # no new session starts after this; the run then reports what it has
    scenarios: tuple[str, ...] = SCENARIOS  # run when --scenarios is not given
    systems: tuple[str, ...] = DEFAULT_SYSTEMS  # run when --targets is not given
    # Every user owns one endpoint (so every endpoint has its own token), and each sendEvent
    # names its endpoint (userEndpointId). Off: user u owns 1 + u % 3 endpoints, fanned out to.
    one_endpoint_per_user: bool = False
    # (service CPU, generator CPU): every system process on the first, every generator process
    # and the bench itself on the second. None: the scheduler places them.
    pin_cpus: tuple[int, int] | None = None
    target_set: str = "round1"  # which issue's targets the report checks: round1 or issue13


FULL = Profile(
    name="full", runs=3, send_sizes=(1_000, 10_000), connect_sizes=(1_000, 10_000, 50_000), idle_size=10_000,
    send_seconds=8.0, send_concurrency=64, ping_period_s=10.0, ping_keep_alive_s=15, keepalive_warmup_s=5.0,
    keepalive_window_s=30.0, settle_s=3.0, mqtt_workers=2, connect_concurrency=96, max_minutes=40.0,
)
# Small sizes and short windows, still 3 runs: a smoke test of every path in ~5 minutes.
QUICK = replace(
    FULL, name="quick", send_sizes=(200, 1_000), connect_sizes=(200, 1_000, 2_000), idle_size=1_000,
    send_seconds=2.0, send_concurrency=32, keepalive_warmup_s=2.0, keepalive_window_s=6.0, settle_s=1.0,
    max_minutes=15.0,
)
# Issue 13's measurement: one core for the service stack, one for the generator, both pinned;
# 1,000 subscribers with one endpoint per user, 32 closed-loop workers, against the lean stack;
# connects at 1k and 10k, and 10k reconnecting after a restart of the system.
ISSUE13 = replace(
    FULL, name="issue13", send_sizes=(1_000,), connect_sizes=(1_000, 10_000), idle_size=10_000,
    send_concurrency=32, max_minutes=30.0, scenarios=ALL_SCENARIOS, systems=("ours", "lean"),
    one_endpoint_per_user=True, pin_cpus=(0, 1), target_set="issue13",
)
PROFILES = {"full": FULL, "quick": QUICK, "issue13": ISSUE13}


@dataclass
class Session:
    """One fresh start of a system: connect `size` endpoints, then run the selected steps on them."""

    size: int
    requested: int  # the size asked for, before the machine's limits capped it
    keep_alive: int
    ping: bool  # endpoints PINGREQ every ping_period_s from the moment they are connected
    record_connect: bool = False
    memory: bool = False
    keepalive: bool = False
    send: bool = False
    reconnect: bool = False  # last: restart the system, reconnect every endpoint at once
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        steps = [s for s, on in (("connect", self.record_connect), ("memory", self.memory),
                                 ("keepalive", self.keepalive), ("send", self.send),
                                 ("reconnect", self.reconnect)) if on]
        return f"n={self.size} [{', '.join(steps)}]"


@dataclass(frozen=True)
class Limits:
    max_endpoints: int
    reason: str
    fd_soft: int
    fd_hard: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_limits() -> Limits:
    """How many endpoints one broker process can hold here: descriptors and memory."""
    soft, hard = raise_fd_limit()
    fd_cap = hard - FD_MARGIN
    memory_cap = int(psutil.virtual_memory().available * 0.5 // BYTES_PER_CONNECTION_BUDGET)
    if fd_cap <= memory_cap:
        reason = (f"RLIMIT_NOFILE hard limit is {hard} per process and it cannot be raised here "
                  "(needs CAP_SYS_RESOURCE); every broker holds one descriptor per connection")
        return Limits(fd_cap, reason, soft, hard)
    return Limits(memory_cap, "half the available memory at ~160 KB per connection", soft, hard)


def check_pinning(cpus: tuple[int, int]) -> None:
    """Both CPUs must be distinct and usable by this process; else the measurement cannot be what it says."""
    usable = os.sched_getaffinity(0)
    if cpus[0] == cpus[1] or not set(cpus) <= usable:
        raise ValueError(f"pinning needs two distinct CPUs this process may use ({sorted(usable)}), "
                         f"got {cpus[0]} for the service and {cpus[1]} for the generator")


def source_ips(n: int) -> list[str | None]:
    """Source addresses for n connections: None (the default, 127.0.0.1) up to 10k, then 127.0.0.2, .3, ..."""
    extra = max(0, math.ceil(n / CONNECTIONS_PER_SOURCE_IP) - 1)
    return [None, *(f"127.0.0.{i}" for i in range(2, extra + 2))]


def build_sessions(profile: Profile, scenarios: tuple[str, ...], limits: Limits) -> list[Session]:
    """Fewest fresh starts: the idle-size session serves memory, keepalive, and sendEvent at that size."""
    sessions: list[Session] = []

    def pinging(n: int) -> Session:
        found = next((s for s in sessions if s.requested == n and s.ping), None)
        if found is None:
            found = Session(n, n, profile.ping_keep_alive_s, ping=True)
            sessions.append(found)
        return found

    if "memory" in scenarios or "keepalive" in scenarios or "reconnect" in scenarios:
        idle = pinging(profile.idle_size)
        idle.memory, idle.keepalive = "memory" in scenarios, "keepalive" in scenarios
        idle.reconnect = "reconnect" in scenarios
    if "send" in scenarios:
        for n in profile.send_sizes:
            pinging(n).send = True
    if "connect" in scenarios:
        for n in profile.connect_sizes:
            same = next((s for s in sessions if s.requested == n), None)
            if same is None:
                same = Session(n, n, SILENT_KEEP_ALIVE_S, ping=False)
                sessions.append(same)
            same.record_connect = True
    for session in sessions:
        if session.size > limits.max_endpoints:
            session.size = limits.max_endpoints
            session.notes.append(f"capped at {session.size:,} endpoints instead of {session.requested:,}: "
                                 f"{limits.reason}")
    return sorted(sessions, key=lambda s: s.size)
