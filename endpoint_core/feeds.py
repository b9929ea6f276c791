"""Lifecycle events over MQTT: who may subscribe to `$events/...`, and delivery to those who did.

The rule: a SERVICE principal whose token names an organisation may subscribe to
`$events/organizations/{that organisation}/endpoints`, at QoS 0 or 1 (2 is granted as 1).
Any other filter under `$events/` is refused: a normal user, another organisation, a
wildcard. (A SERVICE token without an organisation cannot connect over MQTT at all.)

A subscription lives as long as its connection (it is not part of a persistent session).
At QoS 1 it has its own bounded outbox (`max_events`), with packet ids from a range of
their own (endpoint_core.outbox.LIFECYCLE_PACKET_IDS); when it is full the oldest event is
dropped, with a counted warning. Unacknowledged PUBLISHes go out again (DUP) once
`ack_timeout_seconds` have passed, checked whenever the subscriber sends a packet (its
PINGREQs at least) or a new event arrives.

`LifecycleFeeds` is a table observer: it only writes to links, which never call back
into the table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from endpoint_core.clock import Clock, monotonic
from endpoint_core.lifecycle import LifecycleEvent
from endpoint_core.outbox import LIFECYCLE_PACKET_IDS, Outbox
from endpoint_core.principals import Principal

log = logging.getLogger("endpoint_broker.lifecycle")

EVENTS_PREFIX = "$events/"
# Lifecycle events are a few hundred bytes; the count is the bound that matters.
_MAX_EVENT_BYTES = 64 * 1024
# A counted warning for the first drop, then one per this many.
DROP_WARNING_EVERY = 100
# The default bound of a QoS 1 subscription's queue (lifecycle_mqtt_queue_max_events).
DEFAULT_MAX_EVENTS = 1000


def lifecycle_topic(organization_id: str) -> str:
    return f"$events/organizations/{organization_id}/endpoints"


def is_lifecycle_filter(topic_filter: str) -> bool:
    """Whether a filter is under `$events/`: then `lifecycle_grant` alone decides it."""
    return topic_filter.startswith(EVENTS_PREFIX)


def lifecycle_grant(principal: Principal, topic_filter: str, qos: int) -> int | None:
    """The QoS granted for a subscription under `$events/`, or None (SUBACK 0x80)."""
    if not principal.is_service or principal.organization_id is None:
        return None
    if topic_filter != lifecycle_topic(principal.organization_id):
        return None  # another organisation, a wildcard, or anything else under $events/
    return min(qos, 1)


class FeedLink(Protocol):
    """The part of an MQTT link a feed writes to (endpoint_core.endpoint.EndpointLink has it)."""

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int | None, dup: bool) -> bool: ...


@dataclass(slots=True, eq=False)
class Feed:
    link: FeedLink
    organization_id: str
    qos: int
    outbox: Outbox | None = None  # QoS 1 only
    dropped: int = 0


@dataclass(slots=True)
class FeedStats:
    delivered: int = 0
    dropped: int = 0
    subscribers: int = 0


@dataclass(slots=True)
class LifecycleFeeds:
    max_events: int = DEFAULT_MAX_EVENTS
    ack_timeout_seconds: float = 10.0
    clock: Clock = monotonic
    stats: FeedStats = field(default_factory=FeedStats)
    # organisation -> id(link) -> its feed. Keyed by identity; the feed holds the link, so the id
    # cannot be reused before the feed is dropped (at the latest when its connection ends).
    _by_org: dict[str, dict[int, Feed]] = field(default_factory=dict)
    _by_link: dict[int, Feed] = field(default_factory=dict)

    # -------------------------------------------------------- subscriptions

    def subscribe(self, principal: Principal, link: FeedLink, topic_filter: str, qos: int) -> int | None:
        """Grant (and start) a subscription, or None. Subscribing again changes its QoS, as in MQTT."""
        granted = lifecycle_grant(principal, topic_filter, qos)
        if granted is None:
            return None
        assert principal.organization_id is not None
        key = id(link)
        self._drop(key)
        feed = Feed(link, principal.organization_id, granted)
        if granted == 1:
            feed.outbox = Outbox(self.max_events, self.max_events * _MAX_EVENT_BYTES, LIFECYCLE_PACKET_IDS)
        self._by_link[key] = feed
        self._by_org.setdefault(feed.organization_id, {})[key] = feed
        self.stats.subscribers = len(self._by_link)
        return granted

    def unsubscribe(self, link: FeedLink, topic_filter: str) -> None:
        feed = self._by_link.get(id(link))
        if feed is not None and topic_filter == lifecycle_topic(feed.organization_id):
            self._drop(id(link))

    def link_ended(self, link: FeedLink) -> None:
        self._drop(id(link))

    def _drop(self, key: int) -> None:
        feed = self._by_link.pop(key, None)
        if feed is None:
            return
        subscribers = self._by_org[feed.organization_id]
        del subscribers[key]
        if not subscribers:
            del self._by_org[feed.organization_id]
        self.stats.subscribers = len(self._by_link)

    # --------------------------------------------------------------- delivery

    def __call__(self, event: LifecycleEvent) -> None:
        """The table observer: each subscriber of the event's organisation gets it."""
        subscribers = self._by_org.get(event.organization_id)
        if not subscribers:
            return
        payload = orjson.dumps(event.to_json())
        topic = lifecycle_topic(event.organization_id)
        now = self.clock()
        for feed in list(subscribers.values()):
            if feed.outbox is None:
                if feed.link.publish(topic, payload, 0, None, False):
                    self.stats.delivered += 1
                continue
            if len(feed.outbox) >= feed.outbox.max_count:
                feed.outbox.drop_oldest()
                feed.dropped += 1
                self.stats.dropped += 1
                if feed.dropped % DROP_WARNING_EVERY == 1:
                    log.warning("lifecycle subscriber of organisation %s does not acknowledge: its queue of %d "
                                "is full, oldest event dropped (%d dropped so far)",
                                feed.organization_id, feed.outbox.max_count, feed.dropped)
            feed.outbox.offer(payload)
            self._redeliver(feed, now)
            self._flush(feed, topic, now)

    def acknowledge(self, link: FeedLink, packet_id: int) -> bool:
        """A PUBACK. True when it was one of the feed's packet ids (else it is the endpoint's own)."""
        feed = self._by_link.get(id(link))
        if feed is None or feed.outbox is None or not feed.outbox.owns_packet_id(packet_id):
            return False
        if feed.outbox.acknowledge(packet_id) is not None:
            self.stats.delivered += 1
        return True

    def touch(self, link: FeedLink) -> None:
        """The subscriber sent a packet: a chance to resend what is overdue."""
        feed = self._by_link.get(id(link))
        if feed is not None and feed.outbox is not None and len(feed.outbox):
            self._redeliver(feed, self.clock())

    @staticmethod
    def _flush(feed: Feed, topic: str, now: float) -> None:
        outbox = feed.outbox
        assert outbox is not None
        while (pending := outbox.next_unsent()) is not None:
            packet_id = outbox.allocate_packet_id()
            if not feed.link.publish(topic, pending.payload, 1, packet_id, pending.sends > 0):
                return
            outbox.record_send(pending, packet_id, topic)
            outbox.mark_sent(pending, now)

    def _redeliver(self, feed: Feed, now: float) -> None:
        outbox = feed.outbox
        assert outbox is not None
        for pending in outbox.overdue(now, self.ack_timeout_seconds):
            if not all(feed.link.publish(topic, pending.payload, 1, packet_id, True)
                       for packet_id, topic in pending.unacked.items()):
                return
            outbox.mark_resent(pending, now)
