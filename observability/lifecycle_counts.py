"""Counts of lifecycle transitions by closed label sets, fed by the table's observers.

Transitions are rare next to packets (one per registration, connection or state change),
so a small dict per family is cheap here.
"""

from __future__ import annotations

from endpoint_core.endpoint import DisconnectReason, EndpointState, Origin, RemovalReason
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType

TRANSPORTS = ("tcp", "tls", "websocket")
REGISTRATION_RESULTS = ("created", "updated")


# A reason's label value is its enum name: "no CONNECT in time" -> "connect_timeout".
_LABELS: dict[str, str] = {str(reason.value): reason.name.lower() for reason in (*DisconnectReason, *RemovalReason)}


def label(reason: str) -> str:
    return _LABELS.get(reason, "other")


class LifecycleCounts:
    """An observer of EndpointTable: registrations, removals, state changes, connects, disconnects."""

    def __init__(self) -> None:
        self.registrations = {(o.name, r): 0 for o in Origin for r in REGISTRATION_RESULTS}
        self.removals = {label(r.value): 0 for r in RemovalReason}
        self.state_changes = {(a.value, b.value): 0 for a in EndpointState for b in EndpointState if a is not b}
        self.connects = dict.fromkeys(TRANSPORTS, 0)
        self.disconnects = {label(r.value): 0 for r in DisconnectReason}

    def __call__(self, event: LifecycleEvent) -> None:
        kind = event.type
        if kind is LifecycleType.REGISTERED:
            # The table emits REGISTERED for a new endpoint (version 0) and for a changed re-registration.
            key = (event.origin, "created" if event.version == 0 else "updated")
            self.registrations[key] = self.registrations.get(key, 0) + 1
        elif kind is LifecycleType.UNREGISTERED:
            _bump(self.removals, label(event.reason or "unknown"))
        elif kind is LifecycleType.STATE_CHANGED:
            key = (event.previous_state or "", event.state)
            self.state_changes[key] = self.state_changes.get(key, 0) + 1
        elif kind is LifecycleType.CONNECTED:
            _bump(self.connects, event.transport or "unknown")
        elif kind is LifecycleType.DISCONNECTED:
            _bump(self.disconnects, label(event.reason or "unknown"))


def _bump(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1
