"""MqttLink: one client connection, driven. The glue between a transport, the sans-IO
MqttConnection, the EndpointPlugin and the endpoint table.

The TCP listener (broker_plugin.tcp) and MQTT over WebSocket (http_bridge.websocket)
both create a link and feed it bytes, so both speak exactly the same MQTT. Each read
is handled synchronously, packet by packet, and the bytes it produces go out in one
write at its end (a CONNACK and the queued events it releases, a burst of PUBACKs).

The link is also the endpoint's `EndpointLink`. Closing it never calls back into the
table: the transport is closed (or aborted), and the link detaches from its endpoint
only in `connection_lost`, which the transport calls later, as its own loop callback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from broker_plugin import codec
from broker_plugin.connection import (
    PING_RECEIVED,
    Closed,
    ConnectionLimits,
    ConnectRequest,
    Event,
    MqttConnection,
    MqttCounters,
    Phase,
    PubackReceived,
    PublishReceived,
    SubscribeRequest,
    UnsubscribeRequest,
)
from endpoint_core.clock import Clock
from endpoint_core.endpoint import DisconnectReason, RemovalReason, UserEndpoint
from endpoint_core.logtext import loggable
from endpoint_core.principals import Principal

if TYPE_CHECKING:
    from broker_plugin.plugin import ConnectVerdict, EndpointPlugin
    from endpoint_core.table import EndpointTable

log = logging.getLogger("endpoint_broker.mqtt")

# Refused SUBSCRIBEs and PUBLISHes logged per connection; the rest are only counted.
REFUSALS_LOGGED_PER_CONNECTION = 5

# A replaced or stuck client gets no goodbye: its socket is aborted, unsent bytes and all.
_ABORT_REASONS = frozenset({DisconnectReason.TAKEN_OVER, DisconnectReason.SLOW_READER})
# Any other close first sends what is buffered (a refusing CONNACK, say), but a peer that does
# not read would keep the socket and its buffer forever: it is aborted after this long.
CLOSE_GRACE_SECONDS = 5.0


class Transport(Protocol):
    """Where a link's bytes go: an asyncio transport (TCP, TLS) or a WebSocket, with asyncio's names."""

    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int:
        """Bytes written but not yet handed to the network."""
        ...

    def close(self) -> None:
        """Send what is buffered, then close. The driver then calls `connection_lost`."""
        ...

    def abort(self) -> None:
        """Close now, dropping unsent bytes. The driver then calls `connection_lost`."""
        ...


class LinkHost(Protocol):
    """What a link needs from the broker that accepted it."""

    plugin: EndpointPlugin
    table: EndpointTable
    limits: ConnectionLimits
    clock: Clock
    counters: MqttCounters  # broker-wide packet and byte counts (metrics)

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle: ...

    def connect_settled(self, link: MqttLink) -> None:
        """The link's CONNECT was answered, or it ended before one: it no longer counts as pending."""
        ...

    def link_ended(self, link: MqttLink) -> None: ...

    def log_refused_connect(self, link: MqttLink, client_id: str, code: int, reason: str) -> None: ...

    def committed(self) -> asyncio.Future[None]:
        """Done once everything journalled so far is stored; failed if it could not be."""
        ...


