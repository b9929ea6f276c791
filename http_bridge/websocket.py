"""MQTT over WebSocket at /ws, on the HTTP port: the platform's clients and browsers connect here."""

from __future__ import annotations

import contextlib

from starlette.websockets import WebSocket

# Offered by MQTT clients in Sec-WebSocket-Protocol; the first one offered that we know is chosen.
MQTT_SUBPROTOCOLS = ("mqtt", "mqttv3.1")


class StarletteChannel:
    """A MessageChannel (see broker_plugin.websocket) over a Starlette WebSocket."""

    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._closed = False
        client = websocket.client
        self.peer = (client.host, client.port) if client else None

    async def receive(self) -> bytes:
        while not self._closed:
            message = await self._websocket.receive()
            if message["type"] == "websocket.disconnect":
                self._closed = True
                break
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if data:
                return bytes(data)
        return b""

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionError("websocket closed")
        await self._websocket.send_bytes(data)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                await self._websocket.close()


async def mqtt_over_websocket(websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols") or []
    chosen = next((p for p in offered if p in MQTT_SUBPROTOCOLS), None)
    await websocket.accept(subprotocol=chosen)
    await websocket.app.state.mqtt.serve_websocket(StarletteChannel(websocket))
