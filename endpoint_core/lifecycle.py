"""Lifecycle events: what backends learn when endpoints come and go.

The table produces them inside its state transitions (EndpointTable._emit), so no path
can change an endpoint's state without its event; observers (delivery to MQTT and the
webhook, the dashboard's stream, metrics) subscribe to the table. An observer is called
synchronously and must neither block nor call back into the table.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from endpoint_core.clock import iso_instant


class LifecycleType(enum.StrEnum):
    REGISTERED = "UserEndpointRegisteredEvent"
    STATE_CHANGED = "UserEndpointStateChangedEvent"
    CONNECTED = "UserEndpointConnectedEvent"
    DISCONNECTED = "UserEndpointDisconnectedEvent"
    UNREGISTERED = "UserEndpointUnregisteredEvent"


class RandomIds:
    """Random (version 4) UUIDs, as text.

    uuid.uuid4() makes a system call for 16 bytes and a UUID object per id; a CONNECT emits two
    or three events, and that was a tenth of its CPU. This draws from the same source
    (os.urandom), 4 KB at a time.
    """

    POOL_BYTES = 16 * 256

    def __init__(self) -> None:
        self._pool = b""
        self._offset = self.POOL_BYTES

    def __call__(self) -> str:
        if self._offset >= self.POOL_BYTES:
            self._pool, self._offset = os.urandom(self.POOL_BYTES), 0
        raw = bytearray(self._pool[self._offset:self._offset + 16])
        self._offset += 16
        raw[6] = raw[6] & 0x0F | 0x40  # version 4
        raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


new_event_id = RandomIds()


# Not frozen: a frozen dataclass sets each of its 13 fields through object.__setattr__, and a
# CONNECT makes two or three of these (about 12 us of its CPU). Nothing changes one once made.
@dataclass(slots=True, eq=False)
class LifecycleEvent:
    type: LifecycleType
    at: float  # Unix time
    endpoint_id: str
    user_id: str
    organization_id: str
    state: str
    version: int
    origin: str  # "REST" or "MQTT"
    keep_alive_seconds: int
    previous_state: str | None = None  # STATE_CHANGED
    reason: str | None = None  # DISCONNECTED (a DisconnectReason), UNREGISTERED (a RemovalReason)
    transport: str | None = None  # CONNECTED: "tcp", "tls" or "websocket"
    # One id per event, the same in every copy (MQTT, webhook, stream), so receivers can deduplicate.
    # Drawn when first read (`id`): most events are only counted, and a CONNECT makes two or three.
    drawn_id: str | None = None

    @property
    def id(self) -> str:
        if self.drawn_id is None:
            self.drawn_id = new_event_id()
        return self.drawn_id

    def to_json(self) -> dict[str, Any]:
        """The platform's event shape: type, timestamp, id, then the endpoint's fields."""
        body: dict[str, Any] = {
            "type": self.type.value,
            "timestamp": iso_instant(self.at),
            "id": self.id,
            "userId": self.user_id,
            "userEndpointId": self.endpoint_id,
            "organizationId": self.organization_id,
            "state": self.state,
            "version": self.version,
            "origin": self.origin,
            "keepAliveSeconds": self.keep_alive_seconds,
        }
        if self.previous_state is not None:
            body["previousState"] = self.previous_state
        if self.reason is not None:
            body["reason"] = self.reason
        if self.transport is not None:
            body["transport"] = self.transport
        return body
