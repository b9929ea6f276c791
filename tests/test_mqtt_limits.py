"""Defects found with real and hostile clients (issue 8), each against the real process.

The byte-level rules are in tests/test_codec.py and tests/test_connection.py; these
are the flows that need real sockets: WebSocket pings, aborted non-readers, the
limits on unauthenticated sockets, and what reaches the log.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect

from tests.support import (
    CONNECT,
    PINGREQ,
    RawMqtt,
    ServiceProcess,
    event,
    packet,
    paho_client,
    token,
    wait_until,
)

BASE = "/rtc-api/users/endpoints"


def open_sockets(service: ServiceProcess) -> int:
    assert service.process is not None
    fds = Path(f"/proc/{service.process.pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            count += os.readlink(fd).startswith("socket:")
    return count


def rss_bytes(service: ServiceProcess) -> int:
    assert service.process is not None
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_paho_over_websocket_stays_connected_while_idle(service: ServiceProcess, unique: str) -> None:
    """uvicorn pinged every 20 s, paho answered unmasked, and the server closed with 1002."""
    user = f"u-{unique}"
    bearer = token(user)
    with paho_client(service, f"e-{unique}", user, bearer, websocket=True, keep_alive=60) as client:
        assert client.connect() == 0
        assert client.subscribe(f"users/endpoints/e-{unique}") == [1]
        with pytest.raises(queue.Empty):
            client.disconnected.get(timeout=45)  # idle past two of uvicorn's default ping intervals
        assert service.send_event(bearer, {"userId": user, "event": event(n=1)}).json() == 1
        assert client.next_message().payload


def test_a_websocket_text_message_closes_only_that_connection(service: ServiceProcess, unique: str) -> None:
    url = f"ws://127.0.0.1:{service.http_port}/ws"
    with websocket_connect(url, subprotocols=["mqtt"]) as websocket:  # type: ignore[list-item]
        websocket.send("\x10\x00")  # text, not binary
        with pytest.raises(ConnectionClosed):
            websocket.recv(timeout=5)
    assert service.health()["status"] == "ok"


def _non_reader(service: ServiceProcess, endpoint_id: str, user: str, bearer: str) -> socket.socket:
    """A client that connects, subscribes, and then never reads: its receive window stays tiny."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", service.mqtt_port))
    client = RawMqtt.__new__(RawMqtt)
    client.sock, client._buffer, client._next_id = sock, b"", 0
    sock.settimeout(5)
    assert client.connect(endpoint_id, user, bearer, keep_alive=60)[0] == 0
    assert client.subscribe(f"users/endpoints/{endpoint_id}") == [1]
    return sock


def test_taking_over_from_a_client_that_does_not_read_frees_its_socket(
        make_service: Callable[..., ServiceProcess], unique: str) -> None:
    # A high unsent-bytes limit, so that megabytes wait in the server's buffer for each client.
    service = make_service(env={"ENDPOINT_BROKER_MQTT_MAX_BUFFERED_BYTES": str(64 << 20)})
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    fds_before, rss_before = open_sockets(service), rss_bytes(service)
    body = {"userId": user, "event": event(blob="x" * 60_000)}
    stuck = []
    with service.http(bearer) as http:
        for _ in range(4):
            stuck.append(_non_reader(service, endpoint_id, user, bearer))
            # About 7 MB the client never reads: more than the kernel's buffers take.
            for _ in range(120):
                assert http.post(f"{BASE}/sendEvent", json=body).status_code == 200
    with RawMqtt(service.mqtt_port) as last:
        assert last.connect(endpoint_id, user, bearer)[0] == 0
        # Every taken-over socket was aborted, unsent bytes and all: one connection is left.
        wait_until(lambda: open_sockets(service) <= fds_before + 1, timeout=10)
        assert rss_bytes(service) < rss_before + 16 * 1024 * 1024
    for sock in stuck:
        sock.close()


