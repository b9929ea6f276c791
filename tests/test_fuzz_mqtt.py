"""A seeded, bounded MQTT packet fuzzer against the real broker, over TCP and over WebSocket.

Hypothesis generates packets: random bytes before CONNECT, valid CONNECTs with bytes
flipped, and after a valid CONNECT, frames of every packet type with random flags and
bodies. Whatever they do to their own connection, a canary subscriber on another
connection keeps receiving events, the process stays up, and it logs no traceback.
The byte-level rules themselves are in tests/test_codec.py and tests/test_connection.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as websocket_connect

from tests.packets import mqtt_bytes
from tests.support import CONNECT, RawMqtt, ServiceProcess, event, packet, token

EXAMPLES = 150  # per transport and per strategy: the suite's budget, not a search for the last bug
USER = "fuzz-user"



def connect_packet(client_id: str, bearer: str) -> bytes:
    body = mqtt_bytes(b"MQTT") + bytes((4, 0xC2)) + struct.pack("!H", 60) + mqtt_bytes(client_id.encode()) \
        + mqtt_bytes(USER.encode()) + mqtt_bytes(bearer.encode())
    return packet(CONNECT << 4, body)


frames = st.builds(
    lambda kind, flags, body: packet((kind << 4) | flags, body),
    st.integers(0, 15), st.integers(0, 15), st.binary(max_size=300),
)
garbage = st.binary(min_size=1, max_size=400)


@st.composite
def flipped_connects(draw: st.DrawFn) -> bytes:
    data = bytearray(connect_packet("fuzz-flip", token(USER)))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[tuple[ServiceProcess, RawMqtt]]:
    # Its own service: thousands of refusals must not crowd the shared service's log or limits.
    service = ServiceProcess(env={"ENDPOINT_BROKER_CONNECT_RATE_PER_SECOND": "0"}).start()
    canary = RawMqtt(service.mqtt_port)
    assert canary.connect("fuzz-canary", USER, token(USER))[0] == 0
    assert canary.subscribe("users/endpoints/fuzz-canary") == [1]
    yield service, canary
    canary.close()
    service.close()


def _tcp(service: ServiceProcess) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        with socket.create_connection(("127.0.0.1", service.mqtt_port), timeout=5) as sock, \
                contextlib.suppress(OSError):
            sock.sendall(data)
    return send


def _websocket(service: ServiceProcess) -> Callable[[bytes], None]:
    def send(data: bytes) -> None:
        with contextlib.suppress(Exception), \
                websocket_connect(f"ws://127.0.0.1:{service.http_port}/ws",
                                  subprotocols=["mqtt"], open_timeout=5) as ws:  # type: ignore[list-item]
            ws.send(data)
    return send


def _assert_healthy(service: ServiceProcess, canary: RawMqtt, n: int) -> None:
    response = service.send_event(token(USER), {"userId": USER, "userEndpointId": "fuzz-canary",
                                                "event": event(n=n)})
    assert response.status_code == 200 and response.json() == 1
    assert canary.next_publish(timeout=10).json()["n"] == n
    canary.ping()  # the canary's own packets keep its endpoint alive
    assert service.process is not None and service.process.poll() is None
    assert "Traceback" not in service.stderr()


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
@pytest.mark.parametrize("shape", ["garbage", "flipped connect", "frames after connect"])
def test_malformed_packets_cost_only_their_own_connection(fuzzed: tuple[ServiceProcess, RawMqtt],
                                                          transport: str, shape: str) -> None:
    service, canary = fuzzed
    send = _tcp(service) if transport == "tcp" else _websocket(service)
    prefix = connect_packet("fuzz-victim", token(USER))
    strategy = {"garbage": garbage, "flipped connect": flipped_connects(), "frames after connect": frames}[shape]
    count = 0

    @seed(20261202)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(data=strategy)
    def one(data: bytes) -> None:
        nonlocal count
        send(prefix + data if shape == "frames after connect" else data)
        count += 1
        if count % 50 == 0:
            _assert_healthy(service, canary, count)

    one()
    _assert_healthy(service, canary, -1)
