"""`python -m bench.cluster`: sendEvent on one process (SQLite) against a cluster of 1 and 2 nodes (issue 14).

Three systems, measured interleaved in every run (the order rotates from run to run):

- `sqlite`: one plain `run_broker.py` with its default durable store (SQLite, `full`);
- `cluster-1`: `redis-server` and one node (`--redis-url`, `--node-id`);
- `cluster-2`: `redis-server` and two nodes sharing it.

Every endpoint belongs to its own user (`ep-N` of `user-N`, each CONNECTing with its own
token); the subscribers are held by two generator processes (`bench.worker`) and spread
round-robin over the nodes (endpoint k on node k % nodes), each SUBSCRIBEd at QoS 1 to
`users/endpoints/{id}` and acknowledging every PUBLISH. A third generator process (this
module, `--http-worker`) runs the closed-loop HTTP load: `--concurrency` keep-alive
connections, connection i on node i % nodes, each sending one sendEvent at a time with a
SERVICE token to a random endpoint (`userEndpointId`), at `--qos`. Before each measured
window, a one-second warm-up (not counted).

Per system and run: sendEvent calls/s (answered 200), delivered events/s (counted at the
subscribers, over the first request to the last delivery), HTTP p50/p99, delivery p50/p99
(send to PUBLISH parsed, same host clock), and the CPU of each service process (each node,
redis-server) in ms per 1,000 calls, from the start of the load until the last delivery.
The table gives medians [min-max] over the runs, and per-run ratios against `sqlite` and
`cluster-1`. Raw figures go to `bench/results/cluster-qos<Q>-<quick|full>.json`, process
logs to `bench/.work/cluster-<UTC time>/`.

Redis runs as the cluster tests run it: AOF on, `appendfsync always` (`--redis-fsync`), so
a QoS 1 answer means the event is on disk, as with the SQLite store's `full`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench import httplite, machine, plan, procs, tokens
from bench.cpu import CpuReport, CpuWindow
from bench.report import fmt as fmt_number
from bench.systems import START_TIMEOUT_S, snapshot_ours
from bench.worker import HttpTally, percentile, post_send_event, short_error

BENCH = Path(__file__).resolve().parent
SYSTEMS = ("sqlite", "cluster-1", "cluster-2")
# The SERVICE client the HTTP load authenticates as (its token names the endpoints' organisation).
SERVICE_CLIENT = "bench-service"
SUBSCRIBER_WORKERS = 2
KEEP_ALIVE_S = 15
PING_PERIOD_S = 10.0  # like the main bench: live subscribers ping, every system gets the same background
CONNECT_CONCURRENCY = 96  # all subscriber workers together
HANDSHAKE_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 10.0
COLLECT_QUIET_S = 0.5
COLLECT_MAX_WAIT_S = 10.0
CALL_MARGIN_S = 20.0
WARMUP_S = 1.0
QUEUE_SETTLE_MAX_S = 10.0
# Before each session (--wait-quiet): the machine counts as quiet below this, in % of one core.
QUIET_BELOW_PCT = 30.0
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    runs: int
    subscribers: int
    concurrency: int
    seconds: float


FULL = Profile("full", runs=5, subscribers=1_000, concurrency=32, seconds=8.0)
QUICK = Profile("quick", runs=3, subscribers=200, concurrency=32, seconds=3.0)


# ------------------------------------------------------------------ the HTTP load (its own process)


async def http_load(cmd: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: `concurrency` keep-alive connections, connection i on target i % len(targets)."""
    loop = asyncio.get_running_loop()
    _, endpoints = plan.plan(cmd["n"], one_per_user=True)
    token = tokens.mint(cmd["secret"], SERVICE_CLIENT, roles=("SERVICE",))
    targets: list[tuple[str, int]] = [(host, port) for host, port in cmd["targets"]]
    qos, phase, timeout = cmd["qos"], cmd["phase"], cmd["request_timeout_s"]
    tally = HttpTally()
    bodies: Counter[str] = Counter()  # the first bytes of non-200 answers, to say what went wrong
    ok_by_target = [0] * len(targets)
    totals = {"sent": 0, "answered": 0, "zero": 0}
    connections = [await httplite.open_connection(*targets[i % len(targets)], timeout)
                   for i in range(cmd["concurrency"])]
    deadline = loop.time() + cmd["duration_s"]

    async def client(index: int, connection: httplite.HttpConnection) -> None:
        rng = random.Random(index * 7919 + phase)
        host, port = targets[index % len(targets)]
        while loop.time() < deadline and totals["sent"] < cmd["max_requests"]:
            endpoint = endpoints[rng.randrange(len(endpoints))]
            totals["sent"] += 1
            answered = await post_send_event(connection, host, port, token, timeout, tally, endpoint.user_id, qos,
                                             phase, totals["sent"], endpoint_id=endpoint.endpoint_id,
                                             organization_id=plan.ORGANIZATION)
            if answered is None:
                return  # this connection is unusable now
            status, answer = answered
            if status == 200:
                ok_by_target[index % len(targets)] += 1
                count = int(answer) if answer.strip().isdigit() else 0
                totals["answered"] += count
                totals["zero"] += count == 0
            else:
                bodies[f"{status} {answer[:160].decode(errors='replace')}"] += 1

    started = time.time()
    await asyncio.gather(*(client(i, c) for i, c in enumerate(connections)))
    ended = time.time()
    for connection in connections:
        connection.close()
    statuses, http_ms = tally.statuses, sorted(tally.http_ms)
    return {
        "requests": totals["sent"], "ok_requests": statuses.get(200, 0),
        "statuses": {str(k): v for k, v in statuses.items()}, "errors": dict(tally.errors.most_common(5)),
        "refusals": dict(bodies.most_common(3)), "answered": totals["answered"], "answered_zero": totals["zero"],
        "ok_by_node": ok_by_target, "t_start": started, "t_end": ended,
        "http_p50_ms": percentile(http_ms, 0.5), "http_p99_ms": percentile(http_ms, 0.99),
    }


