"""A bounded per-endpoint queue of QoS 1 events awaiting PUBACK.

amqtt drops an unacknowledged QoS 1 message after 5 s, so at-least-once is kept
here: an event leaves the outbox only when every PUBLISH sent for it has been
acknowledged, or when its endpoint dies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_PACKET_ID = 65535
# Packet ids are split per connection: an endpoint's own events use the low range (two topic
# forms x at most 30000 queued events), a lifecycle subscription (endpoint_core.feeds) the rest,
# so one PUBACK can never be taken for the other's.
ENDPOINT_PACKET_IDS = (1, 60_000)
LIFECYCLE_PACKET_IDS = (60_001, MAX_PACKET_ID)


@dataclass(slots=True, eq=False)
class PendingEvent:
    payload: bytes
    seq: int = 0  # the table's number for it, which names it in the store
    # PUBLISHes sent on the current link and not yet acknowledged: packet id -> topic.
    unacked: dict[int, str] = field(default_factory=dict)
    sent_at: float | None = None  # None: not yet sent on the current link
    sends: int = 0  # how many times it was sent on any link, for the DUP flag


class Outbox:
    """Ordered pending events, bounded by count and payload bytes."""

    __slots__ = ("_by_packet", "_bytes", "_next_packet_id", "_packet_ids", "_pending", "_unsent", "max_bytes",
                 "max_count")

    def __init__(self, max_count: int, max_bytes: int, packet_ids: tuple[int, int] = ENDPOINT_PACKET_IDS) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._packet_ids = packet_ids
        self._pending: dict[int, PendingEvent] = {}  # id(event) -> event, in arrival order
        # Not yet sent on the current link, oldest first. Sending is in order, so
        # this is always a suffix of `_pending`, and flushing costs O(sent), not
        # O(queue), even for a slow consumer with a long queue.
        self._unsent: deque[PendingEvent] = deque()
        self._by_packet: dict[int, PendingEvent] = {}
        self._bytes = 0
        self._next_packet_id = packet_ids[1]  # the first allocated is the range's first

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Events sent on the current link and awaiting their PUBACKs."""
        return len(self._pending) - len(self._unsent)

    def offer(self, payload: bytes, seq: int = 0, sends: int = 0) -> PendingEvent | None:
        """Queue an event, or return None when the queue is full.

        `sends` > 0 marks an event that may have been sent before (restored after a restart),
        so that it goes out with DUP.
        """
        size = len(payload)
        if len(self._pending) >= self.max_count or self._bytes + size > self.max_bytes:
            return None
        event = PendingEvent(payload, seq, sends=sends)
        self._pending[id(event)] = event
        self._unsent.append(event)
        self._bytes += size
        return event

    def next_unsent(self) -> PendingEvent | None:
        """The oldest event not yet sent on the current link."""
        return self._unsent[0] if self._unsent else None

    def mark_sent(self, event: PendingEvent, now: float) -> bool:
        """`event`, the oldest unsent one, has just been sent on the current link.

        True when that completed it: every copy went out at QoS 0, so nothing will
        acknowledge it, and it left the outbox.
        """
        assert self._unsent[0] is event
        self._unsent.popleft()
        event.sends += 1
        event.sent_at = now
        if event.unacked:
            return False
        self._remove(event)
        return True

    def mark_resent(self, event: PendingEvent, now: float) -> None:
        """`event`'s unacknowledged PUBLISHes have just been sent again (DUP)."""
        event.sends += 1
        event.sent_at = now

    def overdue(self, now: float, timeout: float) -> Iterator[PendingEvent]:
        """Events sent on the current link whose PUBACK is later than `timeout`."""
        return (
            e for e in list(self._pending.values())
            if e.sent_at is not None and e.unacked and now - e.sent_at >= timeout
        )

    def next_retry_at(self, timeout: float) -> float | None:
        times = [e.sent_at for e in self._pending.values() if e.sent_at is not None and e.unacked]
        return min(times) + timeout if times else None

    def allocate_packet_id(self) -> int:
        """A packet id not in use by any unacknowledged PUBLISH (the outbox bound keeps them few)."""
        first, last = self._packet_ids
        while True:
            self._next_packet_id = first if self._next_packet_id >= last else self._next_packet_id + 1
            if self._next_packet_id not in self._by_packet:
                return self._next_packet_id

    def record_send(self, event: PendingEvent, packet_id: int, topic: str) -> None:
        event.unacked[packet_id] = topic
        self._by_packet[packet_id] = event

    def acknowledge(self, packet_id: int) -> PendingEvent | None:
        """Handle a PUBACK. Returns the event it completed, which then left the outbox."""
        event = self._by_packet.pop(packet_id, None)
        if event is None:
            return None
        event.unacked.pop(packet_id, None)
        if event.unacked:
            return None
        self._remove(event)
        return event

    def owns_packet_id(self, packet_id: int) -> bool:
        return self._packet_ids[0] <= packet_id <= self._packet_ids[1]

    def drop_oldest(self) -> PendingEvent | None:
        """Make room: the oldest event leaves, sent or not; a late PUBACK for it is then ignored."""
        if not self._pending:
            return None
        event = next(iter(self._pending.values()))
        for packet_id in event.unacked:
            self._by_packet.pop(packet_id, None)
        event.unacked.clear()
        if self._unsent and self._unsent[0] is event:
            self._unsent.popleft()
        self._remove(event)
        return event

    def _remove(self, event: PendingEvent) -> None:
        if self._pending.pop(id(event), None) is not None:
            self._bytes -= len(event.payload)

    def link_lost(self, keep_packet_ids: bool = False) -> None:
        """The link went away: everything unacknowledged must be sent again on the next one.

        With `keep_packet_ids` (a clean_session=0 client, MQTT 3.1.1 section 4.4) the
        next link resends each unacknowledged PUBLISH under its original packet id.
        """
        if not keep_packet_ids:
            self._by_packet.clear()
        for event in self._pending.values():
            if not keep_packet_ids:
                event.unacked.clear()
            event.sent_at = None
        self._unsent = deque(self._pending.values())
