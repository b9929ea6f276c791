"""A lean MQTT 3.1.1 client for load generation: hand-encoded packets on an asyncio.Protocol.

paho and aiomqtt cost a thread or several tasks per client; here a connection is
one small Protocol object, so one process can hold 10k+ subscribers and still
keep up with the broker. It speaks only what the benchmark needs: CONNECT,
SUBSCRIBE, PINGREQ, PUBACK and DISCONNECT out; CONNACK, SUBACK, PINGRESP and
PUBLISH (QoS 0 and 1) in.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import cast

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGRESP = 1, 2, 3, 4, 8, 9, 13
PINGREQ_BYTES = b"\xc0\x00"
DISCONNECT_BYTES = b"\xe0\x00"
# Linux: let connect() pick the source port per 4-tuple after bind(ip, 0), so that
# each extra loopback source address brings another ~28k ephemeral ports.
IP_BIND_ADDRESS_NO_PORT = 24

# Called with (payload, receive time in ns) for every PUBLISH received.
MessageSink = Callable[[bytes, int], None]


class MqttError(Exception):
    """The broker refused or broke the handshake."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, username: str, password: str, keep_alive: int) -> bytes:
    flags = 0x80 | 0x40 | 0x02  # username, password, clean session
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keep_alive)
    body += _string(client_id) + _string(username) + _string(password)
    return bytes([CONNECT << 4]) + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic) + bytes([qos])
    return bytes([SUBSCRIBE << 4 | 0x02]) + _remaining_length(len(body)) + body


def puback_packet(packet_id: int) -> bytes:
    return bytes([PUBACK << 4, 2]) + struct.pack("!H", packet_id)


class MqttClient(asyncio.Protocol):
    """One subscriber connection. Answers QoS 1 PUBLISH with PUBACK and feeds payloads to `sink`."""

    __slots__ = ("_buffer", "_sink", "_waiter", "closed", "pingresps", "transport")

    def __init__(self, sink: MessageSink) -> None:
        self._sink = sink
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.pingresps = 0

    # ----------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(MqttError(f"connection lost: {exc or 'closed by peer'}"))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        position, end = 0, len(buffer)
        while end - position >= 2:
            length, multiplier, index = 0, 1, position + 1
            while index < end:
                digit = buffer[index]
                index += 1
                length += (digit & 0x7F) * multiplier
                if not digit & 0x80:
                    break
                multiplier *= 128
            else:
                break  # remaining length incomplete
            if index + length > end:
                break
            self._packet(buffer[position], bytes(buffer[index:index + length]))
            position = index + length
        del buffer[:position]

    # ------------------------------------------------------------ packets

    def _packet(self, first_byte: int, body: bytes) -> None:
        kind = first_byte >> 4
        if kind == PUBLISH:
            received = time.time_ns()
            qos = (first_byte >> 1) & 0x03
            topic_end = 2 + int.from_bytes(body[:2], "big")
            if qos:
                assert self.transport is not None
                self.transport.write(puback_packet(int.from_bytes(body[topic_end:topic_end + 2], "big")))
                topic_end += 2
            self._sink(body[topic_end:], received)
        elif kind == PINGRESP:
            self.pingresps += 1
        elif kind in (CONNACK, SUBACK) and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result((kind, body))

    async def _exchange(self, packet: bytes, expected: int, timeout_s: float) -> bytes:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(packet)
        kind, body = await asyncio.wait_for(self._waiter, timeout_s)
        self._waiter = None
        if kind != expected:
            raise MqttError(f"expected packet type {expected}, got {kind}")
        return body

    # ------------------------------------------------------------- public

    async def handshake(self, client_id: str, username: str, password: str, keep_alive: int,
                        topic: str, qos: int, timeout_s: float) -> None:
        """CONNECT, wait for CONNACK 0, SUBSCRIBE, wait for a granted SUBACK."""
        connack = await self._exchange(connect_packet(client_id, username, password, keep_alive), CONNACK, timeout_s)
        if len(connack) < 2 or connack[1] != 0:
            raise MqttError(f"CONNACK return code {connack[1] if len(connack) > 1 else '?'}")
        suback = await self._exchange(subscribe_packet(1, topic, qos), SUBACK, timeout_s)
        if len(suback) < 3 or suback[2] == 0x80:
            raise MqttError("SUBACK refused the subscription")

    def ping(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(PINGREQ_BYTES)

    def abort(self) -> None:
        """Drop the connection with a RST, leaving no TIME_WAIT behind to eat ephemeral ports."""
        if self.transport is not None and not self.closed:
            self.transport.abort()


def connecting_socket(source_ip: str, host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket from `source_ip` (port chosen per 4-tuple at connect), connect started.

    uvloop's sock_connect costs twice a plain create_connection; a non-blocking connect
    handed straight to create_connection(sock=...) costs a third more (on loopback the
    handshake is usually done when connect returns; a refusal shows up as a lost connection).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.bind((source_ip, 0))
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            raise OSError(code, os.strerror(code))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_client(host: str, port: int, sink: MessageSink, source_ip: str | None,
                      timeout_s: float) -> MqttClient:
    """Connect from the default address (None: the kernel's own, cheapest path) or from `source_ip`."""
    loop = asyncio.get_running_loop()
    if source_ip is None:
        connecting = loop.create_connection(lambda: MqttClient(sink), host, port)
    else:
        connecting = loop.create_connection(lambda: MqttClient(sink), sock=connecting_socket(source_ip, host, port))
    _, client = await asyncio.wait_for(connecting, timeout_s)
    return client