async def serve_http_worker() -> None:
    """JSON lines on stdin, one answer line each on stdout (the protocol of bench.worker)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            reply = {"ok": True, **(await http_load(cmd))} if cmd["cmd"] == "load" else {"ok": True}
        except Exception as exc:  # reported to the parent, which records it against the measurement
            reply = {"ok": False, "error": short_error(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["cmd"] == "close":
            break


class HttpWorker(procs.Worker):
    """`python -m bench.cluster --http-worker`, driven like bench.worker."""

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.cluster", "--http-worker", cwd=procs.REPO,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                preexec_fn=procs.child_setup(self.cpus), limit=1 << 26,
            )
        self.ps = psutil.Process(self.process.pid)


# ------------------------------------------------------------------ the systems


async def redis_command(port: int, *args: str, timeout_s: float = 5.0) -> bytes:
    """One command in RESP; the reply's payload (simple string, integer or bulk string)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        writer.write(request.encode())
        head = await asyncio.wait_for(reader.readline(), timeout_s)
        if head[:1] == b"$":
            size = int(head[1:])
            return b"" if size < 0 else (await asyncio.wait_for(reader.readexactly(size + 2), timeout_s))[:-2]
        if head[:1] == b"-":
            raise RuntimeError(f"redis: {head[1:].decode(errors='replace').strip()}")
        return head[1:].rstrip(b"\r\n")
    finally:
        writer.close()


def redis_binary() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None)


