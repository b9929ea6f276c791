"""The user endpoint record and what the outside world sees of it."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from endpoint_core.clock import iso_instant
from endpoint_core.outbox import Outbox


class EndpointState(enum.StrEnum):
    HEALTHY = "HEALTHY"
    SICK = "SICK"
    # In the spec's enum. Only a restart produces it (EndpointTable.restore): until its first
    # keepalive nobody knows; otherwise an endpoint is HEALTHY or SICK, and gone once expired.
    UNKNOWN = "UNKNOWN"


class Origin(enum.Enum):
    """Who created the endpoint: a REST registration or an MQTT CONNECT."""

    REST = "rest"
    MQTT = "mqtt"


class DisconnectReason(enum.StrEnum):
    """Why a connection ended: one closed set for the table, log lines, metrics and lifecycle events."""

    CLEAN = "clean"  # the client sent DISCONNECT
    DROPPED = "dropped"  # the transport went away without DISCONNECT
    PROTOCOL_VIOLATION = "protocol violation"
    CONNECT_TIMEOUT = "no CONNECT in time"
    CONNECT_REFUSED = "connect refused"
    TOKEN_EXPIRED = "token expired"  # noqa: S105 - a reason, not a secret
    TAKEN_OVER = "taken over"
    SLOW_READER = "slow reader"
    UNREGISTERED = "unregistered"
    EXPIRED = "expired"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal error"


class RemovalReason(enum.StrEnum):
    """Why an endpoint left the table."""

    UNREGISTERED = "unregistered"
    EXPIRED = "expired"
    DISCONNECTED = "disconnected"  # a clean MQTT DISCONNECT of an endpoint MQTT made


class EndpointLink(Protocol):
    """A live transport session (an MQTT connection) attached to an endpoint.

    The table calls it synchronously from the event loop; neither method may block,
    and neither may call back into the table before it returns: a link detaches
    itself later, from its transport's `connection_lost` (a separate loop callback).
    """

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool:
        """Write one PUBLISH. False when the link can no longer carry it (closing, or stuck)."""
        ...

    def close(self, reason: DisconnectReason) -> None:
        """Start closing the connection. The link detaches itself later, never from inside this call."""
        ...

    @property
    def transport_name(self) -> str:
        """How the client is connected: "tcp", "tls" or "websocket"."""
        ...


def endpoint_topics(endpoint_id: str, user_id: str) -> tuple[str, str]:
    """The topics an endpoint may subscribe to: the spec's form and the per-user form."""
    return f"users/endpoints/{endpoint_id}", f"user/{user_id}/{endpoint_id}"


def endpoint_id_of_topic(topic: str) -> tuple[str, str | None] | None:
    """(endpoint id, user id or None) of a topic in one of the two forms above, else None."""
    levels = topic.split("/")
    if len(levels) == 3 and levels[0] == "users" and levels[1] == "endpoints":
        return levels[2], None
    if len(levels) == 3 and levels[0] == "user":
        return levels[2], levels[1]
    return None


@dataclass(slots=True, eq=False)
class UserEndpoint:
    id: str
    user_id: str
    organization_id: str
    keep_alive_seconds: int
    server_keep_alive_reminder_on: bool
    origin: Origin
    last_keepalive: float  # table clock (monotonic seconds)
    state: EndpointState = EndpointState.HEALTHY
    version: int = 0
    reminder_sent: bool = False
    link: EndpointLink | None = None
    # The MQTT keep-alive of the attached link (0: none); None without a link.
    link_keep_alive: int | None = None
    # When the attached link connected (table clock); None without a link.
    connected_since: float | None = None
    # Topic -> granted QoS (0 or 1) on the current link, in subscription order.
    # Kept across links only for clean_session=0 clients (see EndpointTable.connect).
    subscriptions: dict[str, int] = field(default_factory=dict)
    persistent_session: bool = False
    # Created on the first QoS 1 event: idle endpoints carry no queue.
    outbox: Outbox | None = None
    removed: bool = False
    # The endpoint's one live entry in the table's timer heap (0: none).
    timer_token: int = 0
    timer_at: float = math.inf

    def owns_topic(self, topic: str) -> bool:
        """Whether `topic` is one of this endpoint's own topics (the only ones it may subscribe to)."""
        return topic in endpoint_topics(self.id, self.user_id)

    def view(self, now: float) -> dict[str, Any]:
        """The endpoint's view; `now` is on the table's clock, which `last_keepalive` and
        `connected_since` use."""
        connected_since = self.connected_since
        return endpoint_view(self, self.link is not None,
                             None if connected_since is None else time.time() - (now - connected_since),
                             now - self.last_keepalive)


def endpoint_view(endpoint: UserEndpoint, connected: bool, connected_since: float | None,
                  keepalive_ago: float) -> dict[str, Any]:
    """The spec's UserEndpointView, plus read-only extras operators asked for (one place for both
    a process's own endpoints and a cluster's, cluster.directory). `connected_since`: Unix time."""
    return {
        "id": endpoint.id,
        "userId": endpoint.user_id,
        "organizationId": endpoint.organization_id,
        "keepAliveSeconds": endpoint.keep_alive_seconds,
        "state": endpoint.state.value,
        "version": endpoint.version,
        "serverKeepAliveReminderOn": endpoint.server_keep_alive_reminder_on,
        "connected": connected,
        "connectedSince": None if connected_since is None else iso_instant(connected_since),
        "lastKeepaliveAgoSeconds": max(0, int(keepalive_ago)),
    }
