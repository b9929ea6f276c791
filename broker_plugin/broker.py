"""EndpointBroker: amqtt's Broker as the home of EndpointPlugin, with our own listeners.

This is the one module that touches amqtt's Broker. amqtt loads the plugin and runs
the broker's start and shutdown events; it opens no listener of its own (its one
required listener has no `bind`), builds no sessions and relays no messages. Every
MQTT connection, over TCP, TLS or WebSocket, is an MqttLink over the sans-IO
MqttConnection: see docs/amqtt.md for what amqtt's own connection path would get
wrong, and why none of it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from cachetools import TTLCache

from broker_plugin.connection import ConnectionLimits, MqttCounters
from broker_plugin.link import MqttLink, Transport
from broker_plugin.plugin import EndpointPlugin
from broker_plugin.tcp import TcpMqttProtocol
from endpoint_core.clock import Clock, monotonic
from endpoint_core.endpoint import DisconnectReason
from endpoint_core.logtext import loggable
from endpoint_core.table import EndpointTable

log = logging.getLogger("endpoint_broker.mqtt")

# Refused connections logged per peer address per minute: a client retrying in a loop
# (or a scan) writes a few lines, not a flood.
REFUSALS_LOGGED_PER_PEER = 20
_REFUSAL_WINDOW_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Listener:
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None

    @property
    def transport_name(self) -> str:
        return "tcp" if self.ssl_context is None else "tls"


class EndpointBroker(Broker):
    def __init__(
        self,
        config: dict[str, Any],
        listeners: Sequence[Listener],
        limits: ConnectionLimits,
        max_pending_connects: int,
        clock: Clock = monotonic,
        counters: MqttCounters | None = None,
    ) -> None:
        super().__init__(config)
        plugins = [p for p in self.plugins_manager.plugins if isinstance(p, EndpointPlugin)]
        if len(plugins) != 1:
            raise ValueError("EndpointBroker needs exactly one EndpointPlugin in its plugins")
        self.plugin: EndpointPlugin = plugins[0]
        self.table: EndpointTable = self.plugin.table
        self.limits = limits
        self.clock = clock
        self.counters = counters or MqttCounters()
        self._listeners = tuple(listeners)
        self._tcp_servers: list[asyncio.AbstractServer] = []
        self._max_pending = max_pending_connects
        self.pending_connects = 0
        # Every open link, including those still waiting for CONNECT.
        self.links: set[MqttLink] = set()
        # address -> [refusals in the window]; mutated in place, so the window is fixed, not sliding.
        self._refusals_by_peer: TTLCache[str, list[int]] = TTLCache(
            maxsize=10_000, ttl=_REFUSAL_WINDOW_SECONDS, timer=time.monotonic
        )

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            name = listener.transport_name
            server = await loop.create_server(
                lambda name=name: TcpMqttProtocol(self, name),
                listener.host, listener.port, reuse_address=True, ssl=listener.ssl_context,
            )
            self._tcp_servers.append(server)

    def stop_accepting(self) -> None:
        for server in self._tcp_servers:
            server.close()

    async def shutdown(self) -> None:
        self.stop_accepting()
        for link in list(self.links):
            link.close(DisconnectReason.SHUTDOWN)
        await super().shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # let the closed transports call connection_lost

    # ------------------------------------------------------------ links

    def open_link(self, transport: Transport, peer: str, transport_name: str) -> MqttLink | None:
        """A new connection's link, or None when too many connections await their CONNECT."""
        if self.pending_connects >= self._max_pending:
            self._log_for_peer(peer, f"refused a connection from {peer}: {self.pending_connects} connections "
                                     "already await their CONNECT (mqtt_max_pending_connects)")
            return None
        self.pending_connects += 1
        link = MqttLink(self, transport, peer, transport_name)
        self.links.add(link)
        return link

    # LinkHost
    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, callback)

    def committed(self) -> asyncio.Future[None]:
        store = self.plugin.service.store
        if store is not None:
            return store.committed()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def connect_settled(self, link: MqttLink) -> None:
        self.pending_connects -= 1

    def link_ended(self, link: MqttLink) -> None:
        self.links.discard(link)

    def log_refused_connect(self, link: MqttLink, client_id: str, code: int, reason: str) -> None:
        what = f"CONNACK {code}" if code >= 0 else "closed"
        self._log_for_peer(link.peer, f"refused CONNECT of {loggable(client_id)} from {link.peer}: {what} "
                                      f"({loggable(reason, 200)})")

    def _log_for_peer(self, peer: str, line: str) -> None:
        address = peer.rpartition(":")[0] or peer
        counter = self._refusals_by_peer.get(address)
        if counter is None:
            counter = self._refusals_by_peer[address] = [0]
        counter[0] += 1
        count = counter[0]
        if count <= REFUSALS_LOGGED_PER_PEER:
            suffix = "; further refusals from this address are not logged for a minute" \
                if count == REFUSALS_LOGGED_PER_PEER else ""
            log.info("%s%s", line, suffix)