class Deployment:
    """One system's processes: `sqlite` (one plain process), or redis-server and `nodes` nodes."""

    def __init__(self, name: str, workdir: Path, tag: str, secret: str, code_dir: Path, log_level: str,
                 redis_fsync: str, cpus: frozenset[int] | None) -> None:
        self.name, self.workdir, self.tag, self.secret = name, workdir, tag, secret
        self.code_dir, self.log_level, self.redis_fsync, self.cpus = code_dir, log_level, redis_fsync, cpus
        self.clustered = name != "sqlite"
        count = int(name.split("-")[1]) if self.clustered else 1
        self.mqtt_ports = [procs.free_port() for _ in range(count)]
        self.http_ports = [procs.free_port() for _ in range(count)]
        self.redis_port = procs.free_port() if self.clustered else 0
        self.redis: procs.Managed | None = None
        self.nodes: list[procs.Managed] = []

    @property
    def processes(self) -> dict[str, procs.Managed]:
        found = {node.name: node for node in self.nodes}
        if self.redis is not None:
            found[self.redis.name] = self.redis
        return found

    def log(self, what: str) -> Path:
        return self.workdir / f"{self.tag}-{what}.log"

    async def start(self) -> None:
        if self.clustered:
            await self._start_redis()
        for index, (mqtt_port, http_port) in enumerate(zip(self.mqtt_ports, self.http_ports, strict=True)):
            data_dir = tempfile.mkdtemp(prefix=f"{self.tag}-data{index}-", dir=self.workdir)
            env = {**os.environ, "ENDPOINT_BROKER_JWT_SECRET": self.secret,
                   "ENDPOINT_BROKER_LOG_LEVEL": self.log_level, "ENDPOINT_BROKER_DATA_DIR": data_dir}
            for variable in ("ENDPOINT_BROKER_REDIS_URL", "ENDPOINT_BROKER_NODE_ID", "ENDPOINT_BROKER_STORE",
                             "ENDPOINT_BROKER_CONFIG"):
                env.pop(variable, None)  # only what this system says
            argv = [sys.executable, "run_broker.py", "--host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
                    "--http-port", str(http_port), "--mqtts-port", str(procs.free_port())]
            name = "service"
            if self.clustered:
                name = f"node-{index}"
                argv += ["--redis-url", f"redis://127.0.0.1:{self.redis_port}/0", "--node-id", f"bench-{name}"]
            node = procs.Managed(name, argv, self.log(name), env, cwd=self.code_dir, cpus=self.cpus)
            self.nodes.append(node)
            await node.start()
        for node, http_port in zip(self.nodes, self.http_ports, strict=True):
            await procs.wait_for_http(node, http_port, "/healthz", START_TIMEOUT_S)

    async def _start_redis(self) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed (scripts/setup-system, or scripts/bench, installs it)")
        data = Path(tempfile.mkdtemp(prefix=f"{self.tag}-redis-", dir=self.workdir))
        self.redis = procs.Managed(
            "redis-server",
            [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", self.redis_fsync, "--save", "", "--daemonize", "no",
             "--protected-mode", "yes", "--loglevel", "warning"],
            self.log("redis"), cwd=data, cpus=self.cpus)
        await self.redis.start()
        await procs.wait_for_tcp(self.redis, self.redis_port, START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            self.redis.check_alive()
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                if await redis_command(self.redis_port, "PING", timeout_s=1.0) == b"PONG":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer PING within {START_TIMEOUT_S} s")
            await asyncio.sleep(0.05)

    async def redis_facts(self) -> dict[str, Any]:
        """What Redis holds after a measurement: keys, memory, and the QoS 1 queue entries left."""
        if self.redis is None:
            return {}
        facts: dict[str, Any] = {"keys": int(await redis_command(self.redis_port, "DBSIZE"))}
        # QoS 1 events still queued (per-endpoint streams `eb:q:{id}`): taken, but not acknowledged.
        # A node deletes acknowledged events in batches, so count until the figure holds for a second.
        count_script = ("local n = 0 for _, k in ipairs(redis.call('KEYS', 'eb:q:*')) do "
                        "n = n + redis.call('XLEN', k) end return n")
        counts: list[int] = []
        deadline = time.monotonic() + QUEUE_SETTLE_MAX_S
        while len(counts) < 3 or counts[-1] != counts[-3]:
            counts.append(int(await redis_command(self.redis_port, "EVAL", count_script, "0")))
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        facts["queued_events_left"] = counts[-1]
        facts["queued_events_counts"] = counts
        memory = (await redis_command(self.redis_port, "INFO", "memory")).decode()
        used = re.search(r"used_memory:(\d+)", memory)
        facts["used_memory_mb"] = round(int(used.group(1)) / 2**20, 2) if used else None
        persistence = (await redis_command(self.redis_port, "INFO", "persistence")).decode()
        size = re.search(r"aof_current_size:(\d+)", persistence)
        facts["aof_mb"] = round(int(size.group(1)) / 2**20, 2) if size else None
        return facts

    def check_alive(self) -> None:
        for process in self.processes.values():
            process.check_alive()

    async def stop(self) -> None:
        # The nodes first: they are Redis's clients.
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop(STOP_GRACE_S)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.stop(STOP_GRACE_S)

    def log_problems(self) -> list[str]:
        return procs.log_problems(self.processes.values(), width=300)


# ------------------------------------------------------------------ one measurement


@dataclass
class Record:
    system: str
    run: int
    qos: int
    values: dict[str, float | None] = field(default_factory=dict)
    cpu_ms_per_1k: dict[str, float] = field(default_factory=dict)  # per service process
    cpu_pct: dict[str, Any] = field(default_factory=dict)  # during the load window, % of one core
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Settings:
    profile: Profile
    qos: int
    secret: str
    workdir: Path
    code_dir: Path
    log_level: str
    redis_fsync: str
    pin: tuple[int, int] | None
    collect_quiet_s: float = COLLECT_QUIET_S


_phases = iter(range(1, 1_000_000))


class Session:
    def __init__(self, settings: Settings, system: str, run: int) -> None:
        self.s, self.run = settings, run
        tag = f"run{run}-{system}"
        service_cpus, generator_cpus = ((frozenset({settings.pin[0]}), frozenset({settings.pin[1]}))
                                        if settings.pin else (None, None))
        self.deployment = Deployment(system, settings.workdir, tag, settings.secret, settings.code_dir,
                                     settings.log_level, settings.redis_fsync, service_cpus)
        self.subscribers = [procs.Worker(f"subscribers-{i}", settings.workdir / f"{tag}-subscribers{i}.log",
                                         generator_cpus) for i in range(SUBSCRIBER_WORKERS)]
        self.http = HttpWorker("http-load", settings.workdir / f"{tag}-http.log", generator_cpus)
        self.record = Record(system, run, settings.qos)

    @property
    def workers(self) -> list[procs.Worker]:
        return [*self.subscribers, self.http]

    def timeout(self) -> float:
        p = self.s.profile
        return (3 * START_TIMEOUT_S + 60.0 + p.subscribers / 20 + 2 * (p.seconds + REQUEST_TIMEOUT_S + CALL_MARGIN_S)
                + 2 * (COLLECT_MAX_WAIT_S + CALL_MARGIN_S) + 60.0)

    async def run_once(self) -> Record:
        try:
            await asyncio.wait_for(self._steps(), self.timeout())
        except TimeoutError:
            self.record.error = f"session timed out after {self.timeout():.0f} s"
        except Exception as exc:  # recorded against this system and run; the next one still runs
            self.record.error = f"{type(exc).__name__}: {exc}"[:800]
        finally:
            for worker in self.workers:
                with contextlib.suppress(Exception):
                    await worker.stop()
            await self.deployment.stop()
            self.record.notes += self.deployment.log_problems()
        return self.record

    async def _steps(self) -> None:
        d, p = self.deployment, self.s.profile
        started = time.monotonic()
        await d.start()
        await asyncio.gather(*(w.start() for w in self.workers))
        self.record.extra["start_s"] = round(time.monotonic() - started, 2)
        await self._connect()
        await self._load(WARMUP_S, measured=False)
        await self._load(p.seconds, measured=True)
        d.check_alive()
        facts = self.record.extra["redis"] = await d.redis_facts()
        if facts.get("queued_events_left"):
            # Taken (the answer counted them), still in their endpoint's stream: never acknowledged.
            self.record.notes.append(f"{facts['queued_events_left']} QoS 1 events still queued in Redis after "
                                     "the windows (warm-up included)")

    async def _connect(self) -> None:
        d, p = self.deployment, self.s.profile
        await asyncio.gather(*(w.call({
            "cmd": "prepare", "host": "127.0.0.1", "port": d.mqtt_ports[i % len(d.mqtt_ports)],
            "n": p.subscribers, "workers": len(self.subscribers), "worker_index": i, "style": "endpoint",
            "secret": self.s.secret, "keep_alive": KEEP_ALIVE_S, "source_ips": [None], "one_per_user": True,
        }, 60.0) for i, w in enumerate(self.subscribers)))
        await asyncio.gather(*(w.call({"cmd": "ping_start", "period_s": PING_PERIOD_S, "max_s": self.timeout()},
                                      10.0) for w in self.subscribers))
        deadline = 30.0 + p.subscribers / 20
        began = time.monotonic()
        replies = await asyncio.gather(*(w.call({
            "cmd": "connect", "concurrency": CONNECT_CONCURRENCY // len(self.subscribers), "deadline_s": deadline,
            "handshake_timeout_s": HANDSHAKE_TIMEOUT_S,
        }, deadline + HANDSHAKE_TIMEOUT_S + CALL_MARGIN_S) for w in self.subscribers))
        connected = sum(r["connected"] for r in replies)
        self.record.extra.update(connected=connected, connect_s=round(time.monotonic() - began, 2))
        if connected < p.subscribers:
            errors: Counter[str] = Counter()
            for reply in replies:
                errors.update(reply["errors"])
            message = f"only {connected} of {p.subscribers} subscribers connected: {dict(errors)}"
            if connected == 0:
                raise RuntimeError(message)
            self.record.notes.append(message)

    async def _load(self, seconds: float, measured: bool) -> None:
        d, p, phase = self.deployment, self.s.profile, next(_phases)
        targets = [["127.0.0.1", port] for port in d.http_ports]
        service = {name: m.ps for name, m in d.processes.items() if m.ps is not None}
        generator = [w.ps for w in self.workers if w.ps is not None]
        pinned = self.s.pin is not None
        during = CpuWindow(service, generator, pinned).start()  # the load window: % of a core, the limit
        through = CpuWindow(service, generator, pinned).start()  # until the last delivery: CPU per call
        load = await self.http.call({
            "cmd": "load", "targets": targets, "n": p.subscribers, "secret": self.s.secret, "duration_s": seconds,
            "concurrency": p.concurrency, "qos": self.s.qos, "phase": phase, "max_requests": int(seconds * 100_000),
            "request_timeout_s": REQUEST_TIMEOUT_S,
        }, seconds + REQUEST_TIMEOUT_S + CALL_MARGIN_S)
        window = during.stop()
        collected = await asyncio.gather(*(w.call({
            "cmd": "collect", "phase": phase, "quiet_s": self.s.collect_quiet_s, "max_wait_s": COLLECT_MAX_WAIT_S,
        }, COLLECT_MAX_WAIT_S + CALL_MARGIN_S) for w in self.subscribers))
        whole = through.stop()
        d.check_alive()
        if measured:
            self._fill(load, collected, window, whole)
        elif load["ok_requests"] == 0:
            raise RuntimeError(f"warm-up: no sendEvent answered 200: {load['statuses']} {load['errors']} "
                               f"{load['refusals']}")

    def _fill(self, load: dict[str, Any], collected: list[dict[str, Any]], window: CpuReport,
              whole: CpuReport) -> None:
        r = self.record
        received = sum(c["received"] for c in collected)
        last_receive = max((c["last_receive"] for c in collected), default=0.0)
        samples = sorted(s for c in collected for s in c["samples_us"])
        elapsed = max(load["t_end"], last_receive) - load["t_start"]
        ok = load["ok_requests"]
        r.values = {
            "calls_per_s": ok / max(1e-9, load["t_end"] - load["t_start"]),
            "delivered_per_s": received / max(1e-9, elapsed),
            "http_p50_ms": load["http_p50_ms"] if ok else None,
            "http_p99_ms": load["http_p99_ms"] if ok else None,
            "delivery_p50_ms": percentile(samples, 0.5) / 1000 if samples else None,
            "delivery_p99_ms": percentile(samples, 0.99) / 1000 if samples else None,
        }
        r.values["not_received"] = max(0, load["answered"] - received)
        r.values["non_200"] = load["requests"] - ok
        if ok:
            per_call = {name: pct / 100 * whole.seconds * 1e6 / ok for name, pct in whole.service_by_process.items()}
            r.cpu_ms_per_1k = {**{k: round(v, 2) for k, v in per_call.items()},
                               "service total": round(sum(per_call.values()), 2)}
            r.values["service_cpu_ms_per_1k"] = sum(per_call.values())
            # The generator's CPU too: on two shared cores it competes with the service.
            r.values["generator_cpu_ms_per_1k"] = whole.generator_pct / 100 * whole.seconds * 1e6 / ok
        r.cpu_pct = window.as_dict()
        r.extra.update(
            requests=load["requests"], ok_requests=ok, statuses=load["statuses"], ok_by_node=load["ok_by_node"],
            received=received, received_by_subscriber_worker=[c["received"] for c in collected],
            answered=load["answered"], answered_zero=load["answered_zero"], seconds=round(elapsed, 3),
            drain_s=round(max(0.0, last_receive - load["t_end"]), 3), through_window_s=round(whole.seconds, 3),
        )
        if load["errors"]:
            r.notes.append(f"HTTP errors: {load['errors']}")
        if load["refusals"]:
            r.notes.append(f"non-200 answers: {load['refusals']}")
        if load["answered_zero"]:
            r.notes.append(f"{load['answered_zero']} calls answered 0 (no endpoint took the event)")
        lost = load["answered"] - received
        if lost > 0:
            r.notes.append(f"LOST: {lost} of {load['answered']} events the answers counted were not received")
        elif lost < 0:
            r.notes.append(f"{-lost} more events received than the answers counted (duplicates or a late phase)")
        closed = max((c["closed"] for c in collected), default=0)
        if closed:
            r.notes.append(f"{sum(c['closed'] for c in collected)} subscribers were disconnected")
        if window.other_pct >= 25:
            r.notes.append(f"other load on the machine: {window.other_pct:.0f}% of a core")


# ------------------------------------------------------------------ the report


def spread(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def fmt(value: float | None) -> str:
    return "-" if value is None else fmt_number(value)


def fmt_spread(found: tuple[float, float, float] | None) -> str:
    if found is None:
        return "-"
    return f"{fmt(found[0])} [{fmt(found[1])}-{fmt(found[2])}]"


METRICS = (
    ("calls_per_s", "sendEvent calls/s (200)"),
    ("delivered_per_s", "delivered events/s"),
    ("http_p50_ms", "HTTP p50 ms"),
    ("http_p99_ms", "HTTP p99 ms"),
    ("delivery_p50_ms", "delivery p50 ms"),
    ("delivery_p99_ms", "delivery p99 ms"),
    ("service_cpu_ms_per_1k", "service CPU ms per 1,000 calls"),
    ("generator_cpu_ms_per_1k", "generator CPU ms per 1,000 calls"),
    ("not_received", "events counted in answers, never received"),
    ("non_200", "calls not answered 200"),
)
COUNTS = ("not_received", "non_200")  # no ratios of these
RATIOS = (("cluster-1", "sqlite"), ("cluster-2", "sqlite"), ("cluster-2", "cluster-1"))


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Medians [min-max] per system and metric, and the medians of the per-run ratios."""
    good = [r for r in data["records"] if r["error"] is None]
    systems = [s for s in data["systems"] if any(r["system"] == s for r in good)]
    summary: dict[str, Any] = {"systems": {}, "ratios": {}}
    for system in systems:
        mine = [r for r in good if r["system"] == system]
        metrics = {key: spread([r["values"][key] for r in mine if r["values"].get(key) is not None])
                   for key, _ in METRICS}
        processes = sorted({name for r in mine for name in r["cpu_ms_per_1k"]})
        cpu = {name: spread([r["cpu_ms_per_1k"][name] for r in mine if name in r["cpu_ms_per_1k"]])
               for name in processes}
        pct = {name: spread([r["cpu_pct"]["service_by_process"][name] for r in mine
                             if name in r["cpu_pct"].get("service_by_process", {})]) for name in processes
               if name != "service total"}
        for key in ("generator_pct", "generator_max_pct", "machine_pct", "other_pct"):
            pct[key] = spread([r["cpu_pct"][key] for r in mine if key in r["cpu_pct"]])
        summary["systems"][system] = {"runs": len(mine), "metrics": metrics, "cpu_ms_per_1k": cpu, "cpu_pct": pct,
                                      "limits": [r["cpu_pct"].get("limit") for r in mine]}
    for top, bottom in RATIOS:
        per_metric = {}
        for key, _ in METRICS:
            if key in COUNTS:
                continue
            ratios = []
            for run in sorted({r["run"] for r in good}):
                a = next((r for r in good if r["run"] == run and r["system"] == top), None)
                b = next((r for r in good if r["run"] == run and r["system"] == bottom), None)
                if a and b and a["values"].get(key) and b["values"].get(key):
                    ratios.append(a["values"][key] / b["values"][key])
            per_metric[key] = spread(ratios)
        summary["ratios"][f"{top}/{bottom}"] = per_metric
    return summary


def report(data: dict[str, Any]) -> str:
    meta, summary = data["meta"], data.get("summary") or summarize(data)
    systems = list(summary["systems"])
    ratio_names = [name for name in summary["ratios"] if all(part in systems for part in name.split("/"))]
    lines = [
        f"- Date: {meta['started']} (took {meta.get('minutes', 0):.1f} min); command: `{meta['command']}`",
        f"- Machine: {meta['machine']['cpu']}, {meta['machine']['logical_cores']} logical cores; load average at "
        f"start {meta['machine']['load_average_at_start']}; Python {meta['machine']['python']}; "
        f"{meta.get('redis_version', 'redis ?')}",
        f"- Code: {meta['machine']['code']}",
        f"- Profile: {meta['profile']['name']}, {meta['profile']['runs']} runs, QoS {meta['qos']}, "
        f"{meta['profile']['subscribers']:,} subscribers (one endpoint per user, spread over the nodes), "
        f"{meta['profile']['concurrency']} closed-loop HTTP connections (round-robin over the nodes), "
        f"{meta['profile']['seconds']:g} s per window; Redis appendfsync {meta['redis_fsync']}; "
        f"pinning: {meta['pin'] or 'none'}",
        "",
        f"| metric (QoS {meta['qos']}) | " + " | ".join(systems) + " | " + " | ".join(ratio_names) + " |",
        "|---|" + "---|" * (len(systems) + len(ratio_names)),
    ]
    for key, label in METRICS:
        cells = [fmt_spread(summary["systems"][s]["metrics"].get(key)) for s in systems]
        cells += [fmt_spread(summary["ratios"][name].get(key)) for name in ratio_names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    processes = sorted({p for s in systems for p in summary["systems"][s]["cpu_ms_per_1k"] if p != "service total"})
    for process in processes:
        cells = [fmt_spread(summary["systems"][s]["cpu_ms_per_1k"].get(process)) for s in systems]
        lines.append(f"| CPU ms per 1,000 calls: {process} | " + " | ".join(cells) + " |" + " |" * len(ratio_names))
    lines += ["", "CPU during the load window, % of one core (medians [min-max]):", "",
              "| system | " + " | ".join(processes) + " | generator (busiest) | machine | other | limit |",
              "|---|" + "---|" * (len(processes) + 4)]
    for s in systems:
        pct = summary["systems"][s]["cpu_pct"]
        cells = [fmt_spread(pct.get(p)) for p in processes]
        generator = pct.get("generator_pct")
        busiest = pct.get("generator_max_pct")
        cells.append(f"{fmt(generator[0]) if generator else '-'} ({fmt(busiest[0]) if busiest else '-'})")
        cells += [fmt_spread(pct.get("machine_pct")), fmt_spread(pct.get("other_pct")),
                  ", ".join(str(limit) for limit in summary["systems"][s]["limits"])]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    notes = [f"- {r['system']} run {r['run']}: {'ERROR ' + r['error'] if r['error'] else ''}"
             f"{'; '.join(r['notes'])}" for r in data["records"] if r["error"] or r["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run


def prune_work(keep: int) -> None:
    """Keep only the newest `keep` work folders of this module: the services log every event at INFO."""
    for old in sorted((BENCH / ".work").glob("cluster-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


async def machine_busy_pct(seconds: float = 1.0) -> float:
    """CPU busy on the whole machine over `seconds`, in % of one core (nothing of this bench runs then)."""
    def busy() -> tuple[float, float]:
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return sum(times) - idle, time.monotonic()

    before, t0 = busy()
    await asyncio.sleep(seconds)
    after, t1 = busy()
    return 100.0 * (after - before) / max(1e-9, t1 - t0)


async def wait_for_quiet(max_wait_s: float, below_pct: float) -> float:
    """Wait (at most `max_wait_s`) until the machine is quieter than `below_pct`; the last figure."""
    deadline = time.monotonic() + max_wait_s
    while True:
        found = await machine_busy_pct()
        if found < below_pct or time.monotonic() >= deadline:
            return found
        print(f"  waiting for a quieter machine: {found:.0f}% of a core busy", file=sys.stderr, flush=True)
        await asyncio.sleep(2.0)


async def redis_version() -> str:
    binary = redis_binary()
    if binary is None:
        return "redis-server not installed"
    process = await asyncio.create_subprocess_exec(binary, "--version", stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    match = re.search(rb"v=(\S+)", out)
    return f"redis-server {match.group(1).decode() if match else '?'}"


async def run_all(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    workdir = BENCH / ".work" / f"cluster-{stamp}"
    workdir.mkdir(parents=True)
    prune_work(keep=3)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin[1]})  # the bench coordinates the generator: on its CPU
    code_dir = workdir / "code"
    described = machine.describe()
    # The repository may be edited while this runs: every session runs this copy.
    described["code"] += f", snapshot {snapshot_ours(procs.REPO, code_dir)} taken at the start"
    out: Path = args.out or BENCH / "results" / f"cluster-qos{args.qos}-{profile.name}.json"
    data: dict[str, Any] = {
        "meta": {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                 "command": "python -m bench.cluster " + shlex.join(sys.argv[1:]), "machine": described,
                 "redis_version": await redis_version(), "profile": asdict(profile), "qos": args.qos,
                 "redis_fsync": args.redis_fsync, "pin": list(args.pin) if args.pin else None,
                 "log_level": args.log_level, "collect_quiet_s": args.collect_quiet,
                 "wait_quiet_s": args.wait_quiet, "workdir": str(workdir)},
        "systems": list(args.systems), "records": [],
    }
    settings = Settings(profile, args.qos, secrets.token_urlsafe(32), workdir, code_dir, args.log_level,
                        args.redis_fsync, args.pin, args.collect_quiet)
    started = time.monotonic()
    print(f"bench.cluster: {profile.name}, QoS {args.qos}, {profile.runs} runs x {list(args.systems)}; logs in "
          f"{workdir}", file=sys.stderr, flush=True)
    try:
        for run in range(1, profile.runs + 1):
            shift = (run - 1) % len(args.systems)
            for system in [*args.systems[shift:], *args.systems[:shift]]:  # a different order every run
                print(f"[run {run}/{profile.runs}] {system}", file=sys.stderr, flush=True)
                busy_before = await wait_for_quiet(args.wait_quiet, QUIET_BELOW_PCT) if args.wait_quiet else None
                record = await Session(settings, system, run).run_once()
                if busy_before is not None:
                    record.extra["machine_busy_before_pct"] = round(busy_before, 1)
                data["records"].append(asdict(record))
                shown = ", ".join(f"{k}={fmt(v)}" for k, v in record.values.items())
                print(f"  {shown}{' ERROR ' + record.error if record.error else ''}"
                      f"{' NOTES: ' + '; '.join(record.notes) if record.notes else ''}", file=sys.stderr,
                      flush=True)
    finally:
        data["meta"]["minutes"] = (time.monotonic() - started) / 60
        data["summary"] = summarize(data)
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=1))
        os.replace(temporary, out)
        print(f"bench.cluster: raw results in {out}", file=sys.stderr, flush=True)
    return data


def cpu_pair(text: str) -> tuple[int, int]:
    try:
        service, generator = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("two CPU numbers: SERVICE,GENERATOR, e.g. 0,1") from None
    if service == generator or not {service, generator} <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"two distinct CPUs of {sorted(os.sched_getaffinity(0))}")
    return service, generator


def system_list(text: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    if not chosen or any(c not in SYSTEMS for c in chosen):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SYSTEMS)}")
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.subscribers} subscribers, {QUICK.seconds:g} s windows, {QUICK.runs} runs "
                             f"(default: {FULL.subscribers}, {FULL.seconds:g} s, {FULL.runs} runs)")
    parser.add_argument("--runs", type=int, help="runs of every system")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1, help="sendEvent QoS (default 1)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/cluster-qos<Q>-<profile>.json)")
    parser.add_argument("--systems", type=system_list, default=SYSTEMS, help=f"subset of {','.join(SYSTEMS)}")
    parser.add_argument("--subscribers", type=int, help="subscribers (endpoints), one per user")
    parser.add_argument("--concurrency", type=int, help="closed-loop HTTP connections")
    parser.add_argument("--seconds", type=float, help="measured load window, seconds")
    parser.add_argument("--redis-fsync", choices=("always", "everysec", "no"), default="always",
                        help="Redis appendfsync (default always: durable like the SQLite store's `full`)")
    parser.add_argument("--pin", type=cpu_pair, metavar="SERVICE,GENERATOR",
                        help="every service process (nodes, redis-server) on one CPU, the generator and the bench "
                             "on another (default: no pinning)")
    parser.add_argument("--log-level", default="INFO", help="ENDPOINT_BROKER_LOG_LEVEL of the services (default INFO)")
    parser.add_argument("--collect-quiet", type=float, default=COLLECT_QUIET_S,
                        help="after the load, wait until no event arrived for this long (default "
                             f"{COLLECT_QUIET_S:g} s; at most {COLLECT_MAX_WAIT_S:g} s)")
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="S",
                        help=f"before each session, wait up to S seconds until other processes use less than "
                             f"{QUIET_BELOW_PCT:g}%% of a core (default 60; 0: do not wait)")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="only print the report of an earlier run")
    parser.add_argument("--http-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace, profile: Profile) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM stops like Ctrl-C: sessions stop their processes, what was measured is saved.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await run_all(args, profile)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.http_worker:
        import uvloop  # noqa: PLC0415 - the generator's loop, as bench.worker's

        uvloop.run(serve_http_worker())
        return 0
    if args.from_json:
        print(report(json.loads(args.from_json.read_text())), end="")
        return 0
    profile = QUICK if args.quick else FULL
    overrides = {"runs": args.runs, "subscribers": args.subscribers, "concurrency": args.concurrency,
                 "seconds": args.seconds}
    profile = replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    try:
        data = asyncio.run(main_async(args, profile))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench.cluster: interrupted; what was measured is saved", file=sys.stderr)
        return 130
    print(report(data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
