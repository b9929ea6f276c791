"""Builds, starts and stops the MQTT broker inside the running event loop."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import Any

from broker_plugin.broker import EndpointBroker, Listener
from broker_plugin.connection import ConnectionLimits, MqttCounters
from broker_plugin.link import MqttLink, Transport
from endpoint_core.service import EndpointService

log = logging.getLogger("endpoint_broker.mqtt")

TRANSPORTS = ("tcp", "tls", "websocket")


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """The broker's part of config.settings.Settings, where every default lives."""

    host: str
    port: int  # plain MQTT; 0 turns it off
    limits: ConnectionLimits
    max_pending_connects: int
    client_publish_allow: tuple[str, ...]
    ssl_context: ssl.SSLContext | None = None  # MQTT over TLS on tls_port, when given
    tls_port: int = 0

    def listeners(self) -> list[Listener]:
        listeners = []
        if self.port:
            listeners.append(Listener(self.host, self.port))
        if self.ssl_context is not None:
            listeners.append(Listener(self.host, self.tls_port, self.ssl_context))
        return listeners


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MqttRuntime:
    def __init__(self, service: EndpointService, settings: MqttSettings) -> None:
        self._service = service
        self._settings = settings
        self.broker: EndpointBroker | None = None
        # Outlives the broker object, so counters never go back to zero while the process lives.
        self.counters = MqttCounters()

    @property
    def ready(self) -> bool:
        return self.broker is not None and self.broker.transitions.state == "started"

    def broker_config(self) -> dict[str, Any]:
        return {
            # amqtt requires a "default" listener; without a `bind` it opens nothing.
            "listeners": {"default": {"type": "external"}},
            # Replaces amqtt's default plugins: no anonymous auth, no $SYS.
            "plugins": {
                "broker_plugin.plugin.EndpointPlugin": {
                    "service": self._service,
                    "client_publish_allow": list(self._settings.client_publish_allow),
                },
            },
        }

    async def start(self) -> None:
        s = self._settings
        # amqtt's Broker must be created inside the running loop.
        self.broker = EndpointBroker(self.broker_config(), s.listeners(), s.limits, s.max_pending_connects,
                                     counters=self.counters)
        await self.broker.start()
        for listener in s.listeners():
            log.info("MQTT broker listening on %s (%s)", _bind(listener.host, listener.port),
                     listener.transport_name.upper())

    def stop_accepting(self) -> None:
        """Close the MQTT listeners (the first step of a drain); connections stay until stop()."""
        if self.broker is not None:
            self.broker.stop_accepting()

    async def stop(self) -> None:
        if self.ready:
            assert self.broker is not None
            await self.broker.shutdown()

    def stats(self) -> dict[str, int]:
        """Open MQTT connections, and how many of them still await their CONNECT."""
        if self.broker is None:
            return {"connections": 0, "pendingConnects": 0}
        return {"connections": len(self.broker.links), "pendingConnects": self.broker.pending_connects}

    def connections_by_transport(self) -> dict[str, int]:
        """Open MQTT connections by transport ("tcp", "tls", "websocket")."""
        counts = dict.fromkeys(TRANSPORTS, 0)
        for link in self.broker.links if self.broker is not None else ():
            counts[link.transport_name] = counts.get(link.transport_name, 0) + 1
        return counts

    def open_link(self, transport: Transport, peer: str, transport_name: str) -> MqttLink | None:
        """A link for a connection that arrived elsewhere (MQTT over WebSocket); None if refused."""
        if self.broker is None or not self.ready:
            return None
        return self.broker.open_link(transport, peer, transport_name)