def test_a_client_that_floods_pings_without_reading_is_cut_off(make_service: Callable[..., ServiceProcess],
                                                               unique: str) -> None:
    service = make_service(env={"ENDPOINT_BROKER_MQTT_MAX_BUFFERED_BYTES": "65536"})
    user = f"u-{unique}"
    sock = _non_reader(service, f"e-{unique}", user, token(user))
    pings = packet(PINGREQ << 4, b"") * 50_000
    with pytest.raises(OSError):  # reset or broken pipe, once the server aborts it
        for _ in range(100):
            sock.sendall(pings)
    sock.close()
    wait_until(lambda: "does not read" in service.stderr())


def test_sockets_awaiting_connect_are_capped(make_service: Callable[..., ServiceProcess], unique: str) -> None:
    service = make_service(env={"ENDPOINT_BROKER_MQTT_MAX_PENDING_CONNECTS": "5"})
    silent = [socket.create_connection(("127.0.0.1", service.mqtt_port)) for _ in range(5)]
    wait_until(lambda: service.health()["pendingConnects"] == 5)
    extra = socket.create_connection(("127.0.0.1", service.mqtt_port))
    extra.settimeout(5)
    assert extra.recv(1) == b""  # refused at accept
    extra.close()
    wait_until(lambda: "mqtt_max_pending_connects" in service.stderr())
    for sock in silent:
        sock.close()
    wait_until(lambda: service.health()["pendingConnects"] == 0)
    user = f"u-{unique}"
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", user, token(user))[0] == 0


def test_a_connect_over_the_byte_limit_is_closed_before_it_arrives(service: ServiceProcess) -> None:
    with RawMqtt(service.mqtt_port) as client:
        # Declares a 100,000-byte CONNECT, over mqtt_max_connect_bytes (65536), and sends 10 bytes.
        client.send(bytes((CONNECT << 4,)) + bytes((0xA0, 0x8D, 0x06)) + b"\x00\x04MQTT\x04\x02\x00\x3c")
        client.wait_closed(timeout=5)


def test_an_ended_connection_leaves_one_log_line(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", user, token(user))[0] == 0
    wait_until(lambda: f"connection of e-{unique} from 127.0.0.1:" in service.stderr()
               and f"e-{unique} from" in service.stderr())
    line = next(li for li in service.stderr().splitlines() if f"connection of e-{unique}" in li)
    assert line.endswith("ended: dropped")


def test_a_refused_client_id_is_capped_and_escaped_in_the_log(make_service: Callable[..., ServiceProcess]) -> None:
    service = make_service()
    hostile = "\x1b[31m" + "\n\x07" * 30_000  # 60 KB of control characters
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(hostile, "u", token("u"))[0] == 2
    log = wait_until(lambda: "refused CONNECT" in service.stderr() and service.stderr())
    refusal = next(line for line in log.splitlines() if "refused CONNECT" in line)
    assert len(refusal) < 600 and "\x1b" not in log and "\x07" not in log
    assert "(60005 chars)" in refusal


def test_keep_alive_zero_is_honoured_while_connected(make_service: Callable[..., ServiceProcess],
                                                     unique: str) -> None:
    service = make_service(env={"ENDPOINT_BROKER_DEFAULT_MQTT_KEEP_ALIVE_SECONDS": "1"})
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer, keep_alive=0)[0] == 0
        with pytest.raises(TimeoutError):  # silent for 4 x keepAliveSeconds, and not closed
            client.read_packet(timeout=4)
        view = service.view(bearer, endpoint_id).json()
        assert view["keepAliveSeconds"] == 1 and view["state"] == "HEALTHY" and view["connected"]
    # Dropped: the endpoint's own 1 s schedule runs from the drop.
    wait_until(lambda: service.view(bearer, endpoint_id).status_code == 404, timeout=10)


def test_a_blocking_logout_sticks_until_the_app_registers_again(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer)[0] == 0
        with service.http(bearer) as http:
            response = http.post(f"{BASE}/unregister",
                                 json={"userEndpointId": endpoint_id, "reason": "User logout", "block": True})
        assert response.status_code == 204
        client.wait_closed()
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer)[0] == 5  # the client library's reconnect
    service.register(bearer, endpoint_id=endpoint_id)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer)[0] == 0
    with service.http(bearer) as http:
        response = http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id, "block": "yes"})
    assert response.status_code == 400 and response.json()["field"] == "block"

