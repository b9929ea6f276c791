"""One session: a fresh system, generator workers, and the selected measurements on N endpoints.

Each finished measurement becomes a record at once, so a later failure or
timeout keeps what was measured; steps that never ran are recorded as failed
with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import config, procs
from bench.cpu import CpuReport, CpuWindow
from bench.systems import BEFORE_BASED, RESTART_STOP_GRACE_S, START_TIMEOUT_S, System, make_system
from bench.worker import percentile

HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
COLLECT_QUIET_S = 0.5
COLLECT_MAX_WAIT_S = 10.0
# Generous per-call margins over the worker's own deadlines.
CALL_MARGIN_S = 20.0
_phase_ids = itertools.count(1)


@dataclass
class Record:
    system: str
    run: int
    scenario: str  # send | connect | memory | keepalive | reconnect
    n: int
    qos: int | None = None
    values: dict[str, float | None] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    partial: bool = False
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.scenario} n={self.n}" + ("" if self.qos is None else f" qos={self.qos}")


@dataclass
class Context:
    profile: config.Profile
    secret: str
    workdir: Path
    log_level: str
    record: Callable[[Record], None]
    ours_dir: Path  # the checkout whose run_broker.py is "ours" (default: this one)
    before_dir: Path | None = None  # the older code that "before" and "before-memory" run


def code_dir(ctx: Context, system_name: str) -> Path:
    if system_name in BEFORE_BASED:
        assert ctx.before_dir is not None, "the CLI requires --before-dir for these systems"
        return ctx.before_dir
    return ctx.ours_dir


def connect_deadline(n: int) -> float:
    """Time allowed to connect n endpoints: enough for bare amqtt at 10k (~60/s; its rate falls as N grows)."""
    return 20.0 + n / 60.0


def session_timeout(profile: config.Profile, session: config.Session) -> float:
    budget = 60.0 + connect_deadline(session.size) + CALL_MARGIN_S + profile.settle_s
    if session.keepalive:
        budget += profile.keepalive_warmup_s + profile.keepalive_window_s + 2 * CALL_MARGIN_S
    if session.send:
        budget += 2 * (profile.send_seconds + REQUEST_TIMEOUT_S + COLLECT_MAX_WAIT_S + 2 * CALL_MARGIN_S)
    if session.reconnect:
        budget += (RESTART_STOP_GRACE_S + START_TIMEOUT_S + connect_deadline(session.size) + HANDSHAKE_TIMEOUT_S
                   + 3 * CALL_MARGIN_S)
    return budget


class SessionRunner:
    def __init__(self, ctx: Context, system_name: str, session: config.Session, run: int) -> None:
        self.ctx, self.session, self.run_index = ctx, session, run
        self.profile = ctx.profile
        tag = f"run{run}-{system_name}-n{session.size}{'-idle' if session.memory or session.keepalive else ''}"
        pin = self.profile.pin_cpus
        service_cpus, generator_cpus = (frozenset({pin[0]}), frozenset({pin[1]})) if pin else (None, None)
        self.system: System = make_system(system_name, ctx.workdir, tag, ctx.secret, session.send, ctx.log_level,
                                          code_dir(ctx, system_name), service_cpus)
        self.mqtt_workers = [procs.Worker(f"mqtt-worker-{i}", ctx.workdir / f"{tag}-worker{i}.log", generator_cpus)
                             for i in range(self.profile.mqtt_workers)]
        self.http_worker = (procs.Worker("http-worker", ctx.workdir / f"{tag}-http.log", generator_cpus)
                            if session.send else None)
        self.pending = self._planned_records()
        self.connected = 0
        self.connect_incomplete = False  # not every endpoint connected (deadline or failures)
        self.connect_rate: float | None = None

    # ------------------------------------------------------------ plumbing

    def _planned_records(self) -> list[Record]:
        s, name = self.session, self.system.name
        planned = []
        if s.record_connect:
            planned.append(Record(name, self.run_index, "connect", s.size))
        if s.memory:
            planned.append(Record(name, self.run_index, "memory", s.size))
        if s.keepalive:
            planned.append(Record(name, self.run_index, "keepalive", s.size))
        if s.send:
            planned += [Record(name, self.run_index, "send", s.size, qos) for qos in (0, 1)]
        if s.reconnect:
            planned.append(Record(name, self.run_index, "reconnect", s.size))
        for record in planned:
            record.notes += s.notes
            record.extra["requested_n"] = s.requested
        return planned

    def _take(self, scenario: str, qos: int | None = None) -> Record:
        record = next(r for r in self.pending if r.scenario == scenario and r.qos == qos)
        self.pending.remove(record)
        return record

    def _emit(self, record: Record) -> None:
        record.notes = list(dict.fromkeys(record.notes))  # unique, in order
        self.ctx.record(record)

    @property
    def workers(self) -> list[procs.Worker]:
        return self.mqtt_workers + ([self.http_worker] if self.http_worker else [])

    def cpu_window(self, broker_only: bool = False) -> CpuWindow:
        processes = [self.system.broker] if broker_only else self.system.processes
        service = {p.name: p.ps for p in processes if p is not None and p.ps is not None}
        generator = [w.ps for w in self.workers if w.ps is not None]
        return CpuWindow(service, generator, pinned=self.profile.pin_cpus is not None)

    def check_alive(self) -> None:
        for process in self.system.processes:
            process.check_alive()

    # ------------------------------------------------------------- the run

    async def run(self) -> None:
        try:
            await asyncio.wait_for(self._steps(), session_timeout(self.profile, self.session))
        except TimeoutError:
            self._fail_pending("session timed out", partial=True)
        except Exception as exc:  # any failure is reported against the steps it prevented
            self._fail_pending(f"{type(exc).__name__}: {exc}")
        finally:
            await self._teardown()

    def skip(self, reason: str) -> None:
        """Record every planned measurement of this session as not done, without starting anything."""
        self._fail_pending(reason)

    def _fail_pending(self, reason: str, partial: bool = False) -> None:
        for record in list(self.pending):
            record.error = reason[:500]
            record.partial = partial
            self._emit(record)
        self.pending.clear()

    async def _teardown(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                await worker.stop()
        with contextlib.suppress(Exception):
            await self.system.stop()
        log_notes = scan_log(self.system)
        if log_notes:
            self.ctx.record(Record(self.system.name, self.run_index, "log", self.session.size, notes=log_notes))

    async def _steps(self) -> None:
        await self.system.start()
        await asyncio.gather(*(w.start() for w in self.workers))
        await asyncio.sleep(1.0)  # let the fresh processes go idle before the "before" RSS
        assert self.system.broker is not None and self.system.broker.ps is not None
        rss_before = self.system.broker.ps.memory_info().rss
        await self._start_pings()
        await self._connect()
        if self.session.memory or self.session.keepalive:
            await self._settle_and_measure_memory(rss_before)
        if self.session.keepalive:
            await self._keepalive()
        if self.session.send:
            for qos in (0, 1):
                await self._send(qos)
        if self.session.reconnect:
            await self._reconnect()

    async def _start_pings(self) -> None:
        if self.session.ping:
            # Every endpoint pings every ping_period_s from the moment it is connected, like a live
            # client, so that no broker expires it whatever the session's length; the connect,
            # keepalive and sendEvent measurements all run with this background.
            max_s = session_timeout(self.profile, self.session)
            await asyncio.gather(*(w.call({"cmd": "ping_start", "period_s": self.profile.ping_period_s,
                                           "max_s": max_s}, 10.0) for w in self.mqtt_workers))

    # ------------------------------------------------------------- connect

    async def _connect_all(self) -> tuple[Record, CpuReport]:
        """Connect and subscribe every prepared endpoint, `connect_concurrency` handshakes in flight."""
        deadline = connect_deadline(self.session.size)
        per_worker = max(1, self.profile.connect_concurrency // len(self.mqtt_workers))
        window = self.cpu_window().start()
        replies = await asyncio.gather(*(w.call({
            "cmd": "connect", "concurrency": per_worker, "deadline_s": deadline,
            "handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
        }, deadline + HANDSHAKE_TIMEOUT_S + CALL_MARGIN_S) for w in self.mqtt_workers))
        cpu = window.stop()
        self.check_alive()
        return connect_record(replies), cpu

    async def _connect(self) -> None:
        s = self.session
        await asyncio.gather(*(w.call({
            "cmd": "prepare", "host": "127.0.0.1", "port": self.system.mqtt_port, "n": s.size,
            "workers": len(self.mqtt_workers), "worker_index": i, "style": self.system.style.value,
            "secret": self.ctx.secret, "keep_alive": s.keep_alive, "source_ips": config.source_ips(s.size),
            "one_per_user": self.profile.one_endpoint_per_user,
        }, 60.0) for i, w in enumerate(self.mqtt_workers)))
        record, cpu = await self._connect_all()
        self.connected = int(record.values.get("connected") or 0)
        self.connect_incomplete = self.connected < s.size
        # For projecting larger sizes: the rate with the table nearly full, where there is one.
        self.connect_rate = record.values.get("late_rate") or record.values.get("rate")
        assert self.system.broker is not None and self.system.broker.ps is not None
        record.extra["rss_after_mb"] = round(self.system.broker.ps.memory_info().rss / 2**20, 1)
        if s.record_connect:
            target = self._take("connect")
            target.values, target.extra = record.values, {**target.extra, **record.extra}
            target.partial, target.cpu = record.partial, cpu.as_dict()
            target.notes += record.notes + cpu.notes()
            self._emit(target)
        if self.connected == 0:
            raise RuntimeError(f"no endpoint could connect: {record.notes}")
        if self.connect_incomplete:
            # Every later figure of this session is then about fewer endpoints than asked.
            for pending in self.pending:
                pending.partial = True
                pending.notes.append(f"only {self.connected:,} of {s.size:,} endpoints connected")
                pending.extra["endpoints"] = self.connected

    # -------------------------------------------------- memory and keepalive

    async def _settle_and_measure_memory(self, rss_before: int) -> None:
        window = self.cpu_window(broker_only=True).start()
        await asyncio.sleep(self.profile.settle_s)
        idle = window.stop()
        assert self.system.broker is not None and self.system.broker.ps is not None
        rss_after = self.system.broker.ps.memory_info().rss
        if not self.session.memory:
            return
        record = self._take("memory")
        record.values = {"kb_per_endpoint": (rss_after - rss_before) / self.connected / 1024}
        record.extra.update(rss_before_mb=round(rss_before / 2**20, 1), rss_after_mb=round(rss_after / 2**20, 1),
                            endpoints=self.connected, idle_cpu_pct=round(idle.service_pct, 1))
        self._emit(record)

    async def _status(self) -> dict[str, int]:
        replies = await asyncio.gather(*(w.call({"cmd": "status"}, 10.0) for w in self.mqtt_workers))
        return {k: sum(r[k] for r in replies) for k in ("clients", "closed", "pings", "pingresps")}

    async def _keepalive(self) -> None:
        """Broker CPU over a window while every endpoint pings every ping_period_s (started at connect)."""
        p = self.profile
        record = self._take("keepalive")
        await asyncio.sleep(p.keepalive_warmup_s)
        before = await self._status()
        window = self.cpu_window(broker_only=True).start()
        await asyncio.sleep(p.keepalive_window_s)
        cpu = window.stop()
        after = await self._status()
        self.check_alive()
        pings, pingresps = after["pings"] - before["pings"], after["pingresps"] - before["pingresps"]
        record.values = {"cpu_pct": cpu.service_pct}
        record.cpu = cpu.as_dict()
        record.extra.update(endpoints=self.connected, keep_alive_s=self.session.keep_alive, pings=pings,
                            pingresps=pingresps, pings_per_s=round(pings / cpu.seconds, 1), closed=after["closed"])
        record.notes += cpu.notes()
        if after["closed"]:
            record.notes.append(f"{after['closed']} endpoints were disconnected while pinging "
                                f"every {p.ping_period_s:g} s")
        if pingresps < 0.99 * pings:
            record.notes.append(f"only {pingresps} PINGRESP for {pings} PINGREQ in the window")
        record.partial = self.connected < self.session.size or bool(after["closed"])
        self._emit(record)

    # ----------------------------------------------------------------- send

    async def _send(self, qos: int) -> None:
        p, phase = self.profile, next(_phase_ids)
        record = self._take("send", qos)
        assert self.http_worker is not None
        window = self.cpu_window().start()
        load = await self.http_worker.call({
            "cmd": "load", "host": "127.0.0.1", "port": self.system.http_port, "n": self.session.size,
            "secret": self.ctx.secret, "duration_s": p.send_seconds, "concurrency": p.send_concurrency,
            "qos": qos, "phase": phase, "max_requests": int(p.send_seconds * 100_000),
            "request_timeout_s": REQUEST_TIMEOUT_S, "one_per_user": p.one_endpoint_per_user,
        }, p.send_seconds + REQUEST_TIMEOUT_S + CALL_MARGIN_S)
        cpu = window.stop()
        collected = await asyncio.gather(*(w.call({
            "cmd": "collect", "phase": phase, "quiet_s": COLLECT_QUIET_S, "max_wait_s": COLLECT_MAX_WAIT_S,
        }, COLLECT_MAX_WAIT_S + CALL_MARGIN_S) for w in self.mqtt_workers))
        self.check_alive()
        fill_send_record(record, load, collected)
        if load["ok_requests"]:
            # The service's CPU (every process of the system) per 1,000 answered calls, in ms.
            record.values["cpu_ms_per_1k_calls"] = (cpu.service_pct / 100 * cpu.seconds * 1e6
                                                    / load["ok_requests"])
        record.cpu = cpu.as_dict()
        record.notes += cpu.notes()
        self._emit(record)

    # ------------------------------------------------------------ reconnect

    async def _reconnect(self) -> None:
        """The storm: restart the system (ours on the same data dir, so its store restores every
        endpoint), then reconnect every endpoint at once, each with its own token as before."""
        record = self._take("reconnect")
        await asyncio.gather(*(w.call({"cmd": "ping_stop"}, 10.0) for w in self.mqtt_workers))
        began = asyncio.get_running_loop().time()
        await self.system.stop(RESTART_STOP_GRACE_S)
        # Drop the closed clients before 10k new connections need ephemeral ports.
        await asyncio.gather(*(w.call({"cmd": "reset"}, 30.0) for w in self.mqtt_workers))
        await self.system.start_again()
        restart_s = asyncio.get_running_loop().time() - began
        await self._start_pings()
        measured, cpu = await self._connect_all()
        record.values, record.partial, record.cpu = measured.values, measured.partial, cpu.as_dict()
        record.extra.update(measured.extra, restart_s=round(restart_s, 2), endpoints_before=self.connected)
        record.notes += measured.notes + cpu.notes()
        self._emit(record)


# ------------------------------------------------------------------ results


def connect_record(replies: list[dict[str, Any]]) -> Record:
    """Merge the workers' connect replies into one rate, plus the first and last 10% of the table."""
    record = Record("", 0, "connect", 0)
    started = min(r["t_start"] for r in replies)
    done = sorted(r["t_start"] + offset for r in replies for offset in r["done_at"])
    attempted = sum(r["attempted"] for r in replies)
    failed = sum(r["failed"] for r in replies)
    connected = len(done)
    values: dict[str, float | None] = {"connected": connected, "rate": None, "early_rate": None,
                                       "late_rate": None}
    if connected:
        values["rate"] = connected / max(1e-9, done[-1] - started)
        # The rate while the table is 10-20% and 80-90% full: past the ramp-up, before the drain.
        tenth = connected // 10
        if tenth >= 50:  # smaller slices are too short to time
            values["early_rate"] = tenth / max(1e-9, done[2 * tenth - 1] - done[tenth - 1])
            values["late_rate"] = tenth / max(1e-9, done[9 * tenth - 1] - done[8 * tenth - 1])
    values["handshake_p50_ms"] = statistics.median(r["handshake_p50_ms"] for r in replies)
    values["handshake_p99_ms"] = max(r["handshake_p99_ms"] for r in replies)
    record.values = values
    record.extra = {"attempted": attempted, "failed": failed}
    if any(r["timed_out"] for r in replies):
        record.partial = True
        record.notes.append(f"connect deadline reached after {connected} of {attempted} endpoints")
    if failed:
        record.partial = True
        errors: dict[str, int] = {}
        for r in replies:
            for text, count in r["errors"].items():
                errors[text] = errors.get(text, 0) + count
        record.notes.append(f"{failed} of {attempted} connects failed: {errors}")
    return record


