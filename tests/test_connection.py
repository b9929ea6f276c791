"""MqttConnection driven in memory: bytes and a float clock in; events, bytes and a deadline out.

No sockets, no event loop: every packet is written out byte by byte here, and every answer is
compared byte for byte. Section numbers are MQTT 3.1.1's.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from broker_plugin import codec
from broker_plugin.connection import (
    Closed,
    ConnectionLimits,
    ConnectRequest,
    Event,
    MqttConnection,
    MqttCounters,
    Phase,
    PingReceived,
    PubackReceived,
    PublishReceived,
    QosTwoAckReceived,
    SubscribeRequest,
    UnsubscribeRequest,
)
from endpoint_core.endpoint import DisconnectReason
from tests.packets import mqtt_bytes, packet, pid, varint

START = 1000.0  # the clock when the socket opened
LIMITS = ConnectionLimits()
VIOLATION = DisconnectReason.PROTOCOL_VIOLATION

# ------------------------------------------------------------------ packet builders (independent of the codec)










def connect_packet(
    flags: int = 0xC2,
    *,
    client_id: bytes = b"tab-1",
    keep_alive: int = 60,
    username: bytes | None = b"alice",
    password: bytes | None = b"token",
    will: tuple[bytes, bytes] | None = None,
    name: bytes = b"MQTT",
    level: int = 4,
    first_byte: int = 0x10,
) -> bytes:
    """A CONNECT; `flags` is written as given (default: username, password, clean session)."""
    body = mqtt_bytes(name) + bytes((level, flags)) + pid(keep_alive) + mqtt_bytes(client_id)
    if will is not None:
        body += mqtt_bytes(will[0]) + mqtt_bytes(will[1])
    if username is not None:
        body += mqtt_bytes(username)
    if password is not None:
        body += mqtt_bytes(password)
    return packet(first_byte, body)


def subscribe_packet(packet_id: int, *topics: tuple[bytes, int]) -> bytes:
    return packet(0x82, pid(packet_id) + b"".join(mqtt_bytes(topic) + bytes((qos,)) for topic, qos in topics))


def unsubscribe_packet(packet_id: int, *topics: bytes) -> bytes:
    return packet(0xA2, pid(packet_id) + b"".join(mqtt_bytes(topic) for topic in topics))


def publish_packet(topic: bytes, payload: bytes, *, qos: int = 0, packet_id: int | None = None,
                   flags: int = 0) -> bytes:
    body = mqtt_bytes(topic) + (pid(packet_id) if packet_id is not None else b"") + payload
    return packet(0x30 | (qos << 1) | flags, body)


PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"
DISCONNECT = b"\xe0\x00"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + pid(packet_id)


def pubrec(packet_id: int) -> bytes:
    return b"\x50\x02" + pid(packet_id)


def pubrel(packet_id: int) -> bytes:
    return b"\x62\x02" + pid(packet_id)


def pubcomp(packet_id: int) -> bytes:
    return b"\x70\x02" + pid(packet_id)


# ------------------------------------------------------------------ driving helpers


def drain(connection: MqttConnection) -> list[Event]:
    """Every event the connection has for now."""
    events = []
    while (event := connection.next_event()) is not None:
        events.append(event)
    return events


def connected(limits: ConnectionLimits = LIMITS, expires_at: float | None = None) -> MqttConnection:
    """A connection whose CONNECT was accepted, with its CONNACK already drained."""
    connection = MqttConnection(limits, START)
    connection.receive_data(connect_packet())
    assert drain(connection) == [ConnectRequest("tab-1", "alice", "token", 60, True)]
    connection.accept(False, expires_at)
    assert connection.data_to_send() == CONNACK_ACCEPTED
    return connection


def assert_over(connection: MqttConnection) -> None:
    """A closed connection takes no more input and says nothing more."""
    received = connection.bytes_received
    connection.receive_data(PINGREQ + subscribe_packet(1, (b"t", 0)))
    assert connection.bytes_received == received
    assert drain(connection) == []
    assert connection.data_to_send() == b""
    assert connection.closed
    assert connection.phase is Phase.CLOSED
    assert connection.next_deadline() is None
    assert connection.handle_timeout(START + 1e9) is None
    assert connection.close(DisconnectReason.SHUTDOWN) is None
    assert connection.send_publish("t", b"x", 0, None, False) is False


# ================================================================== CONNECT


def test_connect_gives_a_connect_request_with_the_fields_of_the_packet() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet(0xC0, client_id=b"tab-9", keep_alive=30, password=b"a.b.c"))
    assert drain(connection) == [ConnectRequest("tab-9", "alice", "a.b.c", 30, False)]
    assert connection.phase is Phase.DECIDING_CONNECT
    assert connection.data_to_send() == b""


def test_connect_without_credentials_gives_none_for_username_and_password() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet(0x02, username=None, password=None, keep_alive=0))
    assert drain(connection) == [ConnectRequest("tab-1", None, None, 0, True)]


def test_connect_with_a_will_is_accepted_and_the_will_ignored() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet(0xEE, will=(b"last/will", b"bye")))  # will QoS 1, retained
    assert drain(connection) == [ConnectRequest("tab-1", "alice", "token", 60, True)]


def test_no_event_comes_while_a_connect_awaits_a_decision() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet() + PINGREQ)
    assert connection.next_event() == ConnectRequest("tab-1", "alice", "token", 60, True)
    assert connection.next_event() is None
    connection.receive_data(subscribe_packet(3, (b"t", 1)))
    assert connection.next_event() is None
    assert connection.data_to_send() == b""
    connection.accept(False, None)
    assert drain(connection) == [PingReceived(), SubscribeRequest(3, (("t", 1),))]
    assert connection.data_to_send() == CONNACK_ACCEPTED + PINGRESP


@pytest.mark.parametrize(("session_present", "connack"), [(False, b"\x20\x02\x00\x00"), (True, b"\x20\x02\x01\x00")])
def test_accept_writes_connack_0_with_the_session_present_flag(session_present: bool, connack: bytes) -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet())
    drain(connection)
    connection.accept(session_present, None)
    assert connection.phase is Phase.CONNECTED
    assert connection.data_to_send() == connack
    assert not connection.closed


@pytest.mark.parametrize("return_code", [1, 2, 3, 4, 5])
def test_refuse_writes_the_connack_code_then_closes(return_code: int) -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet() + subscribe_packet(1, (b"t", 0)))
    drain(connection)
    connection.refuse(return_code, "why")
    assert connection.closed
    assert connection.next_event() == Closed(DisconnectReason.CONNECT_REFUSED, "why")
    assert connection.data_to_send() == bytes((0x20, 0x02, 0x00, return_code))  # session present is 0 (3.2.2.2)
    assert_over(connection)


@pytest.mark.parametrize(("name", "level"), [(b"MQTT", 5), (b"MQIsdp", 3), (b"MQTT", 3), (b"MQTT", 6)])
def test_connect_of_another_mqtt_version_is_answered_connack_1_by_the_connection(name: bytes, level: int) -> None:
    connection = MqttConnection(LIMITS, START)
    # An MQTT 5 CONNECT has properties after the keep-alive: never read.
    body = mqtt_bytes(name) + bytes((level, 0x02)) + pid(60) + b"\x00" + mqtt_bytes(b"tab-1")
    connection.receive_data(packet(0x10, body) + PINGREQ)
    assert drain(connection) == [
        Closed(DisconnectReason.CONNECT_REFUSED, f"protocol level {level}; only MQTT 3.1.1 is served"),
    ]
    assert connection.data_to_send() == b"\x20\x02\x00\x01"
    assert_over(connection)


def test_accept_and_refuse_need_a_connect_waiting_for_a_decision() -> None:
    connection = MqttConnection(LIMITS, START)
    with pytest.raises(RuntimeError):
        connection.accept(False, None)
    with pytest.raises(RuntimeError):
        connection.refuse(5)
    connection = connected()
    with pytest.raises(RuntimeError):
        connection.accept(False, None)
    with pytest.raises(RuntimeError):
        connection.refuse(5)
    assert connection.data_to_send() == b""


def test_a_second_connect_is_a_protocol_violation() -> None:
    connection = connected()
    connection.receive_data(connect_packet() + PINGREQ)
    assert drain(connection) == [Closed(VIOLATION, "a second CONNECT")]
    assert connection.data_to_send() == b""
    assert_over(connection)


@pytest.mark.parametrize("first_bytes", [
    pytest.param(PINGREQ, id="pingreq"),
    pytest.param(b"\xc0", id="one-byte-of-pingreq"),
    pytest.param(subscribe_packet(1, (b"t", 0)), id="subscribe"),
    pytest.param(publish_packet(b"t", b"x"), id="publish"),
    pytest.param(DISCONNECT, id="disconnect"),
    pytest.param(CONNACK_ACCEPTED, id="connack"),
    pytest.param(b"\x00\x00", id="reserved-type-0"),
    pytest.param(b"GET / HTTP/1.1\r\n", id="http"),
])
def test_a_first_packet_other_than_connect_is_a_protocol_violation(first_bytes: bytes) -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(first_bytes)
    assert drain(connection) == [Closed(VIOLATION, "the first packet must be CONNECT")]
    assert connection.data_to_send() == b""
    assert_over(connection)


MALFORMED_CONNECTS = [
    pytest.param(connect_packet(0xDE, will=(b"w", b"m")), "will QoS 3", id="will-qos-3"),
    pytest.param(connect_packet(0xCA), "will QoS or retain set without the will flag", id="will-qos-without-flag"),
    pytest.param(connect_packet(0xE2), "will QoS or retain set without the will flag", id="will-retain-without-flag"),
    pytest.param(connect_packet(0xC3), "CONNECT reserved flag set", id="reserved-flag"),
    pytest.param(connect_packet(first_byte=0x12), "packet type 1 with flags 0010", id="fixed-header-flags"),
    pytest.param(connect_packet(client_id=b"\xff\xfe"), "client id is not valid UTF-8", id="client-id-utf8"),
    pytest.param(connect_packet(client_id=b"tab\x00"), "client id contains U+0000", id="client-id-nul"),
    pytest.param(connect_packet(username=b"\xc3"), "username is not valid UTF-8", id="username-utf8"),
    pytest.param(connect_packet(username=b"a\x00"), "username contains U+0000", id="username-nul"),
    pytest.param(connect_packet(name=b"HTTP"), "not an MQTT CONNECT", id="protocol-name"),
    pytest.param(connect_packet(0x82), "CONNECT carries extra bytes", id="password-without-flag"),
    pytest.param(connect_packet(password=None), "password missing", id="password-flag-without-password"),
]


@pytest.mark.parametrize(("data", "detail"), MALFORMED_CONNECTS)
def test_a_malformed_connect_closes_without_connack(data: bytes, detail: str) -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(data + PINGREQ)
    assert drain(connection) == [Closed(VIOLATION, detail)]
    assert connection.data_to_send() == b""
    assert_over(connection)


# ================================================================== packets after CONNECT


def test_subscribe_gives_a_subscribe_request_answered_by_send_suback() -> None:
    connection = connected()
    connection.receive_data(subscribe_packet(7, (b"users/endpoints/tab-1", 1), (b"x/#", 0), (b"y", 2)))
    assert drain(connection) == [SubscribeRequest(7, (("users/endpoints/tab-1", 1), ("x/#", 0), ("y", 2)))]
    assert connection.data_to_send() == b""  # the caller decides the return codes
    connection.send_suback(7, [1, 0x80, 1])
    assert connection.data_to_send() == b"\x90\x05\x00\x07\x01\x80\x01"


@pytest.mark.parametrize("return_code", [0x00, 0x01, 0x02, 0x80])
def test_send_suback_writes_each_return_code(return_code: int) -> None:
    connection = connected()
    connection.send_suback(0x1234, [return_code])
    assert connection.data_to_send() == bytes((0x90, 0x03, 0x12, 0x34, return_code))


def test_send_suback_writes_nothing_unless_connected() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.send_suback(1, [0])
    assert connection.data_to_send() == b""
    connection = connected()
    connection.close(DisconnectReason.SHUTDOWN)
    connection.send_suback(1, [0])
    assert connection.data_to_send() == b""


def test_unsubscribe_is_answered_with_unsuback_automatically() -> None:
    connection = connected()
    connection.receive_data(unsubscribe_packet(0x0109, b"a", b"b/#"))
    assert drain(connection) == [UnsubscribeRequest(("a", "b/#"))]
    assert connection.data_to_send() == b"\xb0\x02\x01\x09"


def test_pingreq_is_answered_with_pingresp() -> None:
    connection = connected()
    connection.receive_data(PINGREQ)
    assert drain(connection) == [PingReceived()]
    assert connection.data_to_send() == PINGRESP


def test_pingreqs_read_in_place_are_each_answered_and_counted() -> None:
    counters = MqttCounters()
    connection = MqttConnection(LIMITS, START, counters)
    connection.receive_data(connect_packet())
    drain(connection)
    connection.accept(False, None)
    connection.data_to_send()

    connection.receive_data(PINGREQ * 3 + b"\xc0")  # and the first byte of a fourth

    assert drain(connection) == [PingReceived()] * 3
    assert connection.data_to_send() == PINGRESP * 3
    assert (counters.packets_in[codec.PINGREQ], counters.packets_out[codec.PINGRESP]) == (3, 3)
    connection.receive_data(b"\x00")
    assert drain(connection) == [PingReceived()]


@pytest.mark.parametrize(("data", "event", "answer"), [
    pytest.param(publish_packet(b"a/b", b"hi"), PublishReceived("a/b", b"hi", 0, False), b"", id="qos-0"),
    pytest.param(publish_packet(b"a/b", b"hi", flags=0x1), PublishReceived("a/b", b"hi", 0, True), b"",
                 id="qos-0-retain"),
    pytest.param(publish_packet(b"a/b", b"hi", qos=1, packet_id=0x0102), PublishReceived("a/b", b"hi", 1, False),
                 puback(0x0102), id="qos-1-puback"),
    pytest.param(publish_packet(b"a/b", b"", qos=1, packet_id=9, flags=0x8), PublishReceived("a/b", b"", 1, False),
                 puback(9), id="qos-1-dup-puback"),
    pytest.param(publish_packet(b"a/b", b"hi", qos=2, packet_id=0xFFFF), PublishReceived("a/b", b"hi", 2, False),
                 pubrec(0xFFFF), id="qos-2-pubrec"),
])
def test_client_publish_gives_an_event_and_is_acknowledged(data: bytes, event: PublishReceived, answer: bytes) -> None:
    connection = connected()
    connection.receive_data(data)
    assert drain(connection) == [event]
    assert connection.data_to_send() == answer


def test_pubrel_is_answered_with_pubcomp() -> None:
    connection = connected()
    connection.receive_data(pubrel(0x0A0B))
    assert drain(connection) == [QosTwoAckReceived(6)]
    assert connection.data_to_send() == pubcomp(0x0A0B)


def test_pubrec_and_pubcomp_give_an_event_and_no_answer() -> None:
    connection = connected()
    connection.receive_data(pubrec(5) + pubcomp(5))
    assert drain(connection) == [QosTwoAckReceived(5), QosTwoAckReceived(7)]
    assert connection.data_to_send() == b""


def test_puback_gives_puback_received_with_its_packet_id() -> None:
    connection = connected()
    connection.receive_data(puback(300) + puback(65535))
    assert drain(connection) == [PubackReceived(300), PubackReceived(65535)]
    assert connection.data_to_send() == b""


def test_disconnect_closes_cleanly_and_ignores_what_follows() -> None:
    connection = connected()
    connection.receive_data(DISCONNECT + PINGREQ)
    assert drain(connection) == [Closed(DisconnectReason.CLEAN, "")]
    assert connection.data_to_send() == b""
    assert_over(connection)


# Every strictness rule of MQTT 3.1.1 that closes the connection (issue 8, defect 6), once connected.
VIOLATIONS_AFTER_CONNECT = [
    pytest.param(subscribe_packet(1, (b"t", 3)), "SUBSCRIBE with requested QoS byte 3", id="subscribe-qos-3"),
    pytest.param(subscribe_packet(1, (b"t", 0x41)), "SUBSCRIBE with requested QoS byte 65", id="subscribe-reserved"),
    pytest.param(subscribe_packet(1), "SUBSCRIBE without topics", id="subscribe-no-topics"),
    pytest.param(subscribe_packet(0, (b"t", 0)), "packet id 0", id="subscribe-packet-id-0"),
    pytest.param(packet(0x80, pid(1) + mqtt_bytes(b"t") + b"\x00"), "packet type 8 with flags 0000",
                 id="subscribe-flags"),
    pytest.param(subscribe_packet(1, (b"t/\xff", 0)), "topic filter is not valid UTF-8", id="subscribe-utf8"),
    pytest.param(unsubscribe_packet(1), "UNSUBSCRIBE without topics", id="unsubscribe-no-topics"),
    pytest.param(unsubscribe_packet(0, b"t"), "packet id 0", id="unsubscribe-packet-id-0"),
    pytest.param(packet(0xA0, pid(1) + mqtt_bytes(b"t")), "packet type 10 with flags 0000", id="unsubscribe-flags"),
    pytest.param(publish_packet(b"t", b"x", qos=1, packet_id=0), "packet id 0", id="publish-packet-id-0"),
    pytest.param(publish_packet(b"t", b"x", qos=3, packet_id=1), "PUBLISH with QoS 3", id="publish-qos-3"),
    pytest.param(publish_packet(b"t", b"x", flags=0x8), "PUBLISH with DUP at QoS 0", id="publish-dup-qos-0"),
    pytest.param(publish_packet(b"t/+", b"x"), "PUBLISH topic must be a non-empty name without wildcards",
                 id="publish-wildcard"),
    pytest.param(publish_packet(b"", b"x"), "PUBLISH topic must be a non-empty name without wildcards",
                 id="publish-empty-topic"),
    pytest.param(publish_packet(b"t/\xfe", b"x"), "topic name is not valid UTF-8", id="publish-topic-utf8"),
    pytest.param(publish_packet(b"t/\x00", b"x"), "topic name contains U+0000", id="publish-topic-nul"),
    pytest.param(b"\x40\x02\x00\x00", "packet id 0", id="puback-packet-id-0"),
    pytest.param(b"\x40\x03\x00\x01\x00", "packet type 4 must carry exactly a packet id", id="puback-extra-byte"),
    pytest.param(b"\x41\x02\x00\x01", "packet type 4 with flags 0001", id="puback-flags"),
    pytest.param(b"\x50\x01\x01", "packet type 5 must carry exactly a packet id", id="pubrec-short"),
    pytest.param(b"\x60\x02\x00\x01", "packet type 6 with flags 0000", id="pubrel-flags-0000"),
    pytest.param(b"\x63\x02\x00\x01", "packet type 6 with flags 0011", id="pubrel-flags-0011"),
    pytest.param(b"\x62\x02\x00\x00", "packet id 0", id="pubrel-packet-id-0"),
    pytest.param(b"\x70\x04\x00\x01\x00\x02", "packet type 7 must carry exactly a packet id", id="pubcomp-extra"),
    pytest.param(b"\xc0\x01\x00", "packet type 12 carries 1 unexpected bytes", id="pingreq-extra-byte"),
    pytest.param(b"\xc1\x00", "packet type 12 with flags 0001", id="pingreq-flags"),
    pytest.param(b"\xe0\x02\x00\x00", "packet type 14 carries 2 unexpected bytes", id="disconnect-extra-bytes"),
    pytest.param(CONNACK_ACCEPTED, "packet type 2 is not sent by clients", id="connack-from-client"),
    pytest.param(b"\x90\x03\x00\x01\x00", "packet type 9 is not sent by clients", id="suback-from-client"),
    pytest.param(b"\xb0\x02\x00\x01", "packet type 11 is not sent by clients", id="unsuback-from-client"),
    pytest.param(PINGRESP, "packet type 13 is not sent by clients", id="pingresp-from-client"),
    pytest.param(b"\x00\x00", "packet type 0 is not sent by clients", id="reserved-type-0"),
    pytest.param(b"\xf0\x00", "packet type 15 is not sent by clients", id="reserved-type-15"),
    pytest.param(b"\x30\xff\xff\xff\xff\x01", "remaining length longer than 4 bytes", id="five-length-bytes"),
]


@pytest.mark.parametrize(("data", "detail"), VIOLATIONS_AFTER_CONNECT)
def test_a_strictness_violation_closes_the_connection_and_nothing_follows(data: bytes, detail: str) -> None:
    connection = connected()
    connection.receive_data(PINGREQ + data + PINGREQ)
    assert drain(connection) == [PingReceived(), Closed(VIOLATION, detail)]
    assert connection.data_to_send() == PINGRESP  # the PINGREQ before the violation only
    assert_over(connection)


# ================================================================== how bytes arrive

SESSION_FROM_CLIENT = (
    connect_packet()
    + subscribe_packet(1, (b"users/endpoints/tab-1", 1))
    + PINGREQ
    + publish_packet(b"a/b", b"payload", qos=1, packet_id=2)
    + puback(40)
    + publish_packet(b"a/b", b"two", qos=2, packet_id=3)
    + pubrel(3)
    + unsubscribe_packet(4, b"users/endpoints/tab-1")
    + DISCONNECT
)
SESSION_EVENTS: list[Event] = [
    ConnectRequest("tab-1", "alice", "token", 60, True),
    SubscribeRequest(1, (("users/endpoints/tab-1", 1),)),
    PingReceived(),
    PublishReceived("a/b", b"payload", 1, False),
    PubackReceived(40),
    PublishReceived("a/b", b"two", 2, False),
    QosTwoAckReceived(6),
    UnsubscribeRequest(("users/endpoints/tab-1",)),
    Closed(DisconnectReason.CLEAN, ""),
]
SESSION_TO_CLIENT = (CONNACK_ACCEPTED + b"\x90\x03\x00\x01\x01" + PINGRESP + puback(2) + pubrec(3) + pubcomp(3)
                     + b"\xb0\x02\x00\x04")


def run_session(chunks: Iterable[bytes]) -> tuple[list[Event], bytes]:
    """Feed the chunks as separate reads, answering as a driver would; all events and all bytes written."""
    connection = MqttConnection(LIMITS, START)
    events: list[Event] = []
    written = b""
    for chunk in chunks:
        connection.receive_data(chunk)
        while (event := connection.next_event()) is not None:
            events.append(event)
            if isinstance(event, ConnectRequest):
                connection.accept(False, None)
            elif isinstance(event, SubscribeRequest):
                connection.send_suback(event.packet_id, [qos for _, qos in event.topics])
        written += connection.data_to_send()
    assert connection.bytes_received == len(SESSION_FROM_CLIENT)
    assert connection.bytes_sent == len(written)
    return events, written


def test_several_packets_in_one_read_give_every_event_in_order() -> None:
    assert run_session([SESSION_FROM_CLIENT]) == (SESSION_EVENTS, SESSION_TO_CLIENT)


def test_packets_split_byte_by_byte_across_reads_give_the_same_events_and_bytes() -> None:
    one_byte_reads = [SESSION_FROM_CLIENT[i:i + 1] for i in range(len(SESSION_FROM_CLIENT))]
    assert run_session(one_byte_reads) == (SESSION_EVENTS, SESSION_TO_CLIENT)


def test_packets_split_in_odd_chunks_give_the_same_events_and_bytes() -> None:
    chunks = [SESSION_FROM_CLIENT[i:i + 7] for i in range(0, len(SESSION_FROM_CLIENT), 7)]
    assert run_session(chunks) == (SESSION_EVENTS, SESSION_TO_CLIENT)


def test_no_event_comes_before_the_last_byte_of_a_packet() -> None:
    connection = connected()
    data = publish_packet(b"a/b", b"x" * 200, qos=1, packet_id=1)  # two remaining-length bytes
    for byte in data[:-1]:
        connection.receive_data(bytes((byte,)))
        assert connection.next_event() is None
    connection.receive_data(data[-1:])
    assert drain(connection) == [PublishReceived("a/b", b"x" * 200, 1, False)]


# ================================================================== deadlines and the clock


def test_next_deadline_is_the_connect_timeout_after_the_socket_opened() -> None:
    connection = MqttConnection(ConnectionLimits(connect_timeout_seconds=5.0), START)
    assert connection.next_deadline() == START + 5.0


def test_connect_timeout_closes_at_the_deadline_not_before() -> None:
    connection = MqttConnection(ConnectionLimits(connect_timeout_seconds=5.0), START)
    connection.receive_data(connect_packet()[:10])  # part of a CONNECT changes nothing
    assert connection.handle_timeout(START) is None
    assert connection.handle_timeout(START + 4.999) is None
    assert not connection.closed
    assert connection.handle_timeout(START + 5.0) == Closed(DisconnectReason.CONNECT_TIMEOUT, "")
    assert connection.data_to_send() == b""
    assert_over(connection)


def test_connect_timeout_also_closes_when_called_late() -> None:
    connection = MqttConnection(ConnectionLimits(connect_timeout_seconds=5.0), START)
    assert connection.handle_timeout(START + 3600.0) == Closed(DisconnectReason.CONNECT_TIMEOUT, "")


def test_connect_deadline_passing_while_a_connect_awaits_a_decision_is_a_connect_timeout() -> None:
    connection = MqttConnection(ConnectionLimits(connect_timeout_seconds=5.0), START)
    connection.receive_data(connect_packet())
    assert drain(connection) == [ConnectRequest("tab-1", "alice", "token", 60, True)]
    assert connection.next_deadline() == START + 5.0
    assert connection.handle_timeout(START + 5.0) == Closed(DisconnectReason.CONNECT_TIMEOUT, "")


def test_accept_replaces_the_connect_deadline_with_the_token_expiry() -> None:
    connection = connected(ConnectionLimits(connect_timeout_seconds=5.0), expires_at=START + 3600.0)
    assert connection.next_deadline() == START + 3600.0
    assert connection.handle_timeout(START + 5.0) is None  # the connect timeout no longer applies
    assert connection.handle_timeout(START + 3599.5) is None
    assert not connection.closed
    assert connection.handle_timeout(START + 3600.0) == Closed(DisconnectReason.TOKEN_EXPIRED, "")
    assert_over(connection)


def test_accept_without_expiry_leaves_no_deadline() -> None:
    connection = connected(ConnectionLimits(connect_timeout_seconds=5.0), expires_at=None)
    assert connection.next_deadline() is None
    assert connection.handle_timeout(START + 1e9) is None
    assert not connection.closed


# ================================================================== size limits


def connect_of_size(total: int) -> bytes:
    """A CONNECT of exactly `total` bytes (under 128 body bytes), padded through the client id."""
    data = connect_packet(0x02, username=None, password=None, client_id=b"c" * (total - 14))
    assert len(data) == total
    return data


def test_a_connect_of_exactly_max_connect_bytes_is_accepted() -> None:
    connection = MqttConnection(ConnectionLimits(max_connect_bytes=100), START)
    connection.receive_data(connect_of_size(100))
    assert drain(connection) == [ConnectRequest("c" * 86, None, None, 60, True)]


def test_a_connect_body_over_max_connect_bytes_closes_as_soon_as_its_length_is_read() -> None:
    connection = MqttConnection(ConnectionLimits(max_connect_bytes=100), START)
    data = connect_of_size(103)  # a 2-byte fixed header and a 101-byte body
    connection.receive_data(data[:2])
    assert drain(connection) == [Closed(VIOLATION, "packet of 101 bytes exceeds the limit of 100")]
    assert connection.data_to_send() == b""
    assert_over(connection)


def test_a_connect_declaring_more_than_max_connect_bytes_closes_before_its_body_arrives() -> None:
    connection = MqttConnection(ConnectionLimits(max_connect_bytes=100, max_packet_bytes=1000), START)
    connection.receive_data(b"\x10" + varint(101))  # max_packet_bytes does not apply before CONNECT
    assert drain(connection) == [Closed(VIOLATION, "packet of 101 bytes exceeds the limit of 100")]
    assert connection.data_to_send() == b""
    assert_over(connection)


def test_packets_pipelined_after_a_small_connect_do_not_count_against_max_connect_bytes() -> None:
    connection = MqttConnection(ConnectionLimits(max_connect_bytes=100, max_packet_bytes=1000), START)
    connection.receive_data(connect_packet() + publish_packet(b"a/b", b"x" * 200))
    assert drain(connection) == [ConnectRequest("tab-1", "alice", "token", 60, True)]
    connection.accept(False, None)
    assert drain(connection) == [PublishReceived("a/b", b"x" * 200, 0, False)]


def test_after_connect_max_packet_bytes_applies_to_the_remaining_length() -> None:
    connection = connected(ConnectionLimits(max_connect_bytes=100, max_packet_bytes=300))
    at_limit = publish_packet(b"a/b", b"x" * (300 - 5))  # 2 + 3 topic bytes + payload = 300
    connection.receive_data(at_limit)  # larger than max_connect_bytes: that limit is over
    assert drain(connection) == [PublishReceived("a/b", b"x" * 295, 0, False)]
    connection.receive_data(b"\x30" + varint(301))
    assert drain(connection) == [Closed(VIOLATION, "packet of 301 bytes exceeds the limit of 300")]
    assert_over(connection)


# ================================================================== output: send_publish, data_to_send, counters


@pytest.mark.parametrize(("qos", "packet_id", "dup", "expected"), [
    (0, None, False, b'\x30\x0c\x00\x05a/b/c{"k"}'),
    (1, 7, False, b'\x32\x0e\x00\x05a/b/c\x00\x07{"k"}'),
    (1, 0x0102, True, b'\x3a\x0e\x00\x05a/b/c\x01\x02{"k"}'),
])
def test_send_publish_writes_the_exact_publish(qos: int, packet_id: int | None, dup: bool, expected: bytes) -> None:
    connection = connected()
    assert connection.send_publish("a/b/c", b'{"k"}', qos, packet_id, dup) is True
    assert connection.data_to_send() == expected


def test_publishes_queued_together_leave_whole_and_in_order() -> None:
    connection = connected()
    expected = b""
    for n in range(5):
        assert connection.send_publish("t", b"%d" % n, 1, n + 1, False) is True
        expected += codec.encode_publish("t", b"%d" % n, 1, n + 1, False)

    assert connection.data_to_send() == expected
    assert connection.data_to_send() == b""


def test_send_publish_returns_false_before_accept() -> None:
    connection = MqttConnection(LIMITS, START)
    assert connection.send_publish("t", b"x", 0, None, False) is False
    connection.receive_data(connect_packet())
    drain(connection)
    assert connection.send_publish("t", b"x", 0, None, False) is False
    assert connection.data_to_send() == b""


@pytest.mark.parametrize("how", ["close", "disconnect", "violation", "token-expiry"])
def test_send_publish_returns_false_after_close(how: str) -> None:
    connection = connected(expires_at=START + 60.0)
    if how == "close":
        assert connection.close(DisconnectReason.UNREGISTERED) == Closed(DisconnectReason.UNREGISTERED, "")
    elif how == "disconnect":
        connection.receive_data(DISCONNECT)
        assert drain(connection) == [Closed(DisconnectReason.CLEAN, "")]
    elif how == "violation":
        connection.receive_data(b"\xc0\x01\x00")
        assert drain(connection) == [Closed(VIOLATION, "packet type 12 carries 1 unexpected bytes")]
    else:
        assert connection.handle_timeout(START + 60.0) == Closed(DisconnectReason.TOKEN_EXPIRED, "")
    assert connection.send_publish("t", b"x", 1, 1, False) is False
    assert connection.data_to_send() == b""


def test_data_to_send_drains_what_is_queued() -> None:
    connection = connected()
    connection.receive_data(PINGREQ + PINGREQ)
    drain(connection)
    connection.send_publish("t", b"x", 0, None, False)
    assert connection.data_to_send() == PINGRESP + PINGRESP + b"\x30\x04\x00\x01tx"
    assert connection.data_to_send() == b""


def test_bytes_received_counts_every_byte_fed_even_before_a_packet_completes() -> None:
    connection = MqttConnection(LIMITS, START)
    connect = connect_packet()
    connection.receive_data(connect[:3])
    assert connection.bytes_received == 3
    connection.receive_data(connect[3:] + b"\xc0")
    assert connection.bytes_received == len(connect) + 1


def test_bytes_sent_counts_what_data_to_send_hands_out_when_it_does() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet() + PINGREQ * 3)
    drain(connection)
    connection.accept(False, None)
    drain(connection)
    assert connection.bytes_sent == 0  # queued, not handed out yet
    assert connection.data_to_send() == CONNACK_ACCEPTED + PINGRESP * 3
    assert connection.bytes_sent == 4 + 6
    connection.send_publish("t", b"x", 0, None, False)
    connection.data_to_send()
    assert connection.bytes_sent == 4 + 6 + 6


def test_bytes_queued_before_a_close_are_still_handed_out() -> None:
    connection = connected()
    connection.send_publish("t", b"x", 0, None, False)
    assert connection.close(DisconnectReason.SHUTDOWN, "bye") == Closed(DisconnectReason.SHUTDOWN, "bye")
    assert connection.data_to_send() == b"\x30\x04\x00\x01tx"


def test_close_returns_closed_once_then_none() -> None:
    connection = connected()
    assert connection.close(DisconnectReason.TAKEN_OVER, "new link") == Closed(DisconnectReason.TAKEN_OVER, "new link")
    assert connection.close(DisconnectReason.SHUTDOWN) is None
    assert_over(connection)


def test_close_while_a_connect_awaits_a_decision_ends_it() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet())
    drain(connection)
    assert connection.close(DisconnectReason.DROPPED) == Closed(DisconnectReason.DROPPED, "")
    with pytest.raises(RuntimeError):
        connection.accept(False, None)
    assert_over(connection)


def test_close_after_a_refusal_returns_none() -> None:
    connection = MqttConnection(LIMITS, START)
    connection.receive_data(connect_packet())
    drain(connection)
    connection.refuse(4)
    assert connection.close(DisconnectReason.DROPPED) is None
    assert drain(connection) == [Closed(DisconnectReason.CONNECT_REFUSED, "")]


def test_publish_now_is_send_publish_then_data_to_send_without_the_round_trip() -> None:
    queued, direct = connected(), connected()
    queued.data_to_send(), direct.data_to_send()  # the CONNACKs
    queued.send_publish("t/1", b"x", 1, 7, True)
    assert direct.publish_now("t/1", b"x", 1, 7, True) == queued.data_to_send()
    assert (direct.bytes_sent, direct.data_to_send()) == (queued.bytes_sent, b"")
    direct.send_suback(1, [1])  # something already queued goes out first, in order
    assert direct.publish_now("t/1", b"y", 0, None, False) == codec.encode_suback(1, [1]) \
        + codec.encode_publish("t/1", b"y", 0, None, False)
    direct.close(DisconnectReason.SHUTDOWN)
    assert direct.publish_now("t/1", b"z", 0, None, False) is None


def test_a_puback_read_in_place_is_the_same_event_and_a_malformed_one_still_closes() -> None:
    connection = connected()
    connection.receive_data(bytes((0x40, 2, 0x01, 0x02)) + bytes((0x40, 2, 0x00, 0x07)))
    assert drain(connection) == [PubackReceived(0x0102), PubackReceived(7)]
    connection.receive_data(bytes((0x40, 2, 0, 0)))  # packet id 0 is still refused
    assert drain(connection) == [Closed(VIOLATION, "packet id 0")]


def test_a_lone_pingreq_is_answered_at_once_and_counted_like_any_other() -> None:
    counters = MqttCounters()
    connection = MqttConnection(LIMITS, START, counters)
    assert connection.answer_lone_ping(PINGREQ) is None  # no CONNECT yet: through receive_data
    connection.receive_data(connect_packet())
    drain(connection)
    connection.accept(False, None)
    connection.data_to_send()
    before_in, before_out = connection.bytes_received, connection.bytes_sent

    assert connection.answer_lone_ping(PINGREQ) == PINGRESP
    assert (counters.packets_in[codec.PINGREQ], counters.packets_out[codec.PINGRESP]) == (1, 1)
    assert (connection.bytes_received - before_in, connection.bytes_sent - before_out) == (2, 2)
    assert connection.data_to_send() == b"" and drain(connection) == []
    # Anything else, or a PINGREQ behind buffered bytes, goes the usual way, in order.
    assert connection.answer_lone_ping(PINGREQ + PINGREQ) is None
    assert connection.answer_lone_ping(b"\xc1\x00") is None  # bad flags: receive_data closes on it
    connection.receive_data(b"\xc0")  # half a PINGREQ buffered
    assert connection.answer_lone_ping(PINGREQ) is None


def test_a_lone_puback_gives_its_packet_id_and_is_counted_like_any_other() -> None:
    counters = MqttCounters()
    connection = MqttConnection(LIMITS, START, counters)
    assert connection.lone_puback(puback(7)) is None  # no CONNECT yet: through receive_data
    connection.receive_data(connect_packet())
    drain(connection)
    connection.accept(False, None)
    connection.data_to_send()

    assert connection.lone_puback(puback(7)) == 7
    assert counters.packets_in[codec.PUBACK] == 1 and drain(connection) == []
    assert connection.lone_puback(puback(0)) is None  # packet id 0: receive_data closes on it
    assert connection.lone_puback(puback(1) + puback(2)) is None  # more than one: the usual way
    assert connection.lone_puback(b"\x40\x03\x00\x01\x00") is None
    connection.receive_data(b"\x40")  # a PUBACK's first byte buffered
    assert connection.lone_puback(puback(3)) is None
