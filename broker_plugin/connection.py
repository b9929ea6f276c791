"""The server side of one MQTT 3.1.1 connection, sans-IO, in the style of h11.

Bytes and a clock go in; events, bytes and a "next deadline" come out:

    connection = MqttConnection(limits, now)
    connection.receive_data(data)
    while (event := connection.next_event()) is not None:
        ...                                   # act on it; answer a ConnectRequest or SubscribeRequest
    transport.write(connection.data_to_send())
    connection.next_deadline()                # when to call handle_timeout(now)

It knows nothing of sockets, event loops, tokens or endpoints, so it is built
and tested in memory (tests/test_connection.py). Decisions are the caller's:
a ConnectRequest pauses the connection until `accept` or `refuse` is called, and
a SubscribeRequest is answered with `send_suback`. Packets with nothing to decide
(PINGREQ, a client PUBLISH, PUBREL, UNSUBSCRIBE) are acknowledged here, as MQTT
requires. Once a `Closed` event has come out, the connection is over: it takes
no more input and produces no more events; the caller closes the transport.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from broker_plugin import codec
from broker_plugin.codec import ProtocolViolation
from endpoint_core.endpoint import DisconnectReason


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The MQTT limits, with their defaults (config.settings takes its defaults from here)."""

    # A CONNECT must arrive within this long after the socket opens.
    connect_timeout_seconds: float = 10.0
    # Larger packets close the connection.
    max_packet_bytes: int = 256 * 1024
    # Bytes accepted before CONNECT: a CONNECT with a 16 KiB token is far smaller.
    max_connect_bytes: int = 64 * 1024
    # A client with more unsent bytes than this does not read, and is disconnected.
    max_buffered_bytes: int = 4 * 1024 * 1024


# ------------------------------------------------------------------ events

@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A well-formed MQTT 3.1.1 CONNECT. Answer with `accept` or `refuse`."""

    client_id: str
    username: str | None
    password: str | None
    keep_alive: int
    clean_session: bool


@dataclass(frozen=True, slots=True)
class SubscribeRequest:
    """Answer with `send_suback`, one return code per topic, in order."""

    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class UnsubscribeRequest:
    """Already acknowledged (UNSUBACK)."""

    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PublishReceived:
    """A client PUBLISH. Already acknowledged (PUBACK or PUBREC): MQTT 3.1.1 has no negative ack."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)  # not frozen: one per QoS 1 acknowledgement, and a frozen init costs more
class PubackReceived:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """Already answered (PINGRESP)."""


PINGREQ_BYTES = bytes((codec.PINGREQ << 4, 0))
PING_RECEIVED = PingReceived()  # it carries nothing: one instance serves every PINGREQ


