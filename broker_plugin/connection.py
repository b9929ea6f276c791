"""One MQTT client connection, sans-IO: bytes come in through `feed`, go out through a `Sink`.

The TCP listener (an asyncio Protocol) and the WebSocket bridge both drive this
class, so both speak exactly the same MQTT. It parses every complete packet of a
read synchronously and calls the plugin's endpoint callbacks in packet order:
no task per packet, and nothing can interleave between a CONNECT being
accepted and the endpoint being attached.

It is also the endpoint's `EndpointLink`: the table publishes through it and
closes it when the endpoint is unregistered or expires.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from typing import TYPE_CHECKING, Protocol

from broker_plugin import codec
from broker_plugin.codec import ProtocolViolation

if TYPE_CHECKING:
    from broker_plugin.plugin import EndpointPlugin
    from endpoint_core.endpoint import UserEndpoint
    from endpoint_core.principals import Principal

log = logging.getLogger("endpoint_broker.mqtt")


class Sink(Protocol):
    """Where a connection's bytes go: a TCP transport or a WebSocket."""

    def write(self, data: bytes) -> None: ...

    def buffered(self) -> int:
        """Bytes written but not yet handed to the network."""
        ...

    def close(self) -> None:
        """Flush what is buffered, then close. The driver then calls `connection_lost`."""
        ...


class Phase(enum.Enum):
    AWAITING_CONNECT = 1
    CONNECTED = 2
    CLOSED = 3


class ConnectionHost(Protocol):
    """What a connection needs from the broker that accepted it."""

    plugin: EndpointPlugin
    connect_timeout_seconds: float
    max_packet_bytes: int
    max_buffered_bytes: int

    def session_opened(self, connection: MqttConnection) -> None: ...

    def session_closed(self, connection: MqttConnection) -> None: ...


