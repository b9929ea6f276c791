"""MQTT byte builders for tests, written independently of broker_plugin.codec (so they can check it)."""

from __future__ import annotations


def varint(length: int) -> bytes:
    """A remaining length (MQTT 3.1.1, 2.2.3)."""
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(first_byte: int, body: bytes = b"") -> bytes:
    return bytes((first_byte,)) + varint(len(body)) + body


def mqtt_bytes(value: str | bytes) -> bytes:
    """A length-prefixed MQTT string or binary field (1.5.3)."""
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def pid(packet_id: int) -> bytes:
    return packet_id.to_bytes(2, "big")