def fill_send_record(record: Record, load: dict[str, Any], collected: list[dict[str, Any]]) -> None:
    received = sum(c["received"] for c in collected)
    last_receive = max((c["last_receive"] for c in collected), default=0.0)
    samples = sorted(s for c in collected for s in c["samples_us"])
    # Delivered over the time it took: from the first request to the last message (or the last answer).
    elapsed = max(load["t_end"], last_receive) - load["t_start"]
    record.values = {
        "delivered_per_s": received / max(1e-9, elapsed),
        "p50_ms": percentile(samples, 0.5) / 1000 if samples else None,
        "p99_ms": percentile(samples, 0.99) / 1000 if samples else None,
        "http_per_s": load["ok_requests"] / max(1e-9, load["t_end"] - load["t_start"]),
        "http_p99_ms": load["http_p99_ms"] if load["ok_requests"] else None,
    }
    record.extra = {**record.extra, "requests": load["requests"], "ok_requests": load["ok_requests"],
                    "statuses": load["statuses"], "received": received, "expected": load["planned"],
                    "answered": load["answered"], "seconds": round(elapsed, 3),
                    "drain_s": round(max(0.0, last_receive - load["t_end"]), 3)}
    if load["errors"]:
        record.notes.append(f"HTTP errors: {load['errors']}")
    bad = {k: v for k, v in load["statuses"].items() if k != "200"}
    if bad:
        record.partial = True
        record.notes.append(f"non-200 answers: {bad}")
    lost = load["planned"] - received
    if lost > max(0, 0.001 * load["planned"]):
        record.notes.append(f"{lost} of {load['planned']} expected deliveries not received")
        record.partial = record.partial or record.qos == 1
    closed = sum(c["closed"] for c in collected)
    if closed:
        record.notes.append(f"{closed} subscribers were disconnected")


def scan_log(system: System) -> list[str]:
    """Tracebacks and ERROR lines in the system's own logs: worth a look even when numbers came out."""
    return procs.log_problems(system.processes)
