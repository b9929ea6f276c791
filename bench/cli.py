"""`python -m bench`: run the scenarios on each system, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import config, machine, report
from bench.scenarios import Context, Record, SessionRunner, connect_deadline
from bench.systems import BEFORE_BASED, MOSQUITTO_BASED, OURS_BASED, SYSTEMS, mosquitto_binary, snapshot_ours

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def sizes(text: str) -> tuple[int, ...]:
    return tuple(int(part.replace("_", "").replace("k", "000")) for part in text.split(",") if part)


def cpu_pair(text: str) -> tuple[int, int]:
    try:
        service, generator = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("two CPU numbers: SERVICE,GENERATOR, e.g. 0,1") from None
    return service, generator


def names(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [c for c in chosen if c not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return chosen
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description="endpoint-broker benchmark suite "
                                     "(see bench/README.md). Every size and duration has a default.")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--quick", action="store_true", help="small N and short windows (still 3 runs), ~5 min")
    chosen.add_argument("--issue13", action="store_true",
                        help="issue 13's measurement: pinned cores, one endpoint per user, ours vs the lean "
                             "stack, connects and a reconnect storm after a restart, ~7 min")
    parser.add_argument("--scenarios", type=names(config.ALL_SCENARIOS),
                        help=f"subset of {','.join(config.ALL_SCENARIOS)} (default: the profile's: "
                             f"{','.join(config.SCENARIOS)}; with --issue13 also reconnect)")
    parser.add_argument("--targets", type=names(SYSTEMS),
                        help=f"systems: subset of {','.join(SYSTEMS)} (default: the profile's: "
                             f"{','.join(config.FULL.systems)}; with --issue13 {','.join(config.ISSUE13.systems)})")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/<profile>-<time>.json)")
    parser.add_argument("--markdown", action="store_true", help="print the report as Markdown")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="only print the report of an earlier run")
    parser.add_argument("--runs", type=int, help="runs per system (default 3)")
    parser.add_argument("--send-sizes", type=sizes, help="scenario 1 endpoint counts, e.g. 1k,10k")
    parser.add_argument("--connect-sizes", type=sizes, help="scenario 2 endpoint counts, e.g. 1k,10k,50k")
    parser.add_argument("--idle-size", type=int, help="scenarios 3 and 4 endpoint count (default 10000)")
    parser.add_argument("--send-seconds", type=float, help="HTTP load per QoS level, seconds")
    parser.add_argument("--concurrency", type=int, help="concurrent sendEvent requests")
    parser.add_argument("--keepalive-seconds", type=float, help="keepalive CPU measurement window, seconds")
    parser.add_argument("--mqtt-workers", type=int, help="generator processes holding subscribers (default 2)")
    parser.add_argument("--max-minutes", type=float, help="start no new session after this long")
    parser.add_argument("--pin", type=cpu_pair, metavar="SERVICE,GENERATOR",
                        help="pin the systems' processes to one CPU and the generator's (and the bench's) to "
                             "another (default: 0,1 with --issue13, no pinning otherwise)")
    parser.add_argument("--ours-log-level", default="INFO", help="ENDPOINT_BROKER_LOG_LEVEL for ours (default INFO)")
    parser.add_argument("--ours-dir", type=Path,
                        help="run ours from this directory's run_broker.py, e.g. an exported older commit to "
                             "compare versions (default: a snapshot of this repo's code taken at the start)")
    parser.add_argument("--before-dir", type=Path,
                        help="run the systems `before` and `before-memory` from this directory, e.g. "
                             "`git archive <commit> | tar -x -C DIR`: an older commit measured in the same run")
    args = parser.parse_args(argv)
    if args.from_json is None:
        profile = build_profile(args)
        systems, scenarios = args.targets or profile.systems, args.scenarios or profile.scenarios
        if set(BEFORE_BASED) & set(systems) and args.before_dir is None:
            parser.error("the systems before and before-memory need --before-dir")
        if "lean" in systems and "send" in scenarios and not profile.one_endpoint_per_user:
            parser.error("lean's sendEvent publishes to the one endpoint named in the request: it needs "
                         "one endpoint per user (--issue13)")
        if profile.pin_cpus is not None:
            try:
                config.check_pinning(profile.pin_cpus)
            except ValueError as exc:
                parser.error(str(exc))
    return args


def build_profile(args: argparse.Namespace) -> config.Profile:
    profile = config.ISSUE13 if args.issue13 else config.QUICK if args.quick else config.FULL
    overrides = {
        "runs": args.runs, "send_sizes": args.send_sizes, "connect_sizes": args.connect_sizes,
        "idle_size": args.idle_size, "send_seconds": args.send_seconds, "send_concurrency": args.concurrency,
        "keepalive_window_s": args.keepalive_seconds, "mqtt_workers": args.mqtt_workers,
        "max_minutes": args.max_minutes, "pin_cpus": args.pin,
    }
    return dataclasses.replace(profile, **{k: v for k, v in overrides.items() if v is not None})


class Results:
    """Everything measured so far; saved after every session so an interrupted run keeps its data."""

    def __init__(self, path: Path, meta: dict[str, Any], systems: list[str]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "systems": systems, "records": []}

    def add(self, record: Record) -> None:
        self.data["records"].append(dataclasses.asdict(record))
        shown = ", ".join(f"{k}={report.fmt(v)}" for k, v in record.values.items() if v is not None)
        shown = shown or "; ".join(record.notes)[:300]
        flag = f" ERROR {record.error}" if record.error else (" (partial)" if record.partial else "")
        print(f"  {record.system} run {record.run} {record.key}: {shown}{flag}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1))
        os.replace(temporary, self.path)


def prune_work(root: Path, keep: int) -> None:
    """Keep only the newest `keep` work folders: ours logs every event at INFO, ~200 MB per full run."""
    runs = sorted(p for p in root.glob("[0-9]*-[0-9]*") if p.is_dir())
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


async def run_all(args: argparse.Namespace) -> Results:
    profile = build_profile(args)
    scenarios = args.scenarios or profile.scenarios
    limits = config.machine_limits()
    sessions = config.build_sessions(profile, scenarios, limits)
    systems = list(args.targets or profile.systems)
    if profile.pin_cpus is not None:
        # The bench itself coordinates the generator: on the generator's CPU, off the service's.
        os.sched_setaffinity(0, {profile.pin_cpus[1]})
    meta: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": "scripts/bench " + shlex.join(sys.argv[1:]),
        "machine": machine.describe(args.ours_dir.resolve() if args.ours_dir else REPO),
        "profile": dataclasses.asdict(profile),
        "limits": limits.as_dict(),
        "scenarios": list(scenarios), "sessions": [s.label for s in sessions], "skipped": [],
    }
    for name in MOSQUITTO_BASED:
        if name in systems and mosquitto_binary() is None:
            systems.remove(name)
            meta["skipped"].append(f"{name}: mosquitto is not installed (scripts/bench installs it with apt-get)")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results = Results(args.out or BENCH / "results" / f"{profile.name}-{stamp}.json", meta, systems)
    workdir = BENCH / ".work" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    prune_work(workdir.parent, keep=3)
    ours_dir = args.ours_dir.resolve() if args.ours_dir else workdir / "ours"
    if args.ours_dir is None and set(OURS_BASED) & set(systems):
        # The repo may be edited while the bench runs: every session measures this copy instead.
        meta["machine"]["code"] += f", snapshot {snapshot_ours(REPO, ours_dir)} taken at the start"
    before_dir = args.before_dir.resolve() if args.before_dir else None
    if before_dir is not None:
        meta["machine"]["before"] = machine.code_version(before_dir)
    ctx = Context(profile, secrets.token_urlsafe(32), workdir, args.ours_log_level, results.add, ours_dir,
                  before_dir)
    started = time.monotonic()
    print(f"bench: {profile.name} profile, {profile.runs} runs x {systems} x {len(sessions)} sessions; "
          f"logs in {workdir}", file=sys.stderr, flush=True)
    try:
        for run in range(1, profile.runs + 1):
            for system in systems:
                await run_system(ctx, system, sessions, run, started, results)
    finally:
        meta["minutes"] = (time.monotonic() - started) / 60
        results.save()
    return results


async def run_system(ctx: Context, system: str, sessions: list[config.Session], run: int, started: float,
                     results: Results) -> None:
    """One system's sessions of one run, smallest first."""
    incomplete_at: int | None = None  # the smallest size this system could not fully connect
    last_rate: float | None = None  # its connect rate at the previous size, table nearly full
    for session in sessions:
        runner = SessionRunner(ctx, system, session, run)
        projected = session.size / last_rate if last_rate else 0.0
        if time.monotonic() - started > ctx.profile.max_minutes * 60:
            runner.skip(f"not run: --max-minutes ({ctx.profile.max_minutes:g}) reached")
            continue
        if incomplete_at is not None and session.size > incomplete_at:
            # It could not connect fewer endpoints within the deadline: more would only burn the time budget.
            runner.skip(f"not run: {system} could not connect {incomplete_at:,} endpoints within "
                        "the deadline in this run")
            continue
        if projected > connect_deadline(session.size):
            runner.skip(f"not run: at its rate at the previous size ({last_rate:.0f}/s), {system} would need "
                        f"over {projected:.0f} s to connect {session.size:,}; the deadline is "
                        f"{connect_deadline(session.size):.0f} s")
            continue
        print(f"[run {run}/{ctx.profile.runs}] {system} {session.label}", file=sys.stderr, flush=True)
        await runner.run()
        if runner.connect_incomplete:
            incomplete_at = min(incomplete_at or session.size, session.size)
        last_rate = runner.connect_rate or last_rate
        results.save()


async def main_async(args: argparse.Namespace) -> Results:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM stops like Ctrl-C: sessions tear down their processes, partial results are saved.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(args)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        print(report.report(json.loads(args.from_json.read_text()), args.markdown), end="")
        return 0
    try:
        results = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; partial results were saved", file=sys.stderr)
        return 130
    with contextlib.suppress(BrokenPipeError):
        print(report.report(results.data, args.markdown), end="")
    print(f"bench: raw results in {results.path}", file=sys.stderr)
    return 0
