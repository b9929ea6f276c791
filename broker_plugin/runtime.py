"""Builds, starts and stops the MQTT broker inside the running event loop."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from typing import Any

from broker_plugin.broker import EndpointBroker
from broker_plugin.websocket import ChannelReader, ChannelWriter, MessageChannel
from endpoint_core.service import EndpointService

log = logging.getLogger("endpoint_broker.mqtt")

WEBSOCKET_LISTENER = "ws"
TLS_LISTENER = "tls"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883  # 0: no plain MQTT listener
    tls_port: int = 8883
    ssl_context: ssl.SSLContext | None = None  # None: no MQTT-over-TLS listener
    # Where the HTTP bridge serves MQTT over WebSocket; informational for amqtt.
    websocket_bind: str = "127.0.0.1:8080"
    connect_timeout_seconds: float = 10.0
    max_packet_bytes: int = 256 * 1024
    max_buffered_bytes: int = 4 * 1024 * 1024
    client_publish_allow: tuple[str, ...] = field(default_factory=tuple)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MqttRuntime:
    def __init__(self, service: EndpointService, settings: MqttSettings) -> None:
        self._service = service
        self._settings = settings
        self.broker: EndpointBroker | None = None

    @property
    def ready(self) -> bool:
        return self.broker is not None and self.broker.transitions.state == "started"

    def broker_config(self) -> dict[str, Any]:
        s = self._settings
        # amqtt requires a "default" listener; one without a bind address opens no socket.
        listeners: dict[str, dict[str, Any]] = {
            "default": {"type": "tcp", "bind": _bind(s.host, s.port) if s.port else None},
            WEBSOCKET_LISTENER: {"type": "external", "bind": s.websocket_bind},
        }
        if s.ssl_context is not None:
            listeners[TLS_LISTENER] = {"type": "tcp", "bind": _bind(s.host, s.tls_port)}
        return {
            "listeners": listeners,
            # Replaces amqtt's default plugins: no anonymous auth, no $SYS.
            "plugins": {
                "broker_plugin.plugin.EndpointPlugin": {
                    "service": self._service,
                    "client_publish_allow": list(s.client_publish_allow),
                },
            },
        }

    async def start(self) -> None:
        s = self._settings
        # amqtt's Broker must be created inside the running loop.
        self.broker = EndpointBroker(
            self.broker_config(),
            connect_timeout_seconds=s.connect_timeout_seconds,
            max_packet_bytes=s.max_packet_bytes,
            max_buffered_bytes=s.max_buffered_bytes,
            listener_ssl={} if s.ssl_context is None else {TLS_LISTENER: s.ssl_context},
        )
        await self.broker.start()
        if s.port:
            log.info("MQTT broker listening on %s (TCP)", _bind(s.host, s.port))
        if s.ssl_context is not None:
            log.info("MQTT broker listening on %s (TLS)", _bind(s.host, s.tls_port))

    async def stop(self) -> None:
        if self.broker is not None and self.broker.transitions.state == "started":
            await self.broker.shutdown()

    def stats(self) -> dict[str, int]:
        """Open connections (also those still before CONNECT) and broker session-table entries."""
        if self.broker is None:
            return {"connections": 0, "sessions": 0}
        return {"connections": len(self.broker.connections), "sessions": len(self.broker.sessions)}

    async def serve_websocket(self, channel: MessageChannel) -> None:
        """Serve one MQTT-over-WebSocket connection until it ends."""
        if self.broker is None:
            await channel.close()
            return
        await self.broker.external_connected(ChannelReader(channel), ChannelWriter(channel), WEBSOCKET_LISTENER)
