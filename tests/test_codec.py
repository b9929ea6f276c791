"""The MQTT 3.1.1 codec byte by byte: framing, every decoder, and the encoders against amqtt's packet classes.

Pure functions over bytes: no sockets, no event loop. Section numbers are MQTT 3.1.1's.
amqtt is imported here only as an independent reference encoder; production code does not import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.packet import MQTTFixedHeader
from amqtt.mqtt.pingresp import PingRespPacket
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.suback import SubackPacket
from amqtt.mqtt.unsuback import UnsubackPacket

from broker_plugin import codec
from broker_plugin.codec import Connect, Frame, ProtocolViolation, Publish, Subscribe, Unsubscribe
from tests.packets import mqtt_bytes, pid

# ------------------------------------------------------------------ helpers (independent of the codec)






def connect_body(
    flags: int = 0x02,
    *,
    client_id: bytes = b"tab-1",
    keep_alive: int = 60,
    will: tuple[bytes, bytes] | None = None,
    username: bytes | None = None,
    password: bytes | None = None,
    name: bytes = b"MQTT",
    level: int = 4,
) -> bytes:
    """A CONNECT body. `flags` is written as given, so a test can set bits its fields do not match."""
    body = mqtt_bytes(name) + bytes((level, flags)) + keep_alive.to_bytes(2, "big") + mqtt_bytes(client_id)
    if will is not None:
        body += mqtt_bytes(will[0]) + mqtt_bytes(will[1])
    if username is not None:
        body += mqtt_bytes(username)
    if password is not None:
        body += mqtt_bytes(password)
    return body


def violation(call: Callable[[], object]) -> str:
    """The reason of the ProtocolViolation that `call()` raises."""
    with pytest.raises(ProtocolViolation) as raised:
        call()
    return str(raised.value)


# ================================================================== framing: read_frame

# (remaining length, its encoding): every boundary where the encoding grows by a byte (2.2.3, table 2.4).
REMAINING_LENGTHS = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
]


def test_read_frame_waits_for_the_first_two_bytes() -> None:
    assert codec.read_frame(b"", 0, 100) is None
    assert codec.read_frame(b"\xc0", 0, 100) is None


def test_read_frame_splits_the_first_byte_into_type_and_flags() -> None:
    assert codec.read_frame(b"\x3b\x00", 0, 100) == Frame(packet_type=3, flags=0xB, body_start=2, body_end=2)


@pytest.mark.parametrize(("length", "encoded"), [case for case in REMAINING_LENGTHS if case[0] <= 2097152])
def test_read_frame_locates_the_body_for_every_length_encoding_size(length: int, encoded: bytes) -> None:
    buffer = b"\x30" + encoded + bytes(length)
    assert codec.read_frame(buffer, 0, length) == Frame(3, 0, 1 + len(encoded), 1 + len(encoded) + length)


@pytest.mark.parametrize(("length", "encoded"), REMAINING_LENGTHS[1:])
def test_read_frame_decodes_the_remaining_length_before_the_body_arrives(length: int, encoded: bytes) -> None:
    header = b"\x30" + encoded
    # The whole body is missing: wait for it when it is allowed ...
    assert codec.read_frame(header, 0, length) is None
    # ... refuse it at once when it is one byte over the limit (the message proves the length decoded exactly).
    reason = violation(lambda: codec.read_frame(header, 0, length - 1))
    assert reason == f"packet of {length} bytes exceeds the limit of {length - 1}"


@pytest.mark.parametrize("buffer", [
    b"\x30\xff\xff\xff\xff\x01",  # a 5th length byte
    b"\x30\x80\x80\x80\x80\x00",
    b"\x30\x80\x80\x80\x80",  # four continuation bits: wrong before the 5th byte even arrives
])
def test_read_frame_refuses_a_remaining_length_longer_than_four_bytes(buffer: bytes) -> None:
    assert violation(lambda: codec.read_frame(buffer, 0, 1 << 30)) == "remaining length longer than 4 bytes"


@pytest.mark.parametrize("buffer", [b"\x30\x80", b"\x30\xff\xff", b"\x30\xff\xff\xff"])
def test_read_frame_waits_for_an_incomplete_remaining_length(buffer: bytes) -> None:
    assert codec.read_frame(buffer, 0, 1 << 30) is None


def test_read_frame_refuses_a_body_over_max_body_before_any_of_it_arrives() -> None:
    assert violation(lambda: codec.read_frame(b"\x30\x0b", 0, 10)) == "packet of 11 bytes exceeds the limit of 10"
    assert codec.read_frame(b"\x30\x0b", 0, 11) is None  # exactly max_body: waits for the body


@pytest.mark.parametrize("buffer", [b"\x30\x03", b"\x30\x03a", b"\x30\x03ab"])
def test_read_frame_waits_for_an_incomplete_body(buffer: bytes) -> None:
    assert codec.read_frame(buffer, 0, 100) is None


def test_read_frame_ignores_what_follows_the_frame() -> None:
    assert codec.read_frame(b"\x30\x03abc\xc0", 0, 100) == Frame(3, 0, 2, 5)


def test_read_frame_reads_from_start_with_positions_in_the_whole_buffer() -> None:
    buffer = b"\xc0\x00" + b"\x62\x02\x00\x07"
    assert codec.read_frame(buffer, 0, 100) == Frame(12, 0, 2, 2)
    assert codec.read_frame(buffer, 2, 100) == Frame(6, 2, 4, 6)
    assert codec.read_frame(buffer, 5, 100) is None  # one byte left


def test_read_frame_accepts_a_bytearray() -> None:
    assert codec.read_frame(bytearray(b"\xe0\x00"), 0, 0) == Frame(14, 0, 2, 2)


@pytest.mark.parametrize(("length", "encoded"), REMAINING_LENGTHS)
def test_remaining_length_bytes_matches_the_spec_table_and_amqtt(length: int, encoded: bytes) -> None:
    assert codec.remaining_length_bytes(length) == encoded
    assert MQTTFixedHeader(3, 0, length).to_bytes()[1:] == encoded


# ================================================================== CONNECT (3.1)


def test_decode_connect_reads_the_spec_example_byte_by_byte() -> None:
    body = (b"\x00\x04MQTT"  # protocol name
            b"\x04"  # level 4: MQTT 3.1.1
            b"\xc2"  # username, password, clean session
            b"\x00\x3c"  # keep alive 60
            b"\x00\x05tab-1"  # client id
            b"\x00\x05alice"  # username
            b"\x00\x03tok")  # password
    assert codec.decode_connect(0, body) == Connect(b"MQTT", 4, True, 60, "tab-1", "alice", "tok")


def test_decode_connect_without_clean_session_username_or_password() -> None:
    assert codec.decode_connect(0, connect_body(0x00, keep_alive=0)) == Connect(b"MQTT", 4, False, 0, "tab-1")


def test_decode_connect_reads_keep_alive_big_endian() -> None:
    assert codec.decode_connect(0, connect_body(keep_alive=0x1234)).keep_alive == 0x1234
    assert codec.decode_connect(0, connect_body(keep_alive=65535)).keep_alive == 65535


def test_decode_connect_leaves_an_empty_client_id_to_the_caller() -> None:
    # 3.1.3.1: the server answers CONNACK 2 (or assigns an id); that is a decision, not a malformed packet.
    assert codec.decode_connect(0, connect_body(client_id=b"")).client_id == ""


def test_decode_connect_reads_a_non_ascii_client_id() -> None:
    assert codec.decode_connect(0, connect_body(client_id="t\u00e4b-\u4e8b".encode())).client_id == "t\u00e4b-\u4e8b"


@pytest.mark.parametrize("will_bits", [0x04, 0x0C, 0x14, 0x24, 0x2C, 0x34])
def test_decode_connect_skips_a_will_with_qos_0_1_2_and_retain(will_bits: int) -> None:
    body = connect_body(0x02 | will_bits | 0xC0, will=(b"last/will", b"\x00\xffbye"), username=b"alice",
                        password=b"tok")
    assert codec.decode_connect(0, body) == Connect(b"MQTT", 4, True, 60, "tab-1", "alice", "tok")


def test_decode_connect_reads_the_password_as_text_replacing_invalid_utf8() -> None:
    body = connect_body(0xC2, username=b"alice", password=b"a\xffb")
    assert codec.decode_connect(0, body).password == "a\ufffdb"


def test_decode_connect_hands_a_password_without_username_to_the_caller() -> None:
    # MQTT-3.1.2-22 forbids it; the caller refuses it with CONNACK 4 ("no username", README).
    body = connect_body(0x42, password=b"tok")
    assert codec.decode_connect(0, body) == Connect(b"MQTT", 4, True, 60, "tab-1", None, "tok")


def test_decode_connect_reads_an_empty_username_and_password() -> None:
    body = connect_body(0xC2, username=b"", password=b"")
    assert codec.decode_connect(0, body) == Connect(b"MQTT", 4, True, 60, "tab-1", "", "")


@pytest.mark.parametrize(("name", "level"), [(b"MQTT", 5), (b"MQTT", 3), (b"MQIsdp", 3), (b"MQTT", 0), (b"MQTT", 255)])
def test_decode_connect_stops_after_the_level_when_it_is_not_3_1_1(name: bytes, level: int) -> None:
    # The rest may follow another version's layout (MQTT 5 properties): it is not read, the answer is CONNACK 1.
    body = mqtt_bytes(name) + bytes((level,)) + b"\x01\xff\x00"
    assert codec.decode_connect(0, body) == Connect(name, level)


def test_decode_connect_reads_an_mqisdp_name_with_level_4() -> None:
    assert codec.decode_connect(0, connect_body(name=b"MQIsdp")) == Connect(b"MQIsdp", 4, True, 60, "tab-1")


@pytest.mark.parametrize("flags", [0x1, 0x2, 0x4, 0x8, 0xF])
def test_decode_connect_refuses_fixed_header_flags(flags: int) -> None:
    assert violation(lambda: codec.decode_connect(flags, connect_body())) == f"packet type 1 with flags {flags:04b}"


MALFORMED_CONNECTS = [
    pytest.param(connect_body(0x03), "CONNECT reserved flag set", id="reserved-flag"),
    pytest.param(connect_body(0xC3, username=b"u", password=b"p"), "CONNECT reserved flag set",
                 id="reserved-flag-with-credentials"),
    pytest.param(connect_body(0x1E, will=(b"t", b"m")), "will QoS 3", id="will-qos-3"),
    pytest.param(connect_body(0x1A), "will QoS 3", id="will-qos-3-without-will-flag"),
    pytest.param(connect_body(0x0A), "will QoS or retain set without the will flag", id="will-qos-1-without-flag"),
    pytest.param(connect_body(0x12), "will QoS or retain set without the will flag", id="will-qos-2-without-flag"),
    pytest.param(connect_body(0x22), "will QoS or retain set without the will flag", id="will-retain-without-flag"),
    pytest.param(connect_body(name=b"MQTX"), "not an MQTT CONNECT", id="protocol-name"),
    pytest.param(connect_body(name=b"mqtt"), "not an MQTT CONNECT", id="protocol-name-lowercase"),
    pytest.param(connect_body(name=b""), "not an MQTT CONNECT", id="protocol-name-empty"),
    pytest.param(b"", "protocol name missing", id="empty-body"),
    pytest.param(b"\x00", "protocol name missing", id="protocol-name-length-cut"),
    pytest.param(b"\x00\x04MQ", "protocol name runs past the end of the packet", id="protocol-name-cut"),
    pytest.param(mqtt_bytes(b"MQTT"), "protocol level missing", id="level-missing"),
    pytest.param(mqtt_bytes(b"MQTT") + b"\x04", "connect flags missing", id="flags-missing"),
    pytest.param(mqtt_bytes(b"MQTT") + b"\x04\x02\x00", "keep alive missing", id="keep-alive-cut"),
    pytest.param(mqtt_bytes(b"MQTT") + b"\x04\x02\x00\x3c", "client id missing", id="client-id-missing"),
    pytest.param(mqtt_bytes(b"MQTT") + b"\x04\x02\x00\x3c\x00\x10ab", "client id runs past the end of the packet",
                 id="client-id-cut"),
    pytest.param(connect_body(client_id=b"\xff\xfe"), "client id is not valid UTF-8", id="client-id-invalid-utf8"),
    pytest.param(connect_body(client_id=b"\xc0\xaf"), "client id is not valid UTF-8", id="client-id-overlong"),
    pytest.param(connect_body(client_id=b"\xed\xa0\x80"), "client id is not valid UTF-8", id="client-id-surrogate"),
    pytest.param(connect_body(client_id=b"tab\x001"), "client id contains U+0000", id="client-id-nul"),
    pytest.param(connect_body(0x06), "will topic missing", id="will-flag-without-will"),
    pytest.param(connect_body(0x06, will=(b"\xff", b"m")), "will topic is not valid UTF-8", id="will-topic-utf8"),
    pytest.param(connect_body(0x06) + mqtt_bytes(b"t"), "will message missing", id="will-message-missing"),
    pytest.param(connect_body(0x82), "username missing", id="username-flag-without-username"),
    pytest.param(connect_body(0x82, username=b"al\xffice"), "username is not valid UTF-8", id="username-utf8"),
    pytest.param(connect_body(0x82, username=b"al\x00ice"), "username contains U+0000", id="username-nul"),
    pytest.param(connect_body(0xC2, username=b"alice"), "password missing", id="password-flag-without-password"),
    pytest.param(connect_body(0xC2, username=b"alice") + b"\x00\x05to", "password runs past the end of the packet",
                 id="password-cut"),
    pytest.param(connect_body() + b"\x00", "CONNECT carries extra bytes", id="extra-byte-after-client-id"),
    pytest.param(connect_body(0x02, username=b"alice"), "CONNECT carries extra bytes",
                 id="username-without-username-flag"),
    pytest.param(connect_body(0x82, username=b"alice", password=b"tok"), "CONNECT carries extra bytes",
                 id="password-without-password-flag"),
    pytest.param(connect_body(0xC2, username=b"a", password=b"p") + b"xy", "CONNECT carries extra bytes",
                 id="extra-bytes-after-password"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED_CONNECTS)
def test_decode_connect_refuses_malformed_packets(body: bytes, reason: str) -> None:
    assert violation(lambda: codec.decode_connect(0, body)) == reason


# ================================================================== SUBSCRIBE (3.8)


def test_decode_subscribe_reads_the_packet_id_and_each_filter_with_its_qos() -> None:
    body = pid(0x1234) + mqtt_bytes(b"users/endpoints/tab-1") + b"\x00" + mqtt_bytes(b"a/+/#") + b"\x01" \
        + mqtt_bytes(b"b") + b"\x02"
    assert codec.decode_subscribe(2, body) == Subscribe(0x1234, (("users/endpoints/tab-1", 0), ("a/+/#", 1), ("b", 2)))


def test_decode_subscribe_reads_the_highest_packet_id() -> None:
    assert codec.decode_subscribe(2, pid(65535) + mqtt_bytes(b"t") + b"\x01") == Subscribe(65535, (("t", 1),))


MALFORMED_SUBSCRIBES = [
    pytest.param(pid(1) + mqtt_bytes(b"t") + b"\x03", "SUBSCRIBE with requested QoS byte 3", id="qos-3"),
    pytest.param(pid(1) + mqtt_bytes(b"t") + b"\x04", "SUBSCRIBE with requested QoS byte 4", id="reserved-bit-2"),
    pytest.param(pid(1) + mqtt_bytes(b"t") + b"\x81", "SUBSCRIBE with requested QoS byte 129", id="reserved-bit-7"),
    pytest.param(pid(1) + mqtt_bytes(b"t") + b"\xfc", "SUBSCRIBE with requested QoS byte 252", id="all-reserved"),
    pytest.param(pid(1) + mqtt_bytes(b"t") + b"\x01" + mqtt_bytes(b"u") + b"\x03",
                 "SUBSCRIBE with requested QoS byte 3", id="second-filter-qos-3"),
    pytest.param(pid(1), "SUBSCRIBE without topics", id="no-topics"),
    pytest.param(pid(0) + mqtt_bytes(b"t") + b"\x01", "packet id 0", id="packet-id-0"),
    pytest.param(b"", "packet id missing", id="empty-body"),
    pytest.param(b"\x00", "packet id missing", id="packet-id-cut"),
    pytest.param(pid(1) + mqtt_bytes(b"t"), "requested QoS missing", id="qos-missing"),
    pytest.param(pid(1) + b"\x00", "topic filter missing", id="filter-length-cut"),
    pytest.param(pid(1) + b"\x00\x05ab", "topic filter runs past the end of the packet", id="filter-cut"),
    pytest.param(pid(1) + mqtt_bytes(b"a/\xff") + b"\x01", "topic filter is not valid UTF-8", id="filter-utf8"),
    pytest.param(pid(1) + mqtt_bytes(b"a/\x00") + b"\x01", "topic filter contains U+0000", id="filter-nul"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED_SUBSCRIBES)
def test_decode_subscribe_refuses_malformed_packets(body: bytes, reason: str) -> None:
    assert violation(lambda: codec.decode_subscribe(2, body)) == reason


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x3, 0x6, 0xA, 0xF])
def test_decode_subscribe_requires_fixed_header_flags_0010(flags: int) -> None:
    body = pid(1) + mqtt_bytes(b"t") + b"\x01"
    assert violation(lambda: codec.decode_subscribe(flags, body)) == f"packet type 8 with flags {flags:04b}"


# ================================================================== UNSUBSCRIBE (3.10)


def test_decode_unsubscribe_reads_the_packet_id_and_every_filter() -> None:
    body = pid(9) + mqtt_bytes(b"users/endpoints/tab-1") + mqtt_bytes(b"a/#")
    assert codec.decode_unsubscribe(2, body) == Unsubscribe(9, ("users/endpoints/tab-1", "a/#"))


MALFORMED_UNSUBSCRIBES = [
    pytest.param(pid(1), "UNSUBSCRIBE without topics", id="no-topics"),
    pytest.param(pid(0) + mqtt_bytes(b"t"), "packet id 0", id="packet-id-0"),
    pytest.param(b"", "packet id missing", id="empty-body"),
    pytest.param(pid(1) + b"\x00", "topic filter missing", id="filter-length-cut"),
    pytest.param(pid(1) + b"\x00\x03a", "topic filter runs past the end of the packet", id="filter-cut"),
    pytest.param(pid(1) + mqtt_bytes(b"\xfe"), "topic filter is not valid UTF-8", id="filter-utf8"),
    pytest.param(pid(1) + mqtt_bytes(b"a\x00"), "topic filter contains U+0000", id="filter-nul"),
]


@pytest.mark.parametrize(("body", "reason"), MALFORMED_UNSUBSCRIBES)
def test_decode_unsubscribe_refuses_malformed_packets(body: bytes, reason: str) -> None:
    assert violation(lambda: codec.decode_unsubscribe(2, body)) == reason


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x3, 0xA])
def test_decode_unsubscribe_requires_fixed_header_flags_0010(flags: int) -> None:
    body = pid(1) + mqtt_bytes(b"t")
    assert violation(lambda: codec.decode_unsubscribe(flags, body)) == f"packet type 10 with flags {flags:04b}"


# ================================================================== PUBLISH (3.3)


@pytest.mark.parametrize(("flags", "body", "expected"), [
    pytest.param(0x0, mqtt_bytes(b"a/b") + b"hi", Publish("a/b", b"hi", 0, False, False, None), id="qos-0"),
    pytest.param(0x1, mqtt_bytes(b"a/b") + b"hi", Publish("a/b", b"hi", 0, True, False, None), id="qos-0-retain"),
    pytest.param(0x2, mqtt_bytes(b"a/b") + pid(0x0102) + b"hi", Publish("a/b", b"hi", 1, False, False, 0x0102),
                 id="qos-1"),
    pytest.param(0x4, mqtt_bytes(b"a/b") + pid(65535) + b"hi", Publish("a/b", b"hi", 2, False, False, 65535),
                 id="qos-2"),
    pytest.param(0xA, mqtt_bytes(b"a/b") + pid(7) + b"", Publish("a/b", b"", 1, False, True, 7), id="qos-1-dup"),
    pytest.param(0xD, mqtt_bytes(b"a/b") + pid(7) + b"x", Publish("a/b", b"x", 2, True, True, 7),
                 id="qos-2-dup-retain"),
    pytest.param(0x0, mqtt_bytes(b"a") + b"\x00\xff\xfe", Publish("a", b"\x00\xff\xfe", 0, False, False, None),
                 id="binary-payload"),
    pytest.param(0x0, mqtt_bytes("\u00e4/\u4e8b".encode()), Publish("\u00e4/\u4e8b", b"", 0, False, False, None),
                 id="non-ascii-topic-empty-payload"),
])
def test_decode_publish_reads_topic_qos_flags_packet_id_and_payload(flags: int, body: bytes, expected: Publish) -> None:
    assert codec.decode_publish(flags, body) == expected


MALFORMED_PUBLISHES = [
    pytest.param(0x6, mqtt_bytes(b"a") + pid(1), "PUBLISH with QoS 3", id="qos-3"),
    pytest.param(0x7, mqtt_bytes(b"a") + pid(1), "PUBLISH with QoS 3", id="qos-3-retain"),
    pytest.param(0xE, mqtt_bytes(b"a") + pid(1), "PUBLISH with QoS 3", id="qos-3-dup"),
    pytest.param(0x8, mqtt_bytes(b"a"), "PUBLISH with DUP at QoS 0", id="dup-at-qos-0"),
    pytest.param(0x9, mqtt_bytes(b"a"), "PUBLISH with DUP at QoS 0", id="dup-at-qos-0-retain"),
    pytest.param(0x0, mqtt_bytes(b""), "PUBLISH topic must be a non-empty name without wildcards", id="empty-topic"),
    pytest.param(0x0, mqtt_bytes(b"a/+"), "PUBLISH topic must be a non-empty name without wildcards", id="plus"),
    pytest.param(0x0, mqtt_bytes(b"a/#"), "PUBLISH topic must be a non-empty name without wildcards", id="hash"),
    pytest.param(0x2, mqtt_bytes(b"#") + pid(1), "PUBLISH topic must be a non-empty name without wildcards",
                 id="hash-qos-1"),
    pytest.param(0x2, mqtt_bytes(b"a") + pid(0), "packet id 0", id="packet-id-0-qos-1"),
    pytest.param(0x4, mqtt_bytes(b"a") + pid(0) + b"x", "packet id 0", id="packet-id-0-qos-2"),
    pytest.param(0x2, mqtt_bytes(b"a"), "packet id missing", id="packet-id-missing"),
    pytest.param(0x2, mqtt_bytes(b"a") + b"\x01", "packet id missing", id="packet-id-cut"),
    pytest.param(0x0, b"", "topic name missing", id="empty-body"),
    pytest.param(0x0, b"\x00\x09a/b", "topic name runs past the end of the packet", id="topic-cut"),
    pytest.param(0x0, mqtt_bytes(b"a/\xff") + b"x", "topic name is not valid UTF-8", id="topic-utf8"),
    pytest.param(0x0, mqtt_bytes(b"a/\x00") + b"x", "topic name contains U+0000", id="topic-nul"),
]


@pytest.mark.parametrize(("flags", "body", "reason"), MALFORMED_PUBLISHES)
def test_decode_publish_refuses_malformed_packets(flags: int, body: bytes, reason: str) -> None:
    assert violation(lambda: codec.decode_publish(flags, body)) == reason


# ================================================================== PUBACK, PUBREC, PUBREL, PUBCOMP

PACKET_ID_ONLY = [(codec.PUBACK, 0x0), (codec.PUBREC, 0x0), (codec.PUBREL, 0x2), (codec.PUBCOMP, 0x0)]


@pytest.mark.parametrize(("packet_type", "flags"), PACKET_ID_ONLY)
def test_decode_packet_id_only_reads_a_big_endian_packet_id(packet_type: int, flags: int) -> None:
    assert codec.decode_packet_id_only(packet_type, flags, b"\x12\x34") == 0x1234
    assert codec.decode_packet_id_only(packet_type, flags, b"\xff\xff") == 65535


@pytest.mark.parametrize(("packet_type", "flags"), PACKET_ID_ONLY)
@pytest.mark.parametrize("body", [b"", b"\x01", b"\x00\x01\x00", b"\x00\x01\x00\x00"])
def test_decode_packet_id_only_requires_exactly_two_bytes(packet_type: int, flags: int, body: bytes) -> None:
    reason = violation(lambda: codec.decode_packet_id_only(packet_type, flags, body))
    assert reason == f"packet type {packet_type} must carry exactly a packet id"


@pytest.mark.parametrize(("packet_type", "flags"), PACKET_ID_ONLY)
def test_decode_packet_id_only_refuses_packet_id_0(packet_type: int, flags: int) -> None:
    assert violation(lambda: codec.decode_packet_id_only(packet_type, flags, b"\x00\x00")) == "packet id 0"


@pytest.mark.parametrize("flags", [0x0, 0x1, 0x3, 0x4, 0x6, 0xA, 0xF])
def test_decode_pubrel_requires_flags_0010(flags: int) -> None:
    reason = violation(lambda: codec.decode_packet_id_only(codec.PUBREL, flags, b"\x00\x01"))
    assert reason == f"packet type 6 with flags {flags:04b}"


@pytest.mark.parametrize("packet_type", [codec.PUBACK, codec.PUBREC, codec.PUBCOMP])
@pytest.mark.parametrize("flags", [0x1, 0x2, 0x8])
def test_decode_puback_pubrec_pubcomp_require_flags_0000(packet_type: int, flags: int) -> None:
    reason = violation(lambda: codec.decode_packet_id_only(packet_type, flags, b"\x00\x01"))
    assert reason == f"packet type {packet_type} with flags {flags:04b}"


# ================================================================== PINGREQ, DISCONNECT


@pytest.mark.parametrize("packet_type", [codec.PINGREQ, codec.DISCONNECT])
def test_decode_empty_accepts_no_body(packet_type: int) -> None:
    codec.decode_empty(packet_type, 0, b"")  # raises ProtocolViolation if it refuses


@pytest.mark.parametrize("packet_type", [codec.PINGREQ, codec.DISCONNECT])
@pytest.mark.parametrize("body", [b"\x00", b"\x00\x00", b"extra"])
def test_decode_empty_refuses_extra_bytes(packet_type: int, body: bytes) -> None:
    reason = violation(lambda: codec.decode_empty(packet_type, 0, body))
    assert reason == f"packet type {packet_type} carries {len(body)} unexpected bytes"


@pytest.mark.parametrize("packet_type", [codec.PINGREQ, codec.DISCONNECT])
@pytest.mark.parametrize("flags", [0x1, 0x2, 0xF])
def test_decode_empty_requires_flags_0000(packet_type: int, flags: int) -> None:
    reason = violation(lambda: codec.decode_empty(packet_type, flags, b""))
    assert reason == f"packet type {packet_type} with flags {flags:04b}"


# ================================================================== encoders, against amqtt's packet classes


@pytest.mark.parametrize("session_present", [False, True])
@pytest.mark.parametrize("return_code", [0, 1, 2, 3, 4, 5])
def test_encode_connack_matches_amqtt(session_present: bool, return_code: int) -> None:
    expected = bytes((0x20, 0x02, int(session_present), return_code))
    assert codec.encode_connack(session_present, return_code) == expected
    assert ConnackPacket.build(int(session_present), return_code).to_bytes() == expected


@pytest.mark.parametrize(("packet_id", "return_codes"), [
    (1, [0]),
    (2, [1]),
    (3, [2]),
    (0x1234, [codec.SUBACK_FAILURE]),
    (65535, [0, 1, codec.SUBACK_FAILURE, 2]),
    (7, [1] * 200),  # remaining length 202: two length bytes
])
def test_encode_suback_matches_amqtt(packet_id: int, return_codes: list[int]) -> None:
    encoded = codec.encode_suback(packet_id, return_codes)
    assert encoded == SubackPacket.build(packet_id, return_codes).to_bytes()
    if len(return_codes) == 1:
        assert encoded == b"\x90\x03" + pid(packet_id) + bytes(return_codes)


@pytest.mark.parametrize(("packet_type", "amqtt_class", "first_byte"), [
    (codec.PUBACK, PubackPacket, 0x40),
    (codec.PUBREC, PubrecPacket, 0x50),
    (codec.PUBCOMP, PubcompPacket, 0x70),
    (codec.UNSUBACK, UnsubackPacket, 0xB0),
])
@pytest.mark.parametrize("packet_id", [1, 0x1234, 65535])
def test_encode_ack_matches_amqtt(packet_type: int, amqtt_class: Any, first_byte: int, packet_id: int) -> None:
    encoded = codec.encode_ack(packet_type, packet_id)
    assert encoded == bytes((first_byte, 0x02)) + pid(packet_id)
    assert encoded == amqtt_class.build(packet_id).to_bytes()


def test_pingresp_bytes_match_amqtt() -> None:
    assert codec.PINGRESP_BYTES == b"\xd0\x00"
    assert PingRespPacket.build().to_bytes() == codec.PINGRESP_BYTES


@pytest.mark.parametrize(("topic", "payload", "qos", "packet_id", "dup"), [
    ("users/endpoints/tab-1", b'{"type":"x"}', 0, None, False),
    ("users/endpoints/tab-1", b'{"type":"x"}', 1, 1, False),
    ("users/endpoints/tab-1", b'{"type":"x"}', 1, 65535, True),
    ("user/u/\u00e4\u4e8b", b"", 1, 42, False),  # non-ASCII topic: its UTF-8 length is what counts
    ("t", bytes(range(256)) * 8, 0, None, False),  # 2-byte remaining length
    ("t", b"x" * 20000, 1, 9, False),  # 3-byte remaining length
])
def test_encode_publish_matches_amqtt(topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> None:
    expected = PublishPacket.build(topic, payload, packet_id, dup, qos, False).to_bytes()
    assert codec.encode_publish(topic, payload, qos, packet_id, dup) == expected


def test_encode_publish_writes_the_exact_bytes_of_a_dup_qos_1_publish() -> None:
    assert codec.encode_publish("a/b", b"hi", 1, 0x0102, True) == b"\x3a\x09\x00\x03a/b\x01\x02hi"
    assert codec.encode_publish("a/b", b"hi", 0, None, False) == b"\x30\x07\x00\x03a/bhi"


def test_encode_publish_output_decodes_back_to_the_same_message() -> None:
    encoded = codec.encode_publish("a/\u00e4", b"\x00payload", 1, 300, True)
    frame = codec.read_frame(encoded, 0, 1000)
    assert frame == Frame(codec.PUBLISH, 0xA, 2, len(encoded))
    decoded = codec.decode_publish(frame.flags, encoded[frame.body_start:frame.body_end])
    assert decoded == Publish("a/\u00e4", b"\x00payload", 1, False, True, 300)
