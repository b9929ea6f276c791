"""Slow and idle HTTP clients cannot exhaust the process (real sockets against the real process)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from http_bridge.connections import (
    HEALTH_OVERFLOW,
    MIN_FD_RESERVE,
    CoalescedWrites,
    EndOfIteration,
    health_only,
    max_connections_for,
)
from tests.support import RawMqtt, ServiceProcess, event, paho_client, token, wait_until


def open_socket(process: ServiceProcess, first_bytes: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", process.http_port), timeout=5)
    if first_bytes:
        sock.sendall(first_bytes)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (EOF or reset); never blocks."""
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 7


async def test_a_response_written_in_pieces_leaves_in_one_write() -> None:
    real = RecordingTransport()
    coalesced = CoalescedWrites(real, EndOfIteration(asyncio.get_running_loop()))  # type: ignore[arg-type]

    coalesced.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    coalesced.write(b"{}")
    assert real.writes == []
    await asyncio.sleep(0)  # the end of the loop iteration

    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert coalesced.get_write_buffer_size() == 7  # everything else is the real transport's


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    loop = asyncio.get_running_loop()
    closed, aborted = RecordingTransport(), RecordingTransport()

    by_close = CoalescedWrites(closed, EndOfIteration(loop))  # type: ignore[arg-type]
    by_close.write(b"last")
    by_close.close()
    by_abort = CoalescedWrites(aborted, EndOfIteration(loop))  # type: ignore[arg-type]
    by_abort.write(b"lost")
    by_abort.abort()
    await asyncio.sleep(0)  # the end of the loop iteration: nothing more is written

    assert (closed.writes, closed.closed) == ([b"last"], True)
    assert (aborted.writes, aborted.aborted) == ([], True)


def test_the_cap_leaves_descriptors_for_mqtt_and_healthz() -> None:
    assert max_connections_for(10_000, None) == 10_000
    assert max_connections_for(10_000, 1_000_000) == 10_000
    assert max_connections_for(100, 600) == 100
    assert max_connections_for(10_000, 600) == 600 - MIN_FD_RESERVE - HEALTH_OVERFLOW
    assert max_connections_for(10_000, 10_000) == 10_000 - 1_000 - HEALTH_OVERFLOW  # a tenth is kept
    assert max_connections_for(10_000, 10) == 1


def test_requests_that_do_not_arrive_in_time_are_closed_but_websockets_live_on(
    make_service: Callable[..., ServiceProcess],
) -> None:
    process = make_service(env={"ENDPOINT_BROKER_HTTP_REQUEST_TIMEOUT_SECONDS": "1"})
    bearer = token("patient")
    with paho_client(process, "ws-tab", "patient", bearer, websocket=True) as websocket:
        assert websocket.connect() == 0
        assert websocket.subscribe("users/endpoints/ws-tab") == [1]
        idle = open_socket(process)
        slowloris = open_socket(process, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        short_body = open_socket(process, (
            f"POST /rtc-api/users/endpoints HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bearer}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"keepAliveSeconds\""
        ).encode())
        sockets = {"idle": idle, "slowloris": slowloris, "short body": short_body}
        closed: set[str] = set()
        deadline = time.monotonic() + 20
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                slowloris.send(b"X")  # one header byte at a time, each well within any idle timeout
            closed |= {name for name, sock in sockets.items() if name not in closed and closed_by_server(sock)}
            time.sleep(0.1)  # the slowloris pace, not a synchronisation
        assert closed == set(sockets)
        # The WebSocket connected before them, so it has outlived the request deadline: still served.
        assert process.send_event(bearer, {"userId": "patient", "qos": 1, "event": event(n=1)}).json() == 1
        assert json_of(websocket.next_message()) == 1
        with process.http(bearer) as http:  # and ordinary requests still work
            assert http.get("/rtc-api/users/endpoints/ws-tab").json()["connected"] is True
    for sock in sockets.values():
        sock.close()


def json_of(message: object) -> int:
    import json

    return int(json.loads(message.payload)["n"])  # type: ignore[attr-defined]


def test_mqtt_and_healthz_answer_while_http_is_saturated(make_service: Callable[..., ServiceProcess]) -> None:
    # 256 descriptors in all; 400 idle HTTP sockets would take every one of them.
    process = make_service(file_limit=256, env={"ENDPOINT_BROKER_HTTP_REQUEST_TIMEOUT_SECONDS": "120"})
    cap = max_connections_for(10_000, 256)
    attackers = [socket.create_connection(("127.0.0.1", process.http_port), timeout=5) for _ in range(400)]
    try:
        for sock in attackers:
            sock.setblocking(False)
        assert process.process is not None
        descriptors = Path(f"/proc/{process.process.pid}/fd")
        wait_until(lambda: len(list(descriptors.iterdir())) >= cap, timeout=30)  # the attack has landed
        bearer = token("still-served")
        with RawMqtt(process.mqtt_port) as client:
            assert client.connect("saturated-tab", "still-served", bearer) == (0, False)
        health = wait_until(lambda: _healthz(process), timeout=30)  # once the overflow's 2 s deadlines pass
        assert health["status"] == "ok" and health["endpoints"] == 1
        refused = httpx.get(process.base_url + "/rtc-api/users/endpoints", timeout=10,
                            headers={"Authorization": f"Bearer {bearer}"})
        assert refused.status_code == 503 and refused.headers["content-type"] == "application/problem+json"
        # HTTP holds the cap and the /healthz overflow (2 s each at most); the rest were closed at once.
        assert wait_until(lambda: sum(closed_by_server(s) for s in attackers) >= 400 - cap, timeout=30)
        assert process.process.poll() is None
    finally:
        for sock in attackers:
            sock.close()
    with process.http(token("still-served")) as http:  # the attack is over: served again
        assert wait_until(lambda: http.get("/rtc-api/users/endpoints").status_code == 200, timeout=30)


def _healthz(process: ServiceProcess) -> dict[str, object] | None:
    try:
        response = httpx.get(process.base_url + "/healthz", timeout=3)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]


async def test_one_end_of_iteration_flushes_every_connection_written_in_it() -> None:
    end_of_iteration = EndOfIteration(asyncio.get_running_loop())
    first, second = RecordingTransport(), RecordingTransport()
    a = CoalescedWrites(first, end_of_iteration)  # type: ignore[arg-type]
    b = CoalescedWrites(second, end_of_iteration)  # type: ignore[arg-type]
    a.write(b"a1")
    b.write(b"b1")
    a.write(b"a2")
    await asyncio.sleep(0)  # the end of the loop iteration

    assert (first.writes, second.writes) == ([b"a1a2"], [b"b1"])
    a.write(b"a3")  # a later iteration is flushed by a later callback
    await asyncio.sleep(0)
    assert first.writes == [b"a1a2", b"a3"]


async def test_an_over_cap_connection_gets_one_answer_that_closes_it() -> None:
    """Its /healthz answer, and the 503 to anything else, both say `connection: close`, which
    makes uvicorn close the connection after it: one request per over-cap descriptor."""
    async def app(scope: object, receive: object, send: Callable[..., object]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    for path, status in (("/healthz", 200), ("/rtc-api/users/endpoints", 503)):
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object], sent: list[dict[str, object]] = sent) -> None:
            sent.append(message)

        await health_only(app)({"type": "http", "path": path}, None, send)
        assert sent[0]["status"] == status
        assert (b"connection", b"close") in sent[0]["headers"]  # type: ignore[operator]
