"""A load-generator process: `python -m bench.worker`, driven by JSON lines on stdin.

Each command line gets exactly one JSON line back on stdout (logs go to stderr).
The parent runs several of these so that the generator has its own cores' worth
of CPU, measured separately from the service. Every command is bounded in time
by its own deadline; the parent adds a timeout on top.

Commands: prepare, connect, reset, ping_start, ping_stop, collect, status, load, close.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import httplite, mqttlite, plan, tokens

SEND_PATH = "/rtc-api/users/endpoints/sendEvent"
# The markers the HTTP load puts into each event: phase id and send time (ns).
MARKER = re.compile(rb'"bp":\s*(\d+),\s*"bt":\s*(\d+)')
# Latency samples kept per phase; past this, reservoir sampling keeps an unbiased subset.
MAX_SAMPLES = 200_000


@dataclass
class PhaseStats:
    received: int = 0
    last_receive: float = 0.0  # loop time
    last_receive_wall: float = 0.0  # time.time(), comparable across processes
    samples: list[int] = field(default_factory=list)  # latency in microseconds

    def add(self, latency_us: int, rng: random.Random) -> None:
        self.received += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(latency_us)
        else:
            slot = rng.randrange(self.received)
            if slot < MAX_SAMPLES:
                self.samples[slot] = latency_us


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values) - 1, max(0, round(fraction * (len(sorted_values) - 1))))
    return sorted_values[rank]


def short_error(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:80]}"


def send_event_body(user_id: str, qos: int, phase: int, call: int, sent_ns: int, *,
                    endpoint_id: str | None = None, organization_id: str | None = None) -> bytes:
    """A sendEvent body whose event carries the markers on_message finds: "bp" (the phase) and
    "bt" (the send time in ns), side by side."""
    event = {"type": "CallCreatedEvent", "timestamp": "2011-12-03T10:15:30Z", "aggregate": "call",
             "callId": f"call-{call}", "userId": user_id, "bp": phase, "bt": sent_ns}
    command: dict[str, Any] = {"userId": user_id, "qos": qos, "event": event}
    if endpoint_id is not None:
        command["userEndpointId"] = endpoint_id
    if organization_id is not None:
        command["organizationId"] = organization_id
    return json.dumps(command).encode()


@dataclass
class HttpTally:
    """What a closed-loop HTTP load counts, across its connections."""

    errors: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    http_ms: list[float] = field(default_factory=list)


async def post_send_event(connection: httplite.HttpConnection, host: str, port: int, token: str, timeout_s: float,
                          tally: HttpTally, user_id: str, qos: int, phase: int, call: int, *,
                          endpoint_id: str | None = None,
                          organization_id: str | None = None) -> tuple[int, bytes] | None:
    """POST one marked sendEvent, counting its status and HTTP time in `tally`; None if the
    connection failed (counted as an error: the connection is unusable then)."""
    sent_ns = time.time_ns()
    body = send_event_body(user_id, qos, phase, call, sent_ns, endpoint_id=endpoint_id,
                           organization_id=organization_id)
    try:
        status, answer = await connection.request(httplite.post_request(host, port, SEND_PATH, token, body),
                                                  timeout_s)
    except (OSError, TimeoutError, httplite.HttpError) as exc:
        tally.errors[short_error(exc)] += 1
        return None
    tally.http_ms.append((time.time_ns() - sent_ns) / 1e6)
    tally.statuses[status] += 1
    return status, answer


class Worker:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(1)
        self.clients: list[mqttlite.MqttClient] = []
        self.todo: list[tuple[plan.Endpoint, str, str]] = []  # endpoint, token, topic
        self.settings: dict[str, Any] = {}
        self.phases: dict[int, PhaseStats] = {}
        self.unmarked = 0
        self.ping_task: asyncio.Task[None] | None = None
        self.pings_sent = 0
        self.ping_stop = asyncio.Event()

    # ------------------------------------------------------------ receiving

    def on_message(self, payload: bytes, received_ns: int) -> None:
        match = MARKER.search(payload)
        if match is None:
            self.unmarked += 1
            return
        phase = int(match.group(1))
        stats = self.phases.get(phase)
        if stats is None:
            stats = self.phases[phase] = PhaseStats()
        stats.last_receive = self.loop.time()
        stats.last_receive_wall = received_ns / 1e9
        stats.add((received_ns - int(match.group(2))) // 1000, self.rng)

    # ------------------------------------------------------------- commands

    async def prepare(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Pick this worker's share of the endpoints and mint their tokens (not timed)."""
        self.settings = cmd
        style = plan.TopicStyle(cmd["style"])
        _, endpoints = plan.plan(cmd["n"], cmd.get("one_per_user", False))
        mine = endpoints[cmd["worker_index"]::cmd["workers"]]
        started = time.perf_counter()
        minted: dict[str, str] = {}
        self.todo = []
        for endpoint in mine:
            token = minted.get(endpoint.user_id)
            if token is None:
                token = minted[endpoint.user_id] = tokens.mint(cmd["secret"], endpoint.user_id)
            self.todo.append((endpoint, token, plan.topic(style, endpoint)))
        return {"endpoints": len(mine), "mint_s": time.perf_counter() - started}

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open, CONNECT and SUBSCRIBE every prepared endpoint, `concurrency` at a time, until the deadline."""
        s = self.settings
        deadline = self.loop.time() + cmd["deadline_s"]
        timeout = cmd["handshake_timeout_s"]
        sources: list[str | None] = list(s.get("source_ips") or [None])
        todo = iter(self.todo)
        errors: Counter[str] = Counter()
        done_at: list[float] = []
        handshake_ms: list[float] = []
        timed_out = False

        async def runner() -> None:
            nonlocal timed_out
            for endpoint, token, topic in todo:
                if self.loop.time() > deadline:
                    timed_out = True
                    return
                began = time.perf_counter()
                client: mqttlite.MqttClient | None = None
                try:
                    source = sources[endpoint.index % len(sources)]
                    client = await mqttlite.open_client(s["host"], s["port"], self.on_message, source, timeout)
                    await client.handshake(endpoint.endpoint_id, endpoint.user_id, token, s["keep_alive"],
                                           topic, 1, timeout)
                except Exception as exc:  # counted per kind; one failed endpoint must not stop the others
                    errors[short_error(exc)] += 1
                    if client is not None:
                        client.abort()
                    continue
                self.clients.append(client)
                now = time.time()
                done_at.append(now)
                handshake_ms.append((time.perf_counter() - began) * 1000)

        started = time.time()
        await asyncio.gather(*(runner() for _ in range(cmd["concurrency"])))
        handshake_ms.sort()
        return {
            "attempted": len(self.todo), "connected": len(done_at), "failed": sum(errors.values()),
            "errors": dict(errors.most_common(5)), "timed_out": timed_out,
            "t_start": started, "done_at": [round(t - started, 5) for t in done_at],
            "handshake_p50_ms": percentile(handshake_ms, 0.5), "handshake_p99_ms": percentile(handshake_ms, 0.99),
        }

    async def reset(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Drop every client (their broker was restarted), so that `connect` can connect them all again.

        The list is emptied in place: a ping task started later iterates the same list object.
        """
        for client in self.clients:
            client.abort()
        dropped = len(self.clients)
        self.clients.clear()
        return {"dropped": dropped}

    async def ping_start(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.ping_stop.clear()
        self.ping_task = asyncio.create_task(self._ping(cmd["period_s"], cmd["max_s"]))
        return {"clients": len(self.clients)}

    async def _ping(self, period: float, max_s: float) -> None:
        """PINGREQ from every connected client once per `period`, spread evenly, until stopped or max_s.

        It may start before the clients connect: each tick covers the clients connected so far.
        """
        clients = self.clients
        tick = 0.02
        position, owed = 0, 0.0
        start = self.loop.time()
        next_tick = start
        while not self.ping_stop.is_set() and self.loop.time() - start < max_s:
            owed += len(clients) * tick / period
            while owed >= 1:
                clients[position % len(clients)].ping()
                position += 1
                self.pings_sent += 1
                owed -= 1
            next_tick += tick
            await asyncio.sleep(max(0.0, next_tick - self.loop.time()))

    async def ping_stop_cmd(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.ping_stop.set()
        if self.ping_task is not None:
            await self.ping_task
            self.ping_task = None
        return await self.status(cmd)

    async def collect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """After the load: wait until the phase's messages stop arriving (or max_wait); return its numbers."""
        stats = self.phases.setdefault(cmd["phase"], PhaseStats())
        started = self.loop.time()
        while self.loop.time() - started < cmd["max_wait_s"]:
            if self.loop.time() - max(stats.last_receive, started) >= cmd["quiet_s"]:
                break
            await asyncio.sleep(0.02)
        samples = stats.samples
        del self.phases[cmd["phase"]]  # a late straggler starts a new, ignored record
        return {"received": stats.received, "last_receive": stats.last_receive_wall, "samples_us": samples,
                "unmarked": self.unmarked, "closed": sum(c.closed for c in self.clients)}

    async def status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        return {"clients": len(self.clients), "closed": sum(c.closed for c in self.clients),
                "pings": self.pings_sent, "pingresps": sum(c.pingresps for c in self.clients)}

    async def load(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Closed-loop sendEvent load: `concurrency` keep-alive connections, each one request at a time.

        With `one_per_user`, every user owns one endpoint and each request names it (userEndpointId).
        """
        one_per_user = cmd.get("one_per_user", False)
        users, endpoints = plan.plan(cmd["n"], one_per_user)
        token = tokens.mint(cmd["secret"], plan.SENDER)
        host, port, qos, phase = cmd["host"], cmd["port"], cmd["qos"], cmd["phase"]
        timeout = cmd["request_timeout_s"]
        tally = HttpTally()
        totals = {"answered": 0, "planned": 0, "sent": 0}
        connections = [await httplite.open_connection(host, port, timeout) for _ in range(cmd["concurrency"])]
        deadline = self.loop.time() + cmd["duration_s"]

        async def client(connection: httplite.HttpConnection, rng: random.Random) -> None:
            while self.loop.time() < deadline and totals["sent"] < cmd["max_requests"]:
                if one_per_user:
                    endpoint = endpoints[rng.randrange(len(endpoints))]
                    user_id, endpoint_id, expected = endpoint.user_id, endpoint.endpoint_id, 1
                else:
                    user = users[rng.randrange(len(users))]
                    user_id, endpoint_id, expected = user.user_id, None, user.endpoints
                totals["sent"] += 1
                answered = await post_send_event(connection, host, port, token, timeout, tally, user_id, qos,
                                                 phase, totals["sent"], endpoint_id=endpoint_id)
                if answered is None:
                    return  # this connection is unusable now
                status, answer = answered
                if status == 200:
                    totals["planned"] += expected
                    totals["answered"] += int(answer) if answer.strip().isdigit() else 0

        started = time.time()
        await asyncio.gather(*(client(c, random.Random(i)) for i, c in enumerate(connections)))
        ended = time.time()
        for connection in connections:
            connection.close()
        statuses, http_ms = tally.statuses, sorted(tally.http_ms)
        return {
            "requests": totals["sent"], "statuses": {str(k): v for k, v in statuses.items()},
            "ok_requests": statuses.get(200, 0), "errors": dict(tally.errors.most_common(5)),
            "answered": totals["answered"], "planned": totals["planned"], "t_start": started, "t_end": ended,
            "http_p50_ms": percentile(http_ms, 0.5), "http_p99_ms": percentile(http_ms, 0.99),
        }

    async def close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.ping_stop.set()
        for client in self.clients:
            client.abort()
        closed = len(self.clients)
        self.clients = []
        return {"aborted": closed}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker()
    handlers = {
        "prepare": worker.prepare, "connect": worker.connect, "reset": worker.reset, "ping_start": worker.ping_start,
        "ping_stop": worker.ping_stop_cmd, "collect": worker.collect, "status": worker.status,
        "load": worker.load, "close": worker.close,
    }
    while line := await reader.readline():
        cmd = json.loads(line)
        try:
            reply = {"ok": True, **await handlers[cmd["cmd"]](cmd)}
        except Exception as exc:  # reported to the parent, which records it against the scenario
            traceback.print_exc()
            reply = {"ok": False, "error": short_error(exc)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["cmd"] == "close":
            break


def main() -> None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, shipped with uvicorn[standard]
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