class MqttLink:
    __slots__ = ("__weakref__", "_connection", "_corked", "_ended", "_host", "_refusals", "_timer",
                 "_transport", "close_reason", "endpoint", "peer", "pending", "principal", "transport_name")

    def __init__(self, host: LinkHost, transport: Transport, peer: str, transport_name: str) -> None:
        self._host = host
        self._transport = transport
        self._connection = MqttConnection(host.limits, host.clock(), host.counters)
        self._timer: asyncio.TimerHandle | None = None
        self._corked = False
        self._ended = False
        self._refusals = 0
        self.peer = peer
        self.transport_name = transport_name  # "tcp", "tls" or "websocket"
        self.endpoint: UserEndpoint | None = None
        self.principal: Principal | None = None  # who connected: what it may subscribe to depends on it
        self.close_reason: DisconnectReason | None = None
        self.pending = True  # no CONNECT answered yet
        self._arm_timer()

    @property
    def closed(self) -> bool:
        return self._connection.closed

    # ----------------------------------------------------------- transport side

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        pong = connection.answer_lone_ping(data)
        if pong is not None:  # an idle client's keepalive: the most frequent packet there is
            self._touched()
            self._write(pong)
            return
        packet_id = connection.lone_puback(data)
        if packet_id is not None:  # one per QoS 1 event delivered
            self._touched()
            self._acknowledged(packet_id)
            return
        connection.receive_data(data)
        self._process()

    def _process(self) -> None:
        """Handle every event the buffered bytes hold, then send the answers in one write."""
        connection = self._connection
        self._corked = True
        try:
            while (event := connection.next_event()) is not None:
                self._handle(event)
        except Exception:
            # A bug must cost this connection only, never the process or other endpoints.
            log.exception("closing %s (%s): internal error while handling a packet",
                          self._name(), self.peer)
            closed = connection.close(DisconnectReason.INTERNAL_ERROR)
            if closed is not None:
                self._end(closed)
        finally:
            self._corked = False
        self._flush()

    def protocol_violation(self, detail: str) -> None:
        """The transport saw the peer break the protocol below MQTT (a WebSocket text message)."""
        closed = self._connection.close(DisconnectReason.PROTOCOL_VIOLATION, detail)
        if closed is not None:
            self._end(closed)

    def connection_lost(self) -> None:
        """The transport is gone: the peer left, the network failed, or our own close finished."""
        if self._ended:
            return
        self._ended = True
        closed = self._connection.close(DisconnectReason.DROPPED)
        if closed is not None:
            self.close_reason = closed.reason
        self._cancel_timer()
        if self.pending:
            self.pending = False
            self._host.connect_settled(self)
        endpoint = self.endpoint
        if endpoint is not None:
            reason = self.close_reason or DisconnectReason.DROPPED
            log.info("connection of %s from %s ended: %s", endpoint.id, self.peer, reason)
            self._host.table.disconnect(endpoint, self, reason)
        self._host.plugin.service.feeds.link_ended(self)
        self._host.link_ended(self)

    # ------------------------------------------------------------ EndpointLink

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool:
        connection = self._connection
        if self._corked:  # answering a read: its bytes go out together at its end
            return connection.send_publish(topic, payload, qos, packet_id, dup)
        data = connection.publish_now(topic, payload, qos, packet_id, dup)
        if data is None:
            return False
        self._write(data)
        return connection.phase is not Phase.CLOSED  # a slow reader is cut off by the write

    def close(self, reason: DisconnectReason) -> None:
        closed = self._connection.close(reason)
        if closed is not None:
            self._end(closed)

    # ------------------------------------------------------------------ events

    def _touched(self) -> None:
        """Every packet from the client is a keepalive for its endpoint."""
        endpoint = self.endpoint
        if endpoint is not None:
            self._host.table.touch(endpoint, self)
            self._host.plugin.service.feeds.touch(self)

    def _acknowledged(self, packet_id: int) -> None:
        endpoint = self.endpoint
        assert endpoint is not None  # a PUBACK is an event only once connected
        if not self._host.plugin.service.feeds.acknowledge(self, packet_id):
            self._host.table.acknowledge(endpoint, self, packet_id)

    def _handle(self, event: Event) -> None:
        self._touched()
        endpoint = self.endpoint
        if event is PING_RECEIVED:
            return  # answered by the connection; a keepalive, counted above
        if isinstance(event, PubackReceived):
            self._acknowledged(event.packet_id)
        elif isinstance(event, SubscribeRequest):
            assert endpoint is not None
            self._on_subscribe(event, endpoint)
        elif isinstance(event, ConnectRequest):
            self._on_connect(event)
        elif isinstance(event, Closed):
            self._end(event)
        elif isinstance(event, UnsubscribeRequest):
            assert endpoint is not None
            for topic in event.topics:
                self._host.table.unsubscribe(endpoint, self, topic)
                self._host.plugin.service.feeds.unsubscribe(self, topic)
        elif isinstance(event, PublishReceived):
            assert endpoint is not None
            if not self._host.plugin.on_publish(self, endpoint, event.topic, event.payload, event.retain):
                self._log_refusal("publish to", event.topic)
        # PingReceived and QosTwoAckReceived were answered by the connection; they only count as keepalives.

    def _on_connect(self, request: ConnectRequest) -> None:
        self.pending = False
        self._host.connect_settled(self)
        table = self._host.table
        created, journalled = table.get(request.client_id) is None, table.journalled
        verdict = self._host.plugin.on_connect(
            self,
            client_id=request.client_id,
            username=request.username,
            password=request.password,
            keep_alive=request.keep_alive,
            clean_session=request.clean_session,
        )
        if isinstance(verdict, asyncio.Future):
            self._await_verdict(verdict, request, created, journalled)
            return
        self._settle_connect(verdict, request, created, journalled)

    def _await_verdict(self, verdict: asyncio.Future[ConnectVerdict], request: ConnectRequest, created: bool,
                       journalled: int) -> None:
        """A cluster node's verdict comes once Redis answered; the connection holds what arrives meanwhile."""

        def resume(future: asyncio.Future[ConnectVerdict]) -> None:
            try:
                decided = future.result()
            except Exception:
                log.exception("refusing %s (%s): internal error while deciding a CONNECT", self._name(), self.peer)
                if not (self._ended or self._connection.closed):
                    self._connection.refuse(codec.SERVER_UNAVAILABLE, "internal error")
                    self._flush()
                return
            if self._ended or self._connection.closed:
                if decided.endpoint is not None:  # granted to a connection that is gone: detach at once
                    self._host.table.disconnect(decided.endpoint, self, DisconnectReason.DROPPED)
                return
            self._settle_connect(decided, request, created, journalled)
            self._process()

        verdict.add_done_callback(resume)

    def _settle_connect(self, verdict: ConnectVerdict, request: ConnectRequest, created: bool,
                        journalled: int) -> None:
        if verdict.code != codec.ACCEPTED:
            self._host.log_refused_connect(self, request.client_id, verdict.code, verdict.reason)
            self._connection.refuse(verdict.code, verdict.reason)
            return
        assert verdict.endpoint is not None and verdict.principal is not None
        # Attached now, so that however the connection ends from here, it detaches.
        self.endpoint = verdict.endpoint
        self.principal = verdict.principal
        # CONNACK 0 only once what this CONNECT changed (a registration, a version) is stored.
        self._after_commit(journalled, lambda stored: self._answer_connect(verdict, stored, created))

    def _answer_connect(self, verdict: ConnectVerdict, stored: bool, created: bool) -> None:
        assert verdict.endpoint is not None and verdict.principal is not None
        if not stored:
            self._connection.refuse(codec.SERVER_UNAVAILABLE, "the registration could not be stored")
            if created:
                # Refused, so not registered: nobody may find it later. (Closing this link from the
                # table is then a no-op: the refusal already closed the connection.)
                self._host.table.remove(verdict.endpoint, RemovalReason.UNREGISTERED,
                                        "its registration could not be stored")
            return
        # The connection lives until the token's `exp` (Unix time), counted on the host's clock.
        expires_at = self._host.clock() + (verdict.principal.expires_at - time.time())
        self._connection.accept(verdict.session_present, expires_at)
        self._arm_timer()
        log.info("%s connected from %s over %s as user %s", verdict.endpoint.id, self.peer,
                 self.transport_name, verdict.principal.user_id)
        if verdict.session_present:
            self._host.table.flush(verdict.endpoint, self)

    def _on_subscribe(self, request: SubscribeRequest, endpoint: UserEndpoint) -> None:
        plugin = self._host.plugin
        journalled = self._host.table.journalled
        assert self.principal is not None
        codes = []
        for topic, qos in request.topics:
            code = plugin.on_subscribe(self, endpoint, topic, qos, self.principal)
            if code == codec.SUBACK_FAILURE:
                self._log_refusal("subscription to", topic)
            codes.append(code)
        # A clean_session=0 session's subscriptions are stored before its SUBACK.
        self._connection.held = True
        self._after_commit(journalled, lambda stored: self._answer_subscribe(request, endpoint, codes, stored))

    def _answer_subscribe(self, request: SubscribeRequest, endpoint: UserEndpoint, codes: list[int],
                          stored: bool) -> None:
        self._connection.held = False
        if not stored:
            # MQTT 3.1.1 has no "try later" in a SUBACK: refuse, and undo, so nothing is sent to
            # a filter the client was told it does not have.
            for topic, _ in request.topics:
                self._host.table.unsubscribe(endpoint, self, topic)
            codes = [codec.SUBACK_FAILURE] * len(codes)
        self._connection.send_suback(request.packet_id, codes)
        if any(code != codec.SUBACK_FAILURE for code in codes):
            self._host.table.flush(endpoint, self)

    def _after_commit(self, journalled_before: int, answer: Callable[[bool], None]) -> None:
        """Call `answer(stored)` once what the operation journalled is committed: at once when it
        journalled nothing, or when the store has it already."""
        if self._host.table.journalled == journalled_before:
            answer(True)
            return
        committed = self._host.committed()
        if committed.done():
            answer(not committed.cancelled() and committed.exception() is None)
            return

        def resume(future: asyncio.Future[None]) -> None:
            if self._ended or self._connection.closed:
                return  # the connection ended while the store committed (timeout, take-over, shutdown)
            try:
                answer(not future.cancelled() and future.exception() is None)
            except Exception:
                log.exception("closing %s (%s): internal error while answering", self._name(), self.peer)
                closed = self._connection.close(DisconnectReason.INTERNAL_ERROR)
                if closed is not None:
                    self._end(closed)
                return
            self._process()  # what arrived meanwhile waited behind the answer

        committed.add_done_callback(resume)

    # ----------------------------------------------------------------- helpers

    def _end(self, closed: Closed) -> None:
        """The connection is over: send what it still has to say, then close the transport."""
        self.close_reason = closed.reason
        self._cancel_timer()
        if closed.reason is DisconnectReason.PROTOCOL_VIOLATION:
            log.info("closing %s (%s): protocol violation: %s", self._name(), self.peer, loggable(closed.detail))
        data = self._connection.data_to_send()
        if data:
            self._transport.write(data)
        if closed.reason in _ABORT_REASONS:
            self._transport.abort()
        else:
            self._transport.close()
            self._timer = self._host.call_later(CLOSE_GRACE_SECONDS, self._transport.abort)

    def _flush(self) -> None:
        data = self._connection.data_to_send()
        if data:
            self._write(data)

    def _write(self, data: bytes) -> None:
        self._transport.write(data)
        # Every byte counts, PINGRESPs included: a client that sends but never reads is cut off.
        if self._transport.get_write_buffer_size() > self._host.limits.max_buffered_bytes:
            log.warning("closing %s: it does not read (over %d bytes unsent)",
                        self._name(), self._host.limits.max_buffered_bytes)
            self.close(DisconnectReason.SLOW_READER)

    def _arm_timer(self) -> None:
        self._cancel_timer()
        deadline = self._connection.next_deadline()
        if deadline is not None:
            self._timer = self._host.call_later(max(0.0, deadline - self._host.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        closed = self._connection.handle_timeout(self._host.clock())
        if closed is None:
            self._arm_timer()  # woke early: the deadline moved later
            return
        if closed.reason is DisconnectReason.CONNECT_TIMEOUT:
            what = "no CONNECT in time" if self.pending else "the CONNECT could not be answered in time (store)"
            self._host.log_refused_connect(self, "", -1, what)
        self._end(closed)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _log_refusal(self, what: str, topic: str) -> None:
        self._refusals += 1
        if self._refusals <= REFUSALS_LOGGED_PER_CONNECTION:
            log.info("%s refused %s %s", self._name(), what, loggable(topic))
            if self._refusals == REFUSALS_LOGGED_PER_CONNECTION:
                log.info("%s: further refusals on this connection are not logged", self._name())

    def _name(self) -> str:
        return self.endpoint.id if self.endpoint is not None else "?"
