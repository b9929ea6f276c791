"""MQTT 3.1.1 framing and the packets the server sends.

Decoding of packets with variable content (CONNECT, SUBSCRIBE, UNSUBSCRIBE,
PUBLISH) is amqtt's: its decoders are coroutines over a reader, and over an
in-memory `BufferReader` they never suspend, so `decode` runs them to completion
synchronously. That lets a connection parse a whole TCP read in one
`data_received` call, with no task per packet. The few packets the server writes
are fixed byte layouts, encoded here; tests compare them with amqtt's builders.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from amqtt.adapters import BufferReader
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes (MQTT 3.1.1, 3.2.2.3).
ACCEPTED = 0
UNACCEPTABLE_PROTOCOL_VERSION = 1
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80
MAX_REMAINING_LENGTH = 268_435_455

PINGRESP_BYTES = bytes((PINGRESP << 4, 0))

T = TypeVar("T")


class ProtocolViolation(Exception):
    """The peer broke MQTT framing; the connection must be closed."""


def run_to_completion(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that cannot suspend (it only awaits in-memory reads)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise ProtocolViolation("decoder tried to wait for more data")


def _decode(packet_class: type[T], first_byte: int, body: bytes) -> T:
    header = MQTTFixedHeader(first_byte >> 4, first_byte & 0x0F, len(body))
    try:
        decoder = packet_class.from_stream  # type: ignore[attr-defined]
        packet: T = run_to_completion(decoder(BufferReader(body), fixed_header=header))
        return packet
    except ProtocolViolation:
        raise
    except Exception as exc:
        raise ProtocolViolation(f"malformed {packet_class.__name__}: {exc}") from None


def decode_connect(first_byte: int, body: bytes) -> ConnectPacket:
    return _decode(ConnectPacket, first_byte, body)


def decode_subscribe(first_byte: int, body: bytes) -> SubscribePacket:
    return _decode(SubscribePacket, first_byte, body)


def decode_unsubscribe(first_byte: int, body: bytes) -> UnsubscribePacket:
    return _decode(UnsubscribePacket, first_byte, body)


def decode_publish(first_byte: int, body: bytes) -> PublishPacket:
    return _decode(PublishPacket, first_byte, body)


def protocol_of_connect(body: bytes) -> tuple[bytes, int]:
    """Protocol name and level, read before the rest: MQTT 5 adds fields amqtt cannot decode."""
    if len(body) < 2:
        raise ProtocolViolation("CONNECT too short")
    name_length = int.from_bytes(body[:2], "big")
    if len(body) < 3 + name_length:
        raise ProtocolViolation("CONNECT too short")
    return body[2 : 2 + name_length], body[2 + name_length]


def packet_id_of(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolViolation("packet id missing")
    return int.from_bytes(body[:2], "big")


def remaining_length_bytes(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        if length:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_connack(session_present: bool, return_code: int) -> bytes:
    return bytes((CONNACK << 4, 2, 1 if session_present else 0, return_code))


def encode_suback(packet_id: int, return_codes: list[int]) -> bytes:
    return (bytes((SUBACK << 4,)) + remaining_length_bytes(2 + len(return_codes))
            + packet_id.to_bytes(2, "big") + bytes(return_codes))


def encode_ack(packet_type: int, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBCOMP and UNSUBACK: a packet id and nothing else."""
    return bytes((packet_type << 4, 2)) + packet_id.to_bytes(2, "big")


def encode_publish(topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bytes:
    """A PUBLISH, never retained (endpoint events are not retained messages)."""
    topic_bytes = topic.encode()
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1)
    variable = len(topic_bytes).to_bytes(2, "big") + topic_bytes
    if qos:
        assert packet_id is not None
        variable += packet_id.to_bytes(2, "big")
    return bytes((first,)) + remaining_length_bytes(len(variable) + len(payload)) + variable + payload
