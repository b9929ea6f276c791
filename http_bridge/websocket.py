"""MQTT over WebSocket at /ws, on the HTTP port: the platform's clients and browsers connect here.

Plain ASGI, driving an MqttLink directly: every binary message is fed to it, and its
bytes go back as binary messages. MQTT over WebSocket is binary only (MQTT 3.1.1,
6.0), so a text message is a protocol violation that closes the connection.

It is served ahead of Starlette's exception middleware, so `send` is the server's
own. With uvicorn that lets the link see the socket's unsent bytes and abort a
client that does not read, exactly as over TCP; under another ASGI server the link
falls back to a WebSocket close.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from starlette.types import Receive, Scope, Send

log = logging.getLogger("endpoint_broker.mqtt")

PATH = "/ws"
# Offered by MQTT clients in Sec-WebSocket-Protocol; the first one offered that we know is chosen.
MQTT_SUBPROTOCOLS = ("mqtt", "mqttv3.1")
# 1003: the endpoint received a type of data it cannot accept (RFC 6455, 7.4.1).
CLOSE_UNSUPPORTED_DATA = 1003
# 1013: try again later (too many connections await their CONNECT).
CLOSE_TRY_AGAIN_LATER = 1013


class Link(Protocol):
    """broker_plugin.link.MqttLink, as this module drives it."""

    @property
    def closed(self) -> bool: ...

    def data_received(self, data: bytes) -> None: ...

    def protocol_violation(self, detail: str) -> None: ...

    def connection_lost(self) -> None: ...


class WebSocketTransport:
    """The link's Transport over one ASGI WebSocket.

    `write` is synchronous (the domain publishes from plain function calls), so bytes
    collect here and one flusher task at a time sends them.
    """

    def __init__(self, send: Send) -> None:
        self._send = send
        # uvicorn's protocol object, when `send` is its bound method: its transport can be aborted.
        self._socket: Any = getattr(getattr(send, "__self__", None), "transport", None)
        self._pending = bytearray()
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._pending += data
            self._kick()

    def get_write_buffer_size(self) -> int:
        unsent = len(self._pending)
        if self._socket is not None:
            unsent += self._socket.get_write_buffer_size()
        return unsent

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._kick()

    def abort(self) -> None:
        """Drop what is unsent and end the socket now; the server then reports the disconnect."""
        self._pending.clear()
        if self._flusher is not None:
            self._flusher.cancel()
        if self._socket is not None:
            self._closing = True
            self._socket.abort()
        else:
            self.close()

    def _kick(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                await self._send({"type": "websocket.send", "bytes": data})
            if self._closing:
                await self._send({"type": "websocket.close", "code": 1000})
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the peer went away mid-send: the receive loop sees the disconnect
            log.debug("websocket write failed: %r", exc)
        finally:
            self._flusher = None
        if self._pending and not self._closing:
            self._kick()  # written while the last send was in flight


async def mqtt_over_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    offered = scope.get("subprotocols") or []
    chosen = next((p for p in offered if p in MQTT_SUBPROTOCOLS), None)
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "websocket"
    transport = WebSocketTransport(send)
    link = scope["app"].state.mqtt.open_link(transport, peer, "websocket")
    if link is None:
        await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
        return
    await send({"type": "websocket.accept", "subprotocol": chosen})
    try:
        await _pump(receive, link)
    finally:
        link.connection_lost()


async def _pump(receive: Receive, link: Link) -> None:
    """Feed the link until the WebSocket ends (the peer left, or the link closed or aborted it)."""
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return  # websocket.disconnect
        data = message.get("bytes")
        if data is None:
            link.protocol_violation("a WebSocket text message (MQTT over WebSocket is binary only)")
        elif data:
            link.data_received(data)
