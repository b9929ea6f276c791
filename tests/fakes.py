"""Test doubles for the unit tests of the core: a clock the test moves, and a transport link that records."""

from __future__ import annotations

from dataclasses import dataclass, field

from endpoint_core.endpoint import DisconnectReason


class FakeClock:
    """The table's monotonic clock, moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class FakeLink:
    """Records what the core asks of an MQTT connection (a stand-in for the network, not for our code)."""

    sent: list[tuple[str, bytes, int, int | None, bool]] = field(default_factory=list)
    closed: list[DisconnectReason] = field(default_factory=list)
    accepts: bool = True  # False: the connection can no longer carry a PUBLISH
    transport_name: str = "tcp"

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool:
        if self.accepts:
            self.sent.append((topic, payload, qos, packet_id, dup))
        return self.accepts

    def close(self, reason: DisconnectReason) -> None:
        self.closed.append(reason)

    @property
    def payloads(self) -> list[bytes]:
        return [payload for _, payload, _, _, _ in self.sent]
