"""EndpointBroker: amqtt's Broker with its connection path replaced.

amqtt 0.12.1's own path (see ../shared/spec/AMQTT-0.12.1-NOTES.md) deletes an
existing session before authenticating, can only answer CONNACK 0 or 5, leaves
failed CONNECTs in its session table, leaves taken-over sockets open, does not
enforce keep-alive, drops unacknowledged QoS 1 after 5 s, and spends several
tasks and linear scans per packet. Here every connection is an `MqttConnection`
that authenticates before touching any state and calls EndpointPlugin in packet
order. amqtt still provides the listeners' lifecycle, the external (WebSocket)
listener API, the packet decoders, the plugin loading and the session table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping
from typing import Any, cast

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import ListenerType

from broker_plugin.connection import MqttConnection, Phase
from broker_plugin.plugin import EndpointPlugin
from broker_plugin.session import EndpointSession
from broker_plugin.websocket import AdapterSink, ChannelReader

log = logging.getLogger("endpoint_broker.mqtt")


class TcpMqttProtocol(asyncio.Protocol):
    """Feeds a TCP connection's bytes to an MqttConnection and is its Sink."""

    __slots__ = ("_broker", "_connection", "_transport")

    def __init__(self, broker: EndpointBroker) -> None:
        self._broker = broker
        self._transport: asyncio.Transport | None = None
        self._connection: MqttConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._connection = MqttConnection(self._broker, self, name)
        self._broker.connections.add(self._connection)

    def data_received(self, data: bytes) -> None:
        assert self._connection is not None
        self._connection.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._connection.connection_lost()
            self._broker.connections.discard(self._connection)

    # Sink
    def write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def buffered(self) -> int:
        assert self._transport is not None
        return self._transport.get_write_buffer_size()

    def close(self) -> None:
        assert self._transport is not None
        self._transport.close()


class EndpointBroker(Broker):
    def __init__(
        self,
        config: dict[str, Any],
        *,
        connect_timeout_seconds: float = 10.0,
        max_packet_bytes: int = 256 * 1024,
        max_buffered_bytes: int = 4 * 1024 * 1024,
        listener_ssl: Mapping[str, ssl.SSLContext] | None = None,
    ) -> None:
        super().__init__(config)
        # Listener name -> the caller's SSLContext, kept as is so that reloading it in place reaches new handshakes.
        self.listener_ssl = dict(listener_ssl or {})
        plugins = [p for p in self.plugins_manager.plugins if isinstance(p, EndpointPlugin)]
        if len(plugins) != 1:
            raise ValueError("EndpointBroker needs exactly one EndpointPlugin in its plugins")
        self.plugin: EndpointPlugin = plugins[0]
        self.connect_timeout_seconds = connect_timeout_seconds
        self.max_packet_bytes = max_packet_bytes
        self.max_buffered_bytes = max_buffered_bytes
        # Every open connection, including those still waiting for CONNECT.
        self.connections: set[MqttConnection] = set()

    # ------------------------------------------------- ConnectionHost

    def session_opened(self, connection: MqttConnection) -> None:
        assert connection.client_id is not None
        session = EndpointSession(
            connection.client_id,
            None if connection.principal is None else connection.principal.user_id,
            clean_session=not (connection.endpoint and connection.endpoint.persistent_session),
            keep_alive=0 if connection.endpoint is None else connection.endpoint.keep_alive_seconds,
            peer=connection.peer,
        )
        self._sessions[connection.client_id] = (session, connection)

    def session_closed(self, connection: MqttConnection) -> None:
        if connection.client_id is None:
            return
        entry = self._sessions.get(connection.client_id)
        if entry is not None and entry[1] is connection:
            del self._sessions[connection.client_id]

    # ------------------------------------------------ amqtt overrides

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        host = address.strip("[]") if address else None
        ssl_context = self.listener_ssl.get(listener_name, ssl_context)
        loop = asyncio.get_running_loop()
        return await loop.create_server(
            lambda: TcpMqttProtocol(self), host, port, reuse_address=True, ssl=ssl_context
        )

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """amqtt's entry for WebSocket connections: pump the channel into an MqttConnection."""
        if not isinstance(reader, ChannelReader):
            log.error("listener %r is not served: only TCP and the HTTP bridge's /ws are", listener_name)
            await writer.close()
            return
        peer = writer.get_peer_info()
        sink = AdapterSink(writer)
        connection = MqttConnection(self, sink, f"{peer[0]}:{peer[1]}" if peer else "websocket")
        self.connections.add(connection)
        try:
            while connection.phase is not Phase.CLOSED:
                data = await reader.read_chunk()
                if not data:
                    break
                connection.feed(data)
        finally:
            connection.connection_lost()
            self.connections.discard(connection)
            sink.close()
            await sink.closed()

    async def _session_monitor(self) -> None:
        """Not needed: a session-table entry leaves with its connection."""

    async def shutdown(self) -> None:
        for connection in list(self.connections):
            connection.close("broker shutting down")
        await super().shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
