"""MQTT 3.1.1 wire format: framing, the packets a client sends, and the packets the server sends.

Pure functions over bytes, no I/O. Every decoder is strict where MQTT 3.1.1 says
"the Server MUST close the Network Connection" (section numbers below), and
raises ProtocolViolation with a short reason. The packets are small and fixed
in layout, so they are read straight from the buffer with `struct`: no reader
objects, no coroutines, nothing per packet but the result.

tests/test_codec.py checks every decoder byte by byte, and checks the encoders
against amqtt's own packet classes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (3.2.2.3).
ACCEPTED = 0
UNACCEPTABLE_PROTOCOL_VERSION = 1
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80

PROTOCOL_LEVEL_3_1_1 = 4
PINGRESP_BYTES = bytes((PINGRESP << 4, 0))

# The fixed-header flags each packet type must carry (2.2.2); PUBLISH's are its own.
REQUIRED_FLAGS = {
    CONNECT: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0,
    SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0,
}

_UINT16 = struct.Struct("!H")


class ProtocolViolation(Exception):
    """The peer broke MQTT 3.1.1; the connection must be closed."""


# ----------------------------------------------------------------- framing

@dataclass(frozen=True, slots=True)
class Frame:
    """The fixed header of one packet, and where its body lies in the buffer."""

    packet_type: int
    flags: int
    body_start: int
    body_end: int


def read_frame(buffer: bytes | bytearray, start: int, max_body: int) -> Frame | None:
    """The frame at `start`, or None when the buffer does not hold all of it yet.

    The remaining length takes at most four bytes (2.2.3). A body over `max_body`
    is refused as soon as its length is known, before it is buffered.
    """
    end = len(buffer)
    if end - start < 2:
        return None
    length, shift, index = 0, 0, start + 1
    while True:
        if index >= end:
            return None
        digit = buffer[index]
        index += 1
        length |= (digit & 0x7F) << shift
        if not digit & 0x80:
            break
        shift += 7
        if shift > 21:
            raise ProtocolViolation("remaining length longer than 4 bytes")
    if length > max_body:
        raise ProtocolViolation(f"packet of {length} bytes exceeds the limit of {max_body}")
    if index + length > end:
        return None
    first = buffer[start]
    return Frame(first >> 4, first & 0x0F, index, index + length)


def remaining_length_bytes(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length & 0x7F, length >> 7
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


# ----------------------------------------------------------------- decoding

class _Reader:
    """Reads MQTT fields from one packet body, refusing to run past its end."""

    __slots__ = ("body", "position")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.position = 0

    @property
    def remaining(self) -> int:
        return len(self.body) - self.position

    def byte(self, what: str) -> int:
        if self.remaining < 1:
            raise ProtocolViolation(f"{what} missing")
        value = self.body[self.position]
        self.position += 1
        return value

    def uint16(self, what: str) -> int:
        if self.remaining < 2:
            raise ProtocolViolation(f"{what} missing")
        (value,) = _UINT16.unpack_from(self.body, self.position)
        self.position += 2
        return int(value)

    def binary(self, what: str) -> bytes:
        length = self.uint16(what)
        if self.remaining < length:
            raise ProtocolViolation(f"{what} runs past the end of the packet")
        value = self.body[self.position:self.position + length]
        self.position += length
        return value

    def text(self, what: str) -> str:
        """A UTF-8 string (1.5.3): well-formed, and without U+0000."""
        raw = self.binary(what)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation(f"{what} is not valid UTF-8") from None
        if "\x00" in value:
            raise ProtocolViolation(f"{what} contains U+0000")
        return value

    def rest(self) -> bytes:
        value = self.body[self.position:]
        self.position = len(self.body)
        return value

    def packet_id(self) -> int:
        packet_id = self.uint16("packet id")
        if packet_id == 0:
            raise ProtocolViolation("packet id 0")  # 2.3.1: non-zero
        return packet_id


@dataclass(frozen=True, slots=True)
class Connect:
    protocol_name: bytes
    protocol_level: int
    # The rest is only read for protocol level 4; other levels are answered CONNACK 1.
    clean_session: bool = True
    keep_alive: int = 0
    client_id: str = ""
    username: str | None = None
    password: str | None = None


def decode_connect(flags: int, body: bytes) -> Connect:
    """CONNECT (3.1). Fields after the protocol level are read only for MQTT 3.1.1."""
    _check_flags(CONNECT, flags)
    reader = _Reader(body)
    name = reader.binary("protocol name")
    if name not in (b"MQTT", b"MQIsdp"):
        raise ProtocolViolation("not an MQTT CONNECT")  # 3.1.2.1: close without CONNACK
    level = reader.byte("protocol level")
    if level != PROTOCOL_LEVEL_3_1_1:
        return Connect(name, level)
    connect_flags = reader.byte("connect flags")
    if connect_flags & 0x01:
        raise ProtocolViolation("CONNECT reserved flag set")  # 3.1.2.3
    will_flag = bool(connect_flags & 0x04)
    will_qos = (connect_flags >> 3) & 0x03
    if will_qos == 3:
        raise ProtocolViolation("will QoS 3")  # 3.1.2.6
    if not will_flag and connect_flags & 0x38:
        raise ProtocolViolation("will QoS or retain set without the will flag")  # 3.1.2.5, 3.1.2.7
    keep_alive = reader.uint16("keep alive")
    client_id = reader.text("client id")
    if will_flag:
        # Accepted and never published: endpoint topics carry server events only.
        reader.text("will topic")
        reader.binary("will message")
    username = reader.text("username") if connect_flags & 0x80 else None
    # The password is the token: bytes in MQTT, text for us (a JWT is ASCII).
    password = reader.binary("password").decode("utf-8", "replace") if connect_flags & 0x40 else None
    if reader.remaining:
        raise ProtocolViolation("CONNECT carries extra bytes")
    return Connect(name, level, bool(connect_flags & 0x02), keep_alive, client_id, username, password)


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (topic filter, requested QoS)


def decode_subscribe(flags: int, body: bytes) -> Subscribe:
    """SUBSCRIBE (3.8): at least one filter, each with a QoS of 0, 1 or 2 and no reserved bits."""
    _check_flags(SUBSCRIBE, flags)
    reader = _Reader(body)
    packet_id = reader.packet_id()
    topics = []
    while reader.remaining:
        topic = reader.text("topic filter")
        options = reader.byte("requested QoS")
        if options > 2:
            raise ProtocolViolation(f"SUBSCRIBE with requested QoS byte {options}")  # 3.8.3.1
        topics.append((topic, options))
    if not topics:
        raise ProtocolViolation("SUBSCRIBE without topics")  # 3.8.3.1
    return Subscribe(packet_id, tuple(topics))


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


def decode_unsubscribe(flags: int, body: bytes) -> Unsubscribe:
    """UNSUBSCRIBE (3.10): at least one topic filter."""
    _check_flags(UNSUBSCRIBE, flags)
    reader = _Reader(body)
    packet_id = reader.packet_id()
    topics = []
    while reader.remaining:
        topics.append(reader.text("topic filter"))
    if not topics:
        raise ProtocolViolation("UNSUBSCRIBE without topics")  # 3.10.3
    return Unsubscribe(packet_id, tuple(topics))


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


def decode_publish(flags: int, body: bytes) -> Publish:
    """PUBLISH (3.3): QoS 0-2, a topic name without wildcards, DUP only with QoS > 0."""
    qos = (flags >> 1) & 0x03
    if qos == 3:
        raise ProtocolViolation("PUBLISH with QoS 3")  # 3.3.1.2
    dup = bool(flags & 0x08)
    if dup and qos == 0:
        raise ProtocolViolation("PUBLISH with DUP at QoS 0")  # 3.3.1.1
    reader = _Reader(body)
    topic = reader.text("topic name")
    if not topic or "+" in topic or "#" in topic:
        raise ProtocolViolation("PUBLISH topic must be a non-empty name without wildcards")  # 3.3.2.1
    packet_id = reader.packet_id() if qos else None
    return Publish(topic, reader.rest(), qos, bool(flags & 0x01), dup, packet_id)


def decode_packet_id_only(packet_type: int, flags: int, body: bytes) -> int:
    """PUBACK, PUBREC, PUBREL, PUBCOMP: exactly a non-zero packet id."""
    _check_flags(packet_type, flags)
    if len(body) != 2:
        raise ProtocolViolation(f"packet type {packet_type} must carry exactly a packet id")
    return _Reader(body).packet_id()


def decode_empty(packet_type: int, flags: int, body: bytes) -> None:
    """PINGREQ and DISCONNECT: no body at all."""
    _check_flags(packet_type, flags)
    if body:
        raise ProtocolViolation(f"packet type {packet_type} carries {len(body)} unexpected bytes")


def _check_flags(packet_type: int, flags: int) -> None:
    if flags != REQUIRED_FLAGS[packet_type]:
        raise ProtocolViolation(f"packet type {packet_type} with flags {flags:04b}")  # 2.2.2


# ----------------------------------------------------------------- encoding

def encode_connack(session_present: bool, return_code: int) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, return_code))


def encode_suback(packet_id: int, return_codes: list[int]) -> bytes:
    return (bytes((SUBACK << 4,)) + remaining_length_bytes(2 + len(return_codes))
            + _UINT16.pack(packet_id) + bytes(return_codes))


def encode_ack(packet_type: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBCOMP and UNSUBACK: a packet id and nothing else."""
    return bytes((packet_type << 4, 2)) + _UINT16.pack(packet_id)


def encode_publish(topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bytes:
    """A PUBLISH, never retained (endpoint events are not retained messages)."""
    topic_bytes = topic.encode()
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1)
    variable = _UINT16.pack(len(topic_bytes)) + topic_bytes
    if qos:
        assert packet_id is not None
        variable += _UINT16.pack(packet_id)
    return bytes((first,)) + remaining_length_bytes(len(variable) + len(payload)) + variable + payload