@dataclass(frozen=True, slots=True)
class QosTwoAckReceived:
    """PUBREL (already answered with PUBCOMP), PUBREC or PUBCOMP: nothing to do but count it."""

    packet_type: int


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over; close the transport after writing `data_to_send()`."""

    reason: DisconnectReason
    detail: str = ""


Event = (ConnectRequest | SubscribeRequest | UnsubscribeRequest | PublishReceived | PubackReceived
         | PingReceived | QosTwoAckReceived | Closed)


class Phase(enum.Enum):
    AWAITING_CONNECT = 1
    DECIDING_CONNECT = 2  # a ConnectRequest is out, waiting for accept or refuse
    CONNECTED = 3
    CLOSED = 4


class MqttCounters:
    """Every connection's packets and bytes, summed broker-wide: plain integers on the hot path.

    Lists are indexed by packet type (1-14); `connacks` by CONNACK return code (0-5).
    """

    __slots__ = ("bytes_in", "bytes_out", "closes", "connacks", "packets_in", "packets_out")

    def __init__(self) -> None:
        self.packets_in = [0] * 16
        self.packets_out = [0] * 16
        self.bytes_in = 0
        self.bytes_out = 0
        self.connacks = [0] * 6
        self.closes: dict[DisconnectReason, int] = dict.fromkeys(DisconnectReason, 0)


class MqttConnection:
    __slots__ = ("_buffer", "_counters", "_deadline", "_limits", "_outgoing", "_pending_close", "bytes_received",
                 "bytes_sent", "held", "phase")

    def __init__(self, limits: ConnectionLimits, now: float, counters: MqttCounters | None = None) -> None:
        self._limits = limits
        self._counters = counters or MqttCounters()
        # Both empty most of the time (an idle connection), and then they hold no object: at
        # 10,000 idle endpoints two empty bytearrays each were a few percent of the memory.
        self._buffer: bytearray | None = None
        self._outgoing: bytes | bytearray = b""
        self.phase = Phase.AWAITING_CONNECT
        # Before CONNECT: the connect timeout. After: the token's expiry, if any.
        self._deadline: float | None = now + limits.connect_timeout_seconds
        # A close decided while answering (a refused CONNECT), reported by the next `next_event`.
        self._pending_close: Closed | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        # While held, no event comes out: the caller is still answering the last one (a SUBACK
        # that waits for its subscriptions to be stored), and the answers must keep their order.
        self.held = False

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # ------------------------------------------------------------- input

    def answer_lone_ping(self, data: bytes) -> bytes | None:
        """The PINGRESP to write at once, when `data` is exactly one PINGREQ and nothing else is
        buffered, queued or held: the one packet an idle client sends, counted as receive_data,
        next_event and data_to_send would count it, without their round trip. None otherwise:
        then feed `data` to receive_data as usual."""
        if (data != PINGREQ_BYTES or self._buffer or self._outgoing or self.held
                or self.phase is not Phase.CONNECTED or self._pending_close is not None):
            return None
        counters = self._counters
        self.bytes_received += 2
        self.bytes_sent += 2
        counters.bytes_in += 2
        counters.bytes_out += 2
        counters.packets_in[codec.PINGREQ] += 1
        counters.packets_out[codec.PINGRESP] += 1
        return codec.PINGRESP_BYTES

    def lone_puback(self, data: bytes) -> int | None:
        """The packet id, when `data` is exactly one valid PUBACK and nothing else is buffered
        or held: what a QoS 1 subscriber sends for each event, counted as receive_data and
        next_event would count it (the caller handles it as a PubackReceived). None otherwise:
        then feed `data` to receive_data as usual."""
        if (len(data) != 4 or data[0] != 0x40 or data[1] != 2 or self._buffer or self.held
                or self.phase is not Phase.CONNECTED or self._pending_close is not None):
            return None
        packet_id = (data[2] << 8) | data[3]
        if not packet_id:
            return None  # a protocol violation: receive_data closes on it
        self.bytes_received += 4
        self._counters.bytes_in += 4
        self._counters.packets_in[codec.PUBACK] += 1
        return packet_id

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the network; `next_event` parses them."""
        if self.phase is Phase.CLOSED:
            return
        self.bytes_received += len(data)
        self._counters.bytes_in += len(data)
        buffer = self._buffer
        if buffer is None:
            self._buffer = buffer = bytearray(data)
        else:
            buffer += data
        if (self.held or self.phase is Phase.DECIDING_CONNECT) and len(buffer) > self._limits.max_packet_bytes:
            # Nothing is parsed while an answer waits, so the packet limit is checked on the raw
            # bytes: a client cannot make the service buffer more than one packet meanwhile.
            self._pending_close = self._close(DisconnectReason.PROTOCOL_VIOLATION,
                                              f"over {self._limits.max_packet_bytes} bytes sent while an answer waited")

    def next_event(self) -> Event | None:
        """The next event, or None when more data (or a decision on a CONNECT) is needed."""
        if self._pending_close is not None:
            event, self._pending_close = self._pending_close, None
            return event
        if self.held or self.phase in (Phase.CLOSED, Phase.DECIDING_CONNECT):
            return None
        try:
            return self._parse_one()
        except ProtocolViolation as violation:
            return self._close(DisconnectReason.PROTOCOL_VIOLATION, str(violation))

    def handle_timeout(self, now: float) -> Closed | None:
        """Call at or after `next_deadline()`: closes the connection when its deadline has passed."""
        if self.phase is Phase.CLOSED or self._deadline is None or now < self._deadline:
            return None
        if self.phase is not Phase.CONNECTED:  # the connect timeout, also while a CONNECT is decided
            return self._close(DisconnectReason.CONNECT_TIMEOUT)
        return self._close(DisconnectReason.TOKEN_EXPIRED)

    def next_deadline(self) -> float | None:
        return None if self.phase is Phase.CLOSED else self._deadline

    # ------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        if not self._outgoing:
            return b""
        data, self._outgoing = bytes(self._outgoing), b""
        self.bytes_sent += len(data)
        self._counters.bytes_out += len(data)
        return data

    def _queue(self, data: bytes) -> None:
        outgoing = self._outgoing
        if not outgoing:
            self._outgoing = data  # the usual case: one answer, sent as it is
        elif isinstance(outgoing, bytearray):
            outgoing += data
        else:  # a second piece: from here on append in place, never re-copy what is queued
            self._outgoing = bytearray(outgoing) + data

    def accept(self, session_present: bool, expires_at: float | None) -> None:
        """Answer the pending ConnectRequest with CONNACK 0; the connection closes at `expires_at`."""
        if self.phase is not Phase.DECIDING_CONNECT:
            raise RuntimeError("no CONNECT is waiting for a decision")
        self.phase = Phase.CONNECTED
        self._deadline = expires_at
        self._queue(codec.encode_connack(session_present, codec.ACCEPTED))
        self._count_connack(codec.ACCEPTED)

    def refuse(self, return_code: int, detail: str = "") -> None:
        """Answer the pending ConnectRequest with a non-zero CONNACK; the next event is `Closed`."""
        if self.phase is not Phase.DECIDING_CONNECT:
            raise RuntimeError("no CONNECT is waiting for a decision")
        self._queue(codec.encode_connack(False, return_code))
        self._count_connack(return_code)
        self._pending_close = self._close(DisconnectReason.CONNECT_REFUSED, detail)

    def send_suback(self, packet_id: int, return_codes: list[int]) -> None:
        if self.phase is Phase.CONNECTED:
            self._queue(codec.encode_suback(packet_id, return_codes))
            self._counters.packets_out[codec.SUBACK] += 1

    def send_publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool:
        """Queue one PUBLISH. False once the connection is no longer connected."""
        if self.phase is not Phase.CONNECTED:
            return False
        self._queue(codec.encode_publish(topic, payload, qos, packet_id, dup))
        self._counters.packets_out[codec.PUBLISH] += 1
        return True

    def publish_now(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bytes | None:
        """One PUBLISH's bytes, to write at once: `send_publish` then `data_to_send` without the
        buffer round trip, for the common case of nothing else queued. None once not connected."""
        if self.phase is not Phase.CONNECTED:
            return None
        if self._outgoing:
            self.send_publish(topic, payload, qos, packet_id, dup)
            return self.data_to_send()
        data = codec.encode_publish(topic, payload, qos, packet_id, dup)
        counters = self._counters
        counters.packets_out[codec.PUBLISH] += 1
        self.bytes_sent += len(data)
        counters.bytes_out += len(data)
        return data

    def close(self, reason: DisconnectReason, detail: str = "") -> Closed | None:
        """Close from our side (unregistered, taken over, shutdown...). None if already closed."""
        if self.phase is Phase.CLOSED:
            return None
        return self._close(reason, detail)

    # ----------------------------------------------------------- parsing

    def _parse_one(self) -> Event | None:
        buffer, limits = self._buffer, self._limits
        if buffer is None:
            return None
        # The packet a QoS 1 stream is made of, read in place: PUBACK (0x40), length 2, a packet id.
        if len(buffer) >= 4 and buffer[0] == 0x40 and buffer[1] == 2 and self.phase is Phase.CONNECTED:
            packet_id = (buffer[2] << 8) | buffer[3]
            if packet_id:
                del buffer[:4]
                self._counters.packets_in[codec.PUBACK] += 1
                return PubackReceived(packet_id)
        # And the packet an idle connection is made of: PINGREQ, answered in place.
        if len(buffer) >= 2 and buffer[0] == 0xC0 and buffer[1] == 0 and self.phase is Phase.CONNECTED:
            del buffer[:2]
            self._counters.packets_in[codec.PINGREQ] += 1
            return self._answer_ping()
        awaiting_connect = self.phase is Phase.AWAITING_CONNECT
        if awaiting_connect and buffer and buffer[0] >> 4 != codec.CONNECT:
            raise ProtocolViolation("the first packet must be CONNECT")
        # Before CONNECT, read_frame refuses a declared length over max_connect_bytes before the
        # body arrives, so an unauthenticated socket never buffers more than that.
        max_body = limits.max_connect_bytes if awaiting_connect else limits.max_packet_bytes
        frame = codec.read_frame(buffer, 0, max_body)
        if frame is None:
            if not buffer:
                self._buffer = None
            return None
        body = bytes(buffer[frame.body_start:frame.body_end])
        del buffer[:frame.body_end]
        self._counters.packets_in[frame.packet_type] += 1
        if awaiting_connect:
            return self._on_connect(frame.flags, body)
        return self._on_packet(frame.packet_type, frame.flags, body)

    def _on_connect(self, flags: int, body: bytes) -> Event:
        connect = codec.decode_connect(flags, body)
        self.phase = Phase.DECIDING_CONNECT
        if connect.protocol_level != codec.PROTOCOL_LEVEL_3_1_1:
            self.refuse(codec.UNACCEPTABLE_PROTOCOL_VERSION,
                        f"protocol level {connect.protocol_level}; only MQTT 3.1.1 is served")
            return self.next_event()  # type: ignore[return-value]  # the Closed just queued
        return ConnectRequest(connect.client_id, connect.username, connect.password, connect.keep_alive,
                              connect.clean_session)

    def _answer_ping(self) -> PingReceived:
        self._queue(codec.PINGRESP_BYTES)
        self._counters.packets_out[codec.PINGRESP] += 1
        return PING_RECEIVED

    def _on_packet(self, packet_type: int, flags: int, body: bytes) -> Event:
        sent = self._counters.packets_out
        if packet_type == codec.PINGREQ:
            codec.decode_empty(packet_type, flags, body)
            return self._answer_ping()
        if packet_type == codec.PUBACK:
            return PubackReceived(codec.decode_packet_id_only(packet_type, flags, body))
        if packet_type == codec.SUBSCRIBE:
            subscribe = codec.decode_subscribe(flags, body)
            return SubscribeRequest(subscribe.packet_id, subscribe.topics)
        if packet_type == codec.UNSUBSCRIBE:
            unsubscribe = codec.decode_unsubscribe(flags, body)
            self._queue(codec.encode_ack(codec.UNSUBACK, unsubscribe.packet_id))
            sent[codec.UNSUBACK] += 1
            return UnsubscribeRequest(unsubscribe.topics)
        if packet_type == codec.PUBLISH:
            publish = codec.decode_publish(flags, body)
            if publish.qos == 1:
                assert publish.packet_id is not None
                self._queue(codec.encode_ack(codec.PUBACK, publish.packet_id))
                sent[codec.PUBACK] += 1
            elif publish.qos == 2:
                # Answered without keeping state: at least once, not exactly once (see README).
                assert publish.packet_id is not None
                self._queue(codec.encode_ack(codec.PUBREC, publish.packet_id))
                sent[codec.PUBREC] += 1
            return PublishReceived(publish.topic, publish.payload, publish.qos, publish.retain)
        if packet_type == codec.PUBREL:
            self._queue(codec.encode_ack(codec.PUBCOMP, codec.decode_packet_id_only(packet_type, flags, body)))
            sent[codec.PUBCOMP] += 1
            return QosTwoAckReceived(packet_type)
        if packet_type in (codec.PUBREC, codec.PUBCOMP):
            codec.decode_packet_id_only(packet_type, flags, body)
            return QosTwoAckReceived(packet_type)
        if packet_type == codec.DISCONNECT:
            codec.decode_empty(packet_type, flags, body)
            return self._close(DisconnectReason.CLEAN)
        if packet_type == codec.CONNECT:
            raise ProtocolViolation("a second CONNECT")  # 3.1.0-2
        raise ProtocolViolation(f"packet type {packet_type} is not sent by clients")

    def _count_connack(self, return_code: int) -> None:
        self._counters.packets_out[codec.CONNACK] += 1
        if 0 <= return_code < len(self._counters.connacks):
            self._counters.connacks[return_code] += 1

    def _close(self, reason: DisconnectReason, detail: str = "") -> Closed:
        self._counters.closes[reason] += 1
        self.phase = Phase.CLOSED
        self._deadline = None
        self._buffer = None
        return Closed(reason, detail)