class MqttConnection:
    __slots__ = (
        "__weakref__",
        "_buffer",
        "_clean_disconnect",
        "_host",
        "_sink",
        "_timer",
        "endpoint",
        "peer",
        "phase",
        "principal",
    )

    def __init__(self, host: ConnectionHost, sink: Sink, peer: str) -> None:
        self._host = host
        self._sink = sink
        self._buffer = bytearray()
        self._clean_disconnect = False
        self.peer = peer
        self.phase = Phase.AWAITING_CONNECT
        self.endpoint: UserEndpoint | None = None
        self.principal: Principal | None = None
        # Before CONNECT: the connect timeout. After: the token's expiry.
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            host.connect_timeout_seconds, self.close, "no CONNECT in time"
        )

    @property
    def client_id(self) -> str | None:
        """The MQTT client id: the endpoint's id, once CONNECT was accepted."""
        return None if self.endpoint is None else self.endpoint.id

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # ------------------------------------------------------------ input

    def feed(self, data: bytes) -> None:
        """Consume bytes from the network; handles every complete packet in them."""
        if self.phase is Phase.CLOSED:
            return
        buffer = self._buffer
        buffer += data
        if self.phase is Phase.AWAITING_CONNECT and buffer and buffer[0] != codec.CONNECT << 4:
            # Fail fast on whatever is not MQTT (an HTTP request, a port scan).
            log.info("closing %s: not an MQTT CONNECT", self.peer)
            self.close("not MQTT")
            return
        position = 0
        end_of_data = len(buffer)
        try:
            while end_of_data - position >= 2:
                length, multiplier, index, complete = 0, 1, position + 1, False
                while index < end_of_data:
                    digit = buffer[index]
                    index += 1
                    length += (digit & 0x7F) * multiplier
                    if not digit & 0x80:
                        complete = True
                        break
                    multiplier *= 128
                    if multiplier > 128**3:
                        raise ProtocolViolation("remaining length longer than 4 bytes")
                if not complete:
                    break  # the remaining length itself is not complete yet
                if length > self._host.max_packet_bytes:
                    raise ProtocolViolation(f"packet of {length} bytes exceeds the limit")
                packet_end = index + length
                if packet_end > end_of_data:
                    break
                self._dispatch(buffer[position], bytes(buffer[index:packet_end]))
                position = packet_end
                if self.closed:  # the packet ended the connection
                    return
        except ProtocolViolation as exc:
            log.info("closing %s (%s): protocol violation: %s", self.client_id or "?", self.peer, exc)
            self.close("protocol violation")
            return
        except Exception:
            # A bug must cost this connection only, never the process or other endpoints.
            log.exception("closing %s (%s): internal error while handling a packet", self.client_id, self.peer)
            self.close("internal error")
            return
        del buffer[:position]

    def connection_lost(self) -> None:
        """The transport is gone (peer closed, network error, or our own close finished)."""
        self._finish()

    # ----------------------------------------------------------- packets

    def _dispatch(self, first_byte: int, body: bytes) -> None:
        packet_type = first_byte >> 4
        if self.phase is Phase.AWAITING_CONNECT:
            if packet_type != codec.CONNECT:
                raise ProtocolViolation("the first packet must be CONNECT")
            self._on_connect(first_byte, body)
            return
        plugin, endpoint = self._host.plugin, self.endpoint
        assert endpoint is not None
        # Every packet from the client is a keepalive for its endpoint.
        plugin.on_packet(self, endpoint)
        if packet_type == codec.PINGREQ:
            self._sink.write(codec.PINGRESP_BYTES)
        elif packet_type == codec.PUBACK:
            plugin.on_puback(self, endpoint, codec.packet_id_of(body))
        elif packet_type == codec.SUBSCRIBE:
            self._on_subscribe(first_byte, body, endpoint)
        elif packet_type == codec.UNSUBSCRIBE:
            self._on_unsubscribe(first_byte, body, endpoint)
        elif packet_type == codec.PUBLISH:
            self._on_publish(first_byte, body, endpoint)
        elif packet_type == codec.PUBREL:
            self._sink.write(codec.encode_ack(codec.PUBCOMP, codec.packet_id_of(body)))
        elif packet_type == codec.DISCONNECT:
            self._clean_disconnect = True
            self.close("client disconnected")
        elif packet_type in (codec.PUBREC, codec.PUBCOMP):
            pass  # the server never sends QoS 2, so there is nothing to complete
        else:
            raise ProtocolViolation(f"unexpected packet type {packet_type}")

    def _on_connect(self, first_byte: int, body: bytes) -> None:
        self._cancel_timer()
        protocol_name, level = codec.protocol_of_connect(body)
        if protocol_name not in (b"MQTT", b"MQIsdp"):
            raise ProtocolViolation("not an MQTT connection")
        if level != 4:
            self._refuse(codec.UNACCEPTABLE_PROTOCOL_VERSION, f"protocol level {level}; only MQTT 3.1.1 is served")
            return
        packet = codec.decode_connect(first_byte, body)
        header, payload = packet.variable_header, packet.payload
        if header is None or payload is None:
            raise ProtocolViolation("incomplete CONNECT")
        if header.reserved_flag:
            raise ProtocolViolation("CONNECT reserved flag set")
        client_id = "" if payload.client_id_is_random else payload.client_id
        verdict = self._host.plugin.on_connect(
            self,
            client_id=client_id,
            username=payload.username if header.username_flag else None,
            password=payload.password if header.password_flag else None,
            keep_alive=header.keep_alive,
            clean_session=header.clean_session_flag,
        )
        if verdict.code != codec.ACCEPTED:
            self._refuse(verdict.code, verdict.reason, client_id)
            return
        assert verdict.endpoint is not None and verdict.principal is not None
        self.endpoint = verdict.endpoint
        self.principal = verdict.principal
        self.phase = Phase.CONNECTED
        self._host.session_opened(self)
        self._sink.write(codec.encode_connack(verdict.session_present, codec.ACCEPTED))
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, verdict.principal.expires_at - time.time()), self.close, "token expired"
        )
        log.info("%s connected from %s as user %s", client_id, self.peer, verdict.principal.user_id)
        if verdict.session_present:
            self._host.plugin.on_subscribed(self, verdict.endpoint)

    def _refuse(self, code: int, reason: str, client_id: str | None = None) -> None:
        # %r: a refused client id is untrusted text; repr keeps it on one log line.
        log.info("refused CONNECT of %r from %s: CONNACK %d (%s)", client_id, self.peer, code, reason)
        self._sink.write(codec.encode_connack(False, code))
        self.close("connect refused")

    def _on_subscribe(self, first_byte: int, body: bytes, endpoint: UserEndpoint) -> None:
        if first_byte & 0x0F != 0x02:
            raise ProtocolViolation("SUBSCRIBE flags must be 0010")
        packet = codec.decode_subscribe(first_byte, body)
        if packet.variable_header is None or packet.payload is None or not packet.payload.topics:
            raise ProtocolViolation("SUBSCRIBE without topics")
        plugin = self._host.plugin
        codes = [plugin.on_subscribe(self, endpoint, topic, qos) for topic, qos in packet.payload.topics]
        self._sink.write(codec.encode_suback(packet.variable_header.packet_id, codes))
        if any(code != codec.SUBACK_FAILURE for code in codes):
            plugin.on_subscribed(self, endpoint)

    def _on_unsubscribe(self, first_byte: int, body: bytes, endpoint: UserEndpoint) -> None:
        if first_byte & 0x0F != 0x02:
            raise ProtocolViolation("UNSUBSCRIBE flags must be 0010")
        packet = codec.decode_unsubscribe(first_byte, body)
        if packet.variable_header is None or packet.payload is None:
            raise ProtocolViolation("malformed UNSUBSCRIBE")
        for topic in packet.payload.topics:
            self._host.plugin.on_unsubscribe(self, endpoint, topic)
        self._sink.write(codec.encode_ack(codec.UNSUBACK, packet.variable_header.packet_id))

    def _on_publish(self, first_byte: int, body: bytes, endpoint: UserEndpoint) -> None:
        qos = (first_byte >> 1) & 0x03
        if qos == 3:
            raise ProtocolViolation("PUBLISH with QoS 3")
        packet = codec.decode_publish(first_byte, body)
        topic = packet.topic_name
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolViolation("PUBLISH topic must be a non-empty name without wildcards")
        self._host.plugin.on_publish(self, endpoint, topic, packet.data or b"", bool(first_byte & 0x01))
        # Acknowledged either way: MQTT 3.1.1 has no negative PUBACK, and a refused
        # publish that is never acknowledged would be retried forever.
        if qos == 1:
            self._sink.write(codec.encode_ack(codec.PUBACK, packet.variable_header.packet_id))
        elif qos == 2:
            self._sink.write(codec.encode_ack(codec.PUBREC, packet.variable_header.packet_id))

    # ----------------------------------------------------- EndpointLink

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool:
        if self.phase is not Phase.CONNECTED:
            return False
        if self._sink.buffered() > self._host.max_buffered_bytes:
            log.warning("closing %s: it does not read (over %d bytes unsent)",
                        self.client_id, self._host.max_buffered_bytes)
            self.close("client does not read")
            return False
        self._sink.write(codec.encode_publish(topic, payload, qos, packet_id, dup))
        return True

    def close(self, reason: str) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.CONNECTED:
            log.info("closing %s: %s", self.client_id, reason)
        self._finish()
        self._sink.close()

    async def stop(self) -> None:
        """amqtt's handler interface: Broker.shutdown stops leftover session-table entries."""
        self.close("broker shutting down")

    # ---------------------------------------------------------- helpers

    def _finish(self) -> None:
        """Detach from the endpoint exactly once, however the connection ends."""
        if self.phase is Phase.CLOSED:
            return
        was_connected = self.phase is Phase.CONNECTED
        self.phase = Phase.CLOSED
        self._cancel_timer()
        self._buffer = bytearray()
        if was_connected and self.endpoint is not None:
            self._host.plugin.on_disconnect(self, self.endpoint, self._clean_disconnect)
            self._host.session_closed(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
