"""MQTT over TCP (or TLS): an asyncio Protocol that feeds one MqttLink.

The link writes to the asyncio transport itself (it has the Transport methods the link needs):
no Python frame between a PUBLISH and its `send`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from broker_plugin.broker import EndpointBroker
    from broker_plugin.link import MqttLink


class TcpMqttProtocol(asyncio.Protocol):
    __slots__ = ("_broker", "_link", "_transport", "_transport_name")

    def __init__(self, broker: EndpointBroker, transport_name: str) -> None:
        self._broker = broker
        self._transport_name = transport_name
        self._transport: asyncio.Transport | None = None
        self._link: MqttLink | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._link = self._broker.open_link(self._transport, name, self._transport_name)
        if self._link is None:
            self._transport.abort()  # over mqtt_max_pending_connects

    def data_received(self, data: bytes) -> None:
        if self._link is not None:
            self._link.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._link is not None:
            self._link.connection_lost()
