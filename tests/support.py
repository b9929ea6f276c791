"""Test support: the real service in a subprocess, and real MQTT clients.

`ServiceProcess` runs `python run_broker.py` on free ports, exactly as an operator
would. `RawMqtt` is a small blocking MQTT 3.1.1 client over a plain socket, used
where a test must see exact wire values (CONNACK codes, DUP flags, when the
server closes); paho-mqtt is used everywhere a normal client will do.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho

from endpoint_core.principals import mint_token
from tests.packets import mqtt_bytes, packet

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789-0123456789-abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (Linux /proc): its socket inodes matched to LISTEN rows."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            columns = row.split()
            if columns[3] == "0A" and columns[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


def token(user: str, org: str | None = "org-a", *, roles: tuple[str, ...] = ("ROLE_USER",),
          ttl: float = 3600, secret: str = SECRET, **extra: Any) -> str:
    if extra:
        import jwt

        now = time.time()
        payload = {"userId": user, "organization_id": org, "authorities": list(roles),
                   "iat": int(now), "exp": int(now + ttl), **extra}
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, secret, algorithm="HS256")
    return mint_token(secret, user_id=user, organization_id=org, roles=roles, ttl_seconds=ttl)


def service_token(user: str = "backend", org: str | None = None) -> str:
    return token(user, org, roles=("ROLE_SERVICE",))


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


@dataclass
class ServiceProcess:
    """The real service, started with `python run_broker.py` on free ports."""

    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    secret: str | None = SECRET
    soft_file_limit: int | None = None  # start the process with this soft RLIMIT_NOFILE
    tls: ssl.SSLContext | None = None  # the client context for a service started with TLS: HTTPS then
    file_limit: int | None = None  # start the process with this soft and hard RLIMIT_NOFILE

    def __post_init__(self) -> None:
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.mqtts_port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="endpoint-broker-test-")
        self.stdout_path = Path(self._dir.name) / "stdout.log"
        self.stderr_path = Path(self._dir.name) / "stderr.log"
        # Each service its own data dir, kept across restart() (ENDPOINT_BROKER_DATA_DIR in env wins).
        self.data_dir = Path(self._dir.name) / "data"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    def start(self, wait: bool = True) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENDPOINT_BROKER_")}
        if self.secret is not None:
            env["ENDPOINT_BROKER_JWT_SECRET"] = self.secret
        env["ENDPOINT_BROKER_DATA_DIR"] = str(self.data_dir)
        env.update(self.env)
        command = [sys.executable, str(ROOT / "run_broker.py"), "--host", "127.0.0.1",
                   "--mqtt-port", str(self.mqtt_port), "--http-port", str(self.http_port),
                   "--mqtts-port", str(self.mqtts_port), *self.args]
        # Appended, so that the log of a restarted service holds every run.
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=env,
            stdout=self.stdout_path.open("ab"), stderr=self.stderr_path.open("ab"),
            preexec_fn=self._lower_file_limit if self.soft_file_limit or self.file_limit else None,  # noqa: PLW1509
        )
        if wait:
            self.wait_ready()
        return self

    def restart(self, sig: int = signal.SIGTERM) -> ServiceProcess:
        """Stop (SIGTERM, or SIGKILL for a crash) and start again on the same ports and data dir."""
        self.stop(sig)
        return self.start()

    def _lower_file_limit(self) -> None:
        import resource

        if self.file_limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.file_limit, self.file_limit))
            return
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft_file_limit, hard))

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/healthz", timeout=1, verify=self.tls or True).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"service not ready in {timeout}s:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self._dir.cleanup()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def http(self, bearer: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=10, verify=self.tls or True)

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.base_url + "/healthz", timeout=5, verify=self.tls or True).json()
        return result

    # ---------------------------------------------------------- shortcuts

    def register(self, bearer: str, keep_alive: int = 60, endpoint_id: str | None = None, **extra: Any) -> str:
        body: dict[str, Any] = {"keepAliveSeconds": keep_alive, **extra}
        if endpoint_id is not None:
            body["userEndpointId"] = endpoint_id
        with self.http(bearer) as client:
            response = client.post("/rtc-api/users/endpoints", json=body)
        assert response.status_code == 200, response.text
        endpoint: str = response.json()
        return endpoint

    def view(self, bearer: str, endpoint_id: str) -> httpx.Response:
        with self.http(bearer) as client:
            return client.get(f"/rtc-api/users/endpoints/{endpoint_id}")

    def send_event(self, bearer: str, body: dict[str, Any]) -> httpx.Response:
        with self.http(bearer) as client:
            return client.post("/rtc-api/users/endpoints/sendEvent", json=body)


def event(event_type: str = "CallCreatedEvent", **fields: Any) -> dict[str, Any]:
    return {"type": event_type, "timestamp": "2011-12-03T10:15:30Z", **fields}


# ------------------------------------------------------------------ raw MQTT

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 10, 11, 12, 13, 14




@dataclass
class Publish:
    topic: str
    payload: bytes
    qos: int
    dup: bool
    retain: bool
    packet_id: int | None

    def json(self) -> Any:
        return json.loads(self.payload)


class RawMqtt:
    """A blocking MQTT 3.1.1 client that exposes exact wire values."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self._buffer = b""
        self._next_id = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawMqtt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str, username: str | None = None, password: str | None = None, *,
                keep_alive: int = 60, clean_session: bool = True, level: int = 4,
                name: bytes = b"MQTT") -> tuple[int, bool]:
        """Send CONNECT; return (CONNACK return code, session present)."""
        flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) \
            | (0x40 if password is not None else 0)
        body = mqtt_bytes(name) + bytes((level, flags)) + struct.pack("!H", keep_alive) + mqtt_bytes(client_id)
        if level == 5:
            body = mqtt_bytes(name) + bytes((level, flags)) + struct.pack("!H", keep_alive) + b"\x00" \
                + mqtt_bytes(client_id)
        if username is not None:
            body += mqtt_bytes(username)
        if password is not None:
            body += mqtt_bytes(password)
        self.send(packet(CONNECT << 4, body))
        kind, _, payload = self.read_packet()
        assert kind == CONNACK, kind
        return payload[1], bool(payload[0] & 1)

    def subscribe(self, *topics: str, qos: int = 1) -> list[int]:
        packet_id = self._packet_id()
        body = struct.pack("!H", packet_id) + b"".join(mqtt_bytes(t) + bytes((qos,)) for t in topics)
        self.send(packet((SUBSCRIBE << 4) | 0x02, body))
        while True:
            kind, _, payload = self.read_packet()
            if kind == SUBACK:
                assert struct.unpack("!H", payload[:2])[0] == packet_id
                return list(payload[2:])

    def unsubscribe(self, *topics: str) -> None:
        packet_id = self._packet_id()
        self.send(packet((UNSUBSCRIBE << 4) | 0x02, struct.pack("!H", packet_id) + b"".join(map(mqtt_bytes, topics))))
        while self.read_packet()[0] != UNSUBACK:
            pass

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        body = mqtt_bytes(topic)
        if qos:
            body += struct.pack("!H", self._packet_id())
        self.send(packet((PUBLISH << 4) | (qos << 1) | int(retain), body + payload))

    def ping(self) -> None:
        self.send(packet(PINGREQ << 4, b""))

    def puback(self, packet_id: int) -> None:
        self.send(packet(PUBACK << 4, struct.pack("!H", packet_id)))

    def disconnect(self) -> None:
        self.send(packet(DISCONNECT << 4, b""))
        self.close()

    def read_packet(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        """(type, flags, body). Raises TimeoutError, or EOFError when the server closed."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no packet in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no packet in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("server closed the connection")
            self._buffer += data

    def next_publish(self, timeout: float = 5.0) -> Publish:
        while True:
            kind, flags, body = self.read_packet(timeout)
            if kind == PUBLISH:
                return self._publish(flags, body)

    def publishes(self, timeout: float) -> list[Publish]:
        """Every PUBLISH that arrives within `timeout`."""
        found = []
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            while (left := deadline - time.monotonic()) > 0:
                found.append(self.next_publish(left))
        return found

    def wait_closed(self, timeout: float = 5.0) -> float:
        """Block until the server closes the connection; return how long it took."""
        start = time.monotonic()
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                self.read_packet(max(0.01, timeout - (time.monotonic() - start)))
        return time.monotonic() - start

    def _publish(self, flags: int, body: bytes) -> Publish:
        topic_length = struct.unpack("!H", body[:2])[0]
        topic = body[2:2 + topic_length].decode()
        qos = (flags >> 1) & 3
        offset = 2 + topic_length
        packet_id = None
        if qos:
            packet_id = struct.unpack("!H", body[offset:offset + 2])[0]
            offset += 2
        return Publish(topic, body[offset:], qos, bool(flags & 8), bool(flags & 1), packet_id)

    def _parse(self) -> tuple[int, int, bytes] | None:
        data = self._buffer
        if len(data) < 2:
            return None
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(data):
                return None
            digit = data[index]
            index += 1
            length += (digit & 0x7F) * multiplier
            if not digit & 0x80:
                break
            multiplier *= 128
        if len(data) < index + length:
            return None
        self._buffer = data[index + length:]
        return data[0] >> 4, data[0] & 0x0F, data[index:index + length]

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id


# ------------------------------------------------------------------ paho

class PahoClient:
    """paho-mqtt with its network loop in a thread, and queues to wait on."""

    def __init__(self, client_id: str, *, username: str, password: str, port: int,
                 websocket: bool = False, keep_alive: int = 60, clean_session: bool = True,
                 tls: ssl.SSLContext | None = None) -> None:
        self.connacks: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.disconnected = queue.Queue[int]()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session,
            transport="websockets" if websocket else "tcp", reconnect_on_failure=False,
        )
        if websocket:
            self.client.ws_set_options(path="/ws")
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connacks.put(int(rc.value))
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put([int(r.value) for r in rcs])
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.put(int(rc.value))
        self.port, self.keep_alive = port, keep_alive

    def connect(self, timeout: float = 5.0) -> int:
        """Connect and return the CONNACK code as paho reports it (0 = accepted)."""
        self.client.connect("127.0.0.1", self.port, keepalive=self.keep_alive)
        self.client.loop_start()
        return self.connacks.get(timeout=timeout)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        self.client.subscribe(topic, qos)
        return self.subacks.get(timeout=timeout)

    def next_message(self, timeout: float = 5.0) -> paho.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def no_message(self, within: float = 0.5) -> bool:
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self, clean: bool = True) -> None:
        if clean:
            self.client.disconnect()
        else:
            with contextlib.suppress(OSError, AttributeError):
                sock = self.client.socket()
                if sock is not None:
                    sock.close()
        self.client.loop_stop()


@contextlib.contextmanager
def paho_client(service: ServiceProcess, client_id: str, user: str, bearer: str,
                **options: Any) -> Iterator[PahoClient]:
    port = service.http_port if options.get("websocket") else service.mqtts_port if options.get("tls") \
        else service.mqtt_port
    client = PahoClient(client_id, username=user, password=bearer, port=port, **options)
    try:
        yield client
    finally:
        client.close()
