"""Today's code against an older commit, both running at once, in alternating short windows.

    python -m bench.ab --before-dir DIR [--store memory|sqlite] [--rounds 10] [--window 2]

`scripts/bench` runs each system's sessions one after the other, so drift on a shared machine
(another tenant, the disk's writeback) lands on one system more than the other; runs of one
commit differ by 10-25% here. This starts both services side by side, each with its own
subscribers, and alternates the load between them in short windows, swapping which goes first
every round. Each measurement is then a ratio of two windows seconds apart.

Both services run on CPU 0 and every generator on CPU 1, as `--pin 0,1` does; only one service
is loaded at a time. Per window it reads the service's own CPU time (user + system, every
thread), so the figures are CPU per operation, which the other service's idle cost does not
touch:
- send0, send1: sendEvent at QoS 0 and 1 (32 closed-loop HTTP connections, 1,000 subscribers
  of 1-3 endpoints per user, as in `scripts/bench`): calls/s and CPU µs per call;
- reconnect: every subscriber dropped, then CONNECT and SUBSCRIBE again (the endpoints exist):
  connects/s and CPU µs per connect, the drops included;
- keepalive: every subscriber sends a PINGREQ every PING_PERIOD_S: CPU µs per PINGREQ (four a
  second, so that a window holds enough CPU time to read at the kernel's 10 ms resolution).

It prints the median [min-max] of each figure and of the per-round ratio today/before, and
writes the raw windows to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.systems import System, make_system, snapshot_ours

BENCH = Path(__file__).resolve().parent
SERVICE_CPU, GENERATOR_CPU = 0, 1
MEASUREMENTS = ("send0", "send1", "reconnect", "keepalive")
CALL_MARGIN_S = 30.0
PING_PERIOD_S = 0.25


@dataclass
class Side:
    """One service and the generator processes that hold its subscribers."""

    label: str
    system: System
    mqtt_workers: list[procs.Worker]
    windows: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        assert self.system.broker is not None and self.system.broker.ps is not None
        times = self.system.broker.ps.cpu_times()
        return float(times.user + times.system)


async def start_side(label: str, kind: str, code_dir: Path, workdir: Path, secret: str, n: int,
                     keep_alive: int) -> Side:
    system = make_system(kind, workdir, label, secret, True, "INFO", code_dir, frozenset({SERVICE_CPU}))
    await system.start()
    workers = [procs.Worker(f"{label}-mqtt-{i}", workdir / f"{label}-mqtt{i}.log", frozenset({GENERATOR_CPU}))
               for i in range(2)]
    for worker in workers:
        await worker.start()
    await asyncio.gather(*(w.call({
        "cmd": "prepare", "host": "127.0.0.1", "port": system.mqtt_port, "n": n, "workers": len(workers),
        "worker_index": i, "style": system.style.value, "secret": secret, "keep_alive": keep_alive,
        "source_ips": None, "one_per_user": False,
    }, 60.0) for i, w in enumerate(workers)))
    side = Side(label, system, workers)
    connected = await connect(side)
    if connected < n:
        raise RuntimeError(f"{label}: only {connected} of {n} endpoints connected")
    return side


async def connect(side: Side) -> int:
    replies = await asyncio.gather(*(w.call({
        "cmd": "connect", "concurrency": 32, "deadline_s": 120.0, "handshake_timeout_s": 10.0,
    }, 120.0 + CALL_MARGIN_S) for w in side.mqtt_workers))
    return sum(int(r["connected"]) for r in replies)


async def measure_send(side: Side, http: procs.Worker, qos: int, args: argparse.Namespace, secret: str,
                       phase: int) -> dict[str, float]:
    cpu = side.cpu_seconds()
    load = await http.call({
        "cmd": "load", "host": "127.0.0.1", "port": side.system.http_port, "n": args.n, "secret": secret,
        "duration_s": args.window, "concurrency": args.concurrency, "qos": qos, "phase": phase,
        "max_requests": int(args.window * 100_000), "request_timeout_s": 10.0, "one_per_user": False,
    }, args.window + CALL_MARGIN_S)
    cpu = side.cpu_seconds() - cpu
    collected = await asyncio.gather(*(w.call({"cmd": "collect", "phase": phase, "quiet_s": 0.3,
                                               "max_wait_s": 10.0}, 10.0 + CALL_MARGIN_S)
                                       for w in side.mqtt_workers))
    calls = int(load["ok_requests"])
    if calls == 0 or load["errors"]:
        raise RuntimeError(f"{side.label} QoS {qos}: {load['statuses']} {load['errors']}")
    return {"calls_per_s": calls / (load["t_end"] - load["t_start"]), "cpu_us_per_call": cpu / calls * 1e6,
            "delivered": sum(int(c["received"]) for c in collected), "planned": int(load["planned"])}


async def measure_reconnect(side: Side, n: int) -> dict[str, float]:
    cpu = side.cpu_seconds()
    began = time.perf_counter()
    await asyncio.gather(*(w.call({"cmd": "reset"}, 30.0) for w in side.mqtt_workers))
    connected = await connect(side)
    elapsed = time.perf_counter() - began
    cpu = side.cpu_seconds() - cpu
    if connected < n:
        raise RuntimeError(f"{side.label}: only {connected} of {n} endpoints reconnected")
    return {"connects_per_s": connected / elapsed, "cpu_us_per_connect": cpu / connected * 1e6}


async def measure_keepalive(side: Side, window: float) -> dict[str, float]:
    status = await asyncio.gather(*(w.call({"cmd": "status"}, 10.0) for w in side.mqtt_workers))
    pings = sum(int(s["pingresps"]) for s in status)
    cpu = side.cpu_seconds()
    await asyncio.gather(*(w.call({"cmd": "ping_start", "period_s": PING_PERIOD_S, "max_s": window}, 10.0)
                           for w in side.mqtt_workers))
    await asyncio.sleep(window)  # the measurement window itself, not a synchronisation
    status = await asyncio.gather(*(w.call({"cmd": "ping_stop"}, 10.0 + window) for w in side.mqtt_workers))
    cpu = side.cpu_seconds() - cpu
    answered = sum(int(s["pingresps"]) for s in status) - pings
    if answered == 0:
        raise RuntimeError(f"{side.label}: no PINGRESP")
    return {"cpu_us_per_ping": cpu / answered * 1e6, "pingresps": answered}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {GENERATOR_CPU})
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    workdir = BENCH / ".work" / f"ab-{stamp}"
    workdir.mkdir(parents=True)
    for old in sorted(p for p in workdir.parent.glob("ab-*") if p.is_dir())[:-3]:
        shutil.rmtree(old, ignore_errors=True)  # both services log every event: keep the 3 newest
    today_dir = workdir / "today"
    digest = snapshot_ours(procs.REPO, today_dir)
    secret = secrets.token_urlsafe(32)
    kinds = ("ours-memory", "before-memory") if args.store == "memory" else ("ours", "before")
    sides = [await start_side("today", kinds[0], today_dir, workdir, secret, args.n, args.keep_alive),
             await start_side("before", kinds[1], args.before_dir.resolve(), workdir, secret, args.n,
                              args.keep_alive)]
    http = procs.Worker("http", workdir / "http.log", frozenset({GENERATOR_CPU}))
    await http.start()
    phase = 0
    try:
        for round_index in range(args.rounds):
            order = sides if round_index % 2 == 0 else sides[::-1]
            for name in args.measurements:
                for side in order:
                    phase += 1
                    if name in ("send0", "send1"):
                        window = await measure_send(side, http, int(name[-1]), args, secret, phase)
                    elif name == "reconnect":
                        window = await measure_reconnect(side, args.n)
                    else:
                        window = await measure_keepalive(side, args.window)
                    side.windows.setdefault(name, []).append(window)
                    side.system.broker.check_alive()  # type: ignore[union-attr]
            print(f"ab: round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        await http.stop()
        for side in sides:
            for worker in side.mqtt_workers:
                await worker.stop()
            await side.system.stop()
    return {"started": stamp, "today": f"snapshot {digest}", "before": str(args.before_dir),
            "store": args.store, "n": args.n, "window_s": args.window, "rounds": args.rounds,
            "windows": {side.label: side.windows for side in sides}, "workdir": str(workdir)}


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.3g} [{min(values):,.3g}-{max(values):,.3g}]"


def report(result: dict[str, Any]) -> str:
    today, before = result["windows"]["today"], result["windows"]["before"]
    lines = [f"today ({result['today']}) against before ({result['before']}), store {result['store']}, "
             f"{result['rounds']} rounds of {result['window_s']} s windows, N = {result['n']}",
             "", f"{'figure':32} {'today':26} {'before':26} {'today/before per round':26}"]
    for name in today:
        for figure in today[name][0]:
            if figure in ("delivered", "planned", "pingresps"):
                continue
            mine = [w[figure] for w in today[name]]
            theirs = [w[figure] for w in before.get(name, [])]
            ratios = [a / b for a, b in zip(mine, theirs, strict=False) if b]
            lines.append(f"{name + ' ' + figure:32} {spread(mine):26} {spread(theirs):26} {spread(ratios):26}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-dir", type=Path, required=True,
                        help="an export of the older commit: git archive REV | tar -x -C DIR")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory",
                        help="the store both services use (an old commit without a store ignores it)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--window", type=float, default=2.0, help="seconds of load per window")
    parser.add_argument("--n", type=int, default=1000, help="subscribers per service")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop HTTP connections")
    parser.add_argument("--keep-alive", type=int, default=60, help="the subscribers' MQTT keep-alive")
    parser.add_argument("--measurements", type=lambda s: s.split(","), default=list(MEASUREMENTS),
                        help=f"a subset of {','.join(MEASUREMENTS)}")
    parser.add_argument("--out", type=Path, help="JSON file for the raw windows")
    args = parser.parse_args(argv)
    if shutil.which("taskset") is None and len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two CPUs")
    result = asyncio.run(run(args))
    out = args.out or Path(tempfile.gettempdir()) / f"ab-{result['started']}.json"
    out.write_text(json.dumps(result, indent=1))
    print(report(result))
    print(f"\nraw windows: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
