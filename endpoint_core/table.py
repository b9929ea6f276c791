"""The endpoint table: every registered endpoint, its keepalive schedule and its delivery queue.

Everything here is synchronous and runs on the event loop thread, so each method
keeps the table's invariants on its own, whatever order the transport callbacks
arrive in:

- an endpoint id maps to exactly one owner (user and organisation);
- an endpoint has at most one live link; a link that was replaced or removed
  can no longer change anything (every link-bound call compares identities);
- a removed endpoint has no link, no queue and no pending timer;
- the table never re-enters itself: a link it calls (`publish`, `close`) never
  calls back into the table before returning. A closed link detaches later,
  from its transport's `connection_lost`, through `disconnect`, which ignores a
  link that is no longer the endpoint's. So no method here needs defensive
  copies or a particular order of its own steps to stay correct.

Every change a restart must see goes to the journal (endpoint_core.journal) from
`_journal_endpoint`, `_journal_removal` and the event helpers, called inside the
transitions themselves, so no path can change that state without recording it.
Restored endpoints come back UNKNOWN, with their version up by one.

While an MQTT connection is attached, the endpoint lives at least as long as
MQTT's own rule would keep that connection (1.5 x its keep-alive): its period is
the longer of `keepAliveSeconds` and the connection's keep-alive, and a
keep-alive of 0 (no keep-alive, in MQTT) keeps it for as long as it is
connected. Once the connection is gone, `keepAliveSeconds` alone counts again.

Expiry runs from a heap with one live entry per endpoint. A keepalive only moves
`last_keepalive` forward, which can only make the endpoint's next event later, so
it costs O(1) and leaves the heap alone; when the old entry comes due, the
endpoint is looked at and re-armed for its real next event. Arming an earlier
entry (a QoS 1 redelivery timer, a shorter keepalive) leaves the old entry
behind, stale; the heap is rebuilt from the live entries whenever stale ones
outnumber them, so it stays O(endpoints) however long the keepalives are.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cachetools import TTLCache

from endpoint_core.clock import Clock, monotonic, wall_time_of
from endpoint_core.counting import ACK_BUCKETS, SECONDS_BUCKETS, BucketCounts
from endpoint_core.endpoint import (
    DisconnectReason,
    EndpointLink,
    EndpointState,
    Origin,
    RemovalReason,
    UserEndpoint,
)
from endpoint_core.errors import Conflict, Forbidden, InvalidInput
from endpoint_core.ids import new_endpoint_id, require_endpoint_id
from endpoint_core.journal import (
    Change,
    DeleteEndpoint,
    DeleteEvent,
    EndpointRecord,
    PutEndpoint,
    PutEvent,
    Snapshot,
    StoredEvent,
)
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType
from endpoint_core.outbox import Outbox, PendingEvent
from endpoint_core.reminders import keepalive_reminder

log = logging.getLogger("endpoint_broker.table")


# The refusals of the table's ownership rules, also made by a cluster node for what Redis decided.
def id_taken(endpoint_id: str, field: str) -> Conflict:
    # Nothing about the owner (not even whether it is in the caller's organisation): ids are
    # global, and a 409 must not become a probe across organisations.
    return Conflict(f"endpoint id {endpoint_id!r} is taken; choose another (use a UUID)", field)


def too_many_endpoints(count: int, field: str) -> Conflict:
    return Conflict(f"the user already has {count} endpoints, the most allowed; unregister one first", field)


def logged_out(endpoint_id: str) -> Forbidden:
    return Forbidden(f"endpoint {endpoint_id!r} was logged out; reconnecting is refused for a while", "client id")

MAX_TIMERS_PER_PASS = 2000


@dataclass(frozen=True, slots=True)
class TablePolicy:
    max_keep_alive_seconds: int = 86_400
    # keepAliveSeconds for an endpoint made by an MQTT CONNECT with keep-alive 0.
    default_mqtt_keep_alive_seconds: int = 60
    # An endpoint expires this long after its deadline: max(minimum, ratio * keepAliveSeconds).
    expiry_grace_ratio: float = 0.5
    min_expiry_grace_seconds: float = 1.0
    # The reminder goes out at this fraction of keepAliveSeconds after the last keepalive.
    reminder_ratio: float = 2 / 3
    queue_max_events: int = 1000
    queue_max_bytes: int = 1 << 20
    # An unacknowledged QoS 1 PUBLISH is sent again (DUP) after this long.
    ack_timeout_seconds: float = 10.0
    # Bounds what one user can pin in memory (endpoints x their queues).
    max_endpoints_per_user: int = 100
    # How long an unregister with `"block": true` refuses CONNECTs for the id (a logout that sticks).
    unregister_block_seconds: float = 60.0
    # A regular expression every new endpoint id must fully match (REST and CONNECT); None: any id.
    endpoint_id_pattern: str | None = None


@dataclass(slots=True)
class TableStats:
    """Plain counters on hot paths, read at scrape time (no lock, no labelled lookup per packet)."""

    keepalives_rest: int = 0
    keepalives_mqtt: int = 0
    # Event copies (one PUBLISH per subscribed topic form), first sends and DUP resends.
    copies_sent: int = 0
    copies_sent_dup: int = 0
    events_acknowledged: int = 0  # QoS 1 events every PUBLISH of which was acknowledged
    events_redelivered: int = 0  # QoS 1 events sent again after the ack timeout
    dropped_queue_full: int = 0
    dropped_endpoint_removed: int = 0
    # From an event's last send to its last PUBACK.
    ack_seconds: BucketCounts = field(default_factory=lambda: BucketCounts(ACK_BUCKETS))
    # One pass over the due timers (endpoint_core.expiry), in seconds of wall time.
    timer_batch_seconds: BucketCounts = field(default_factory=lambda: BucketCounts(SECONDS_BUCKETS))


class JournalBatch:
    """The table's journal_batch(): a class, not a generator context manager, which cost about
    4 us of every QoS 1 sendEvent. One per table, re-entered by nested batches."""

    __slots__ = ("_depth", "_table")

    def __init__(self, table: EndpointTable) -> None:
        self._table = table
        self._depth = 0

    def __enter__(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._table._batch = []

    def __exit__(self, *_: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            table = self._table
            batch, table._batch = table._batch, None
            if batch:
                table._journal.append(batch)


@dataclass(slots=True)
class DeliveryReport:
    delivered: int = 0  # QoS 0: written to a live subscription. QoS 1: queued or sent.
    full: list[str] = field(default_factory=list)  # endpoints whose queue could not take it


class Journal(Protocol):
    """Where the table records changes (endpoint_core.journal.Store.append).

    A journal whose `discards_changes` is true (the memory store) keeps nothing, so the table
    does not make the records of QoS 1 events for it: one to put and one to delete per event.
    """

    def append(self, changes: Sequence[Change]) -> None: ...


class _NoJournal:
    discards_changes = True

    def append(self, changes: Sequence[Change]) -> None:
        pass


class EndpointTable:
    def __init__(self, policy: TablePolicy | None = None, clock: Clock = monotonic,
                 journal: Journal | None = None) -> None:
        self.policy = policy or TablePolicy()
        self._clock = clock
        self._journal: Journal = _NoJournal()
        self._journals_events = False
        self.journal_to(journal or _NoJournal())
        # Changes held back by journal_batch(), to reach the store in one append (so in one commit).
        self._batch: list[Change] | None = None
        self._journal_batch = JournalBatch(self)
        # How many changes were journalled so far: an adapter compares it before and after an
        # operation to know whether its answer must wait for the store.
        self.journalled = 0
        # Called with every lifecycle event, synchronously (endpoint_core.lifecycle).
        self.observers: list[Callable[[LifecycleEvent], None]] = []
        # Called with the events other nodes of a cluster made (cluster.node), for what shows a
        # cluster-wide picture (the MQTT feed, the dashboard); alone, never called.
        self.peer_observers: list[Callable[[LifecycleEvent], None]] = []
        self.stats = TableStats()
        self._event_seq = itertools.count(1)
        self._id_pattern = re.compile(self.policy.endpoint_id_pattern) if self.policy.endpoint_id_pattern else None
        self._by_id: dict[str, UserEndpoint] = {}
        self._by_owner: dict[tuple[str, str], dict[str, UserEndpoint]] = {}
        self._heap: list[tuple[float, int, UserEndpoint]] = []
        self._tokens = itertools.count(1)
        # Endpoint ids whose CONNECTs are refused after a blocking unregister, until a deadline.
        self._blocked: TTLCache[str, bool] = TTLCache(
            maxsize=100_000, ttl=self.policy.unregister_block_seconds, timer=clock
        )
        # Called with the new earliest deadline whenever it moves earlier, so a
        # driver can sleep until exactly then (see endpoint_core.expiry).
        self.on_earlier_deadline: Callable[[float], None] | None = None

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, endpoint_id: str) -> UserEndpoint | None:
        return self._by_id.get(endpoint_id)

    def endpoints_of(self, organization_id: str, user_id: str) -> list[UserEndpoint]:
        return list(self._by_owner.get((organization_id, user_id), {}).values())

    def __iter__(self) -> Iterator[UserEndpoint]:
        return iter(list(self._by_id.values()))

    def view(self, endpoint: UserEndpoint) -> dict[str, Any]:
        """The endpoint's UserEndpointView, its ages counted on the table's clock."""
        return endpoint.view(self._clock())

    # ---------------------------------------------------------- registration

    def admit_registration(self, organization_id: str | None, endpoint_id: str | None,
                           keep_alive_seconds: int) -> tuple[str, str]:
        """(organisation, endpoint id: the given one checked, or a new one) of a REST registration.

        Checks what needs no table state; a cluster node (cluster.service) applies the same before
        it asks Redis for the rest."""
        owner_org = self._require_organization(organization_id)
        self._check_keep_alive(keep_alive_seconds)
        return owner_org, (new_endpoint_id() if endpoint_id is None
                           else require_endpoint_id(endpoint_id, pattern=self._id_pattern))

    def admit_connect(self, organization_id: str | None, endpoint_id: str) -> str:
        """The organisation of a CONNECT whose client id may name an endpoint (as admit_registration)."""
        owner_org = self._require_organization(organization_id)
        require_endpoint_id(endpoint_id, "client id", self._id_pattern)
        return owner_org

    def register(
        self,
        user_id: str,
        organization_id: str | None,
        endpoint_id: str | None,
        keep_alive_seconds: int,
        reminder_on: bool,
    ) -> tuple[UserEndpoint, bool]:
        """Register (or re-register) an endpoint over REST. Returns it and whether it is new."""
        owner_org, endpoint_id = self.admit_registration(organization_id, endpoint_id, keep_alive_seconds)
        now = self._clock()
        endpoint = self._by_id.get(endpoint_id)
        if endpoint is None:
            endpoint = self._create(endpoint_id, user_id, owner_org, keep_alive_seconds, reminder_on,
                                    Origin.REST, now)
            # Registering again over REST is the app's own decision: it lifts a logout block.
            self._blocked.pop(endpoint_id, None)
            return endpoint, True
        self._check_owner(endpoint, user_id, owner_org)
        changed = (endpoint.keep_alive_seconds, endpoint.server_keep_alive_reminder_on, endpoint.origin) \
            != (keep_alive_seconds, reminder_on, Origin.REST)
        # Updated in place; a REST registration also takes ownership of the
        # lifecycle, so a later clean MQTT DISCONNECT no longer unregisters it.
        endpoint.keep_alive_seconds = keep_alive_seconds
        endpoint.server_keep_alive_reminder_on = reminder_on
        endpoint.origin = Origin.REST
        endpoint.version += 1
        self._keepalive(endpoint, now)
        self._arm(endpoint, now)
        self._journal_endpoint(endpoint)
        if changed:
            self._emit(LifecycleType.REGISTERED, endpoint)
        return endpoint, False

    def keepalive(self, endpoint: UserEndpoint) -> None:
        if not endpoint.removed:
            self.stats.keepalives_rest += 1
            self._keepalive(endpoint, self._clock())

    def touch(self, endpoint: UserEndpoint, link: EndpointLink) -> None:
        """Any packet from an attached MQTT client: a keepalive, if `link` is still the live one."""
        if endpoint.link is link:
            self.stats.keepalives_mqtt += 1
            self._keepalive(endpoint, self._clock())

    def remove(self, endpoint: UserEndpoint, reason: RemovalReason, detail: str = "", block: bool = False) -> None:
        """Unregister: drop the endpoint and its queue, and close its connection.

        With `block`, CONNECTs with the endpoint's id are refused for
        `unregister_block_seconds`, so that a client library's automatic
        reconnect cannot bring a logged-out endpoint straight back.
        """
        if endpoint.removed:
            return
        if block:
            self._blocked[endpoint.id] = True
        self._unindex(endpoint)
        if endpoint.outbox is not None and len(endpoint.outbox):
            self.stats.dropped_endpoint_removed += len(endpoint.outbox)
            log.warning(
                "endpoint %s removed (%s) with %d undelivered QoS 1 event(s); they are dropped with it",
                endpoint.id, reason, len(endpoint.outbox),
            )
        endpoint.outbox = None
        endpoint.subscriptions = {}
        link, endpoint.link, endpoint.link_keep_alive = endpoint.link, None, None
        endpoint.connected_since = None
        self.record((DeleteEndpoint(endpoint.id),))
        log.info("endpoint %s removed: %s%s", endpoint.id, reason, f" ({detail})" if detail else "")
        if link is not None:
            closing = DisconnectReason.EXPIRED if reason is RemovalReason.EXPIRED else DisconnectReason.UNREGISTERED
            self._emit(LifecycleType.DISCONNECTED, endpoint, reason=closing)
            link.close(closing)
        self._emit(LifecycleType.UNREGISTERED, endpoint, reason=reason)

    def is_blocked(self, endpoint_id: str) -> bool:
        return endpoint_id in self._blocked

    # ------------------------------------------------------------ MQTT links

    def connect(
        self,
        user_id: str,
        organization_id: str | None,
        endpoint_id: str,
        mqtt_keep_alive: int,
        link: EndpointLink,
        persistent_session: bool,
    ) -> tuple[UserEndpoint, bool]:
        """Attach an authenticated MQTT connection; register the endpoint if it is new.

        Returns the endpoint and the MQTT "session present" flag. A previous link
        of the same endpoint is closed: the newest connection wins.
        """
        owner_org = self.admit_connect(organization_id, endpoint_id)
        if endpoint_id in self._blocked:
            raise logged_out(endpoint_id)
        keep_alive = min(
            mqtt_keep_alive or self.policy.default_mqtt_keep_alive_seconds,
            self.policy.max_keep_alive_seconds,
        )
        now = self._clock()
        endpoint = self._by_id.get(endpoint_id)
        if endpoint is None:
            endpoint = self._create(endpoint_id, user_id, owner_org, keep_alive, False, Origin.MQTT, now)
        else:
            self._check_owner(endpoint, user_id, owner_org)
            # A REST-registered endpoint keeps its settings; one made by MQTT
            # follows its client's current keep-alive.
            if endpoint.origin is Origin.MQTT and endpoint.keep_alive_seconds != keep_alive:
                endpoint.keep_alive_seconds = keep_alive
                endpoint.version += 1
                self._journal_endpoint(endpoint)
            self._keepalive(endpoint, now)
        previous, endpoint.link, endpoint.link_keep_alive = endpoint.link, link, mqtt_keep_alive
        endpoint.connected_since = now
        if previous is not None and previous is not link:
            self._emit(LifecycleType.DISCONNECTED, endpoint, reason=DisconnectReason.TAKEN_OVER)
        self._emit(LifecycleType.CONNECTED, endpoint, transport=link.transport_name)
        self._arm(endpoint, now)
        session_present = persistent_session and endpoint.persistent_session and bool(endpoint.subscriptions)
        stored_session = endpoint.persistent_session and bool(endpoint.subscriptions)
        if not session_present:
            endpoint.subscriptions = {}
        endpoint.persistent_session = persistent_session
        if stored_session and not session_present:
            self._journal_endpoint(endpoint)  # the stored session is gone
        if endpoint.outbox is not None:
            endpoint.outbox.link_lost(keep_packet_ids=session_present)
        if previous is not None and previous is not link:
            previous.close(DisconnectReason.TAKEN_OVER)
        return endpoint, session_present

    def disconnect(self, endpoint: UserEndpoint, link: EndpointLink, reason: DisconnectReason) -> None:
        """The connection `link` ended. A clean DISCONNECT unregisters an MQTT-made endpoint."""
        if endpoint.link is not link:
            return  # replaced by a newer connection, or already removed
        if endpoint.link_keep_alive == 0:
            # Nothing watched a keep-alive-0 connection: its end is its last sign of life.
            endpoint.last_keepalive = self._clock()
        endpoint.link, endpoint.link_keep_alive, endpoint.connected_since = None, None, None
        self._emit(LifecycleType.DISCONNECTED, endpoint, reason=reason)
        if not endpoint.persistent_session:
            endpoint.subscriptions = {}
        if endpoint.outbox is not None:
            endpoint.outbox.link_lost(keep_packet_ids=endpoint.persistent_session)
        if reason is DisconnectReason.CLEAN and endpoint.origin is Origin.MQTT:
            self.remove(endpoint, RemovalReason.DISCONNECTED)
            return
        self._arm(endpoint, self._clock())

    def subscribe(self, endpoint: UserEndpoint, link: EndpointLink, topic_filter: str, qos: int = 1) -> int | None:
        """Subscribe to one of the endpoint's own topics; return the granted QoS, None if refused.

        Events go out at QoS 0 or 1, so a request for QoS 2 is granted QoS 1. Subscribing
        again to the same topic replaces the subscription (and its QoS), as in MQTT.
        """
        if endpoint.link is not link or not endpoint.owns_topic(topic_filter):
            return None
        granted = min(qos, 1)
        if endpoint.subscriptions.get(topic_filter) != granted:
            endpoint.subscriptions[topic_filter] = granted
            if endpoint.persistent_session:
                self._journal_endpoint(endpoint)
        return granted

    def unsubscribe(self, endpoint: UserEndpoint, link: EndpointLink, topic_filter: str) -> None:
        if endpoint.link is link and endpoint.subscriptions.pop(topic_filter, None) is not None \
                and endpoint.persistent_session:
            self._journal_endpoint(endpoint)

    def flush(self, endpoint: UserEndpoint, link: EndpointLink) -> None:
        """Send queued events once the link can take them (after SUBACK, or CONNACK with a session)."""
        if endpoint.link is link:
            self._flush(endpoint, self._clock())

    def acknowledge(self, endpoint: UserEndpoint, link: EndpointLink, packet_id: int) -> None:
        if endpoint.link is link and endpoint.outbox is not None:
            done = endpoint.outbox.acknowledge(packet_id)
            if done is not None:
                self.stats.events_acknowledged += 1
                if done.sent_at is not None:
                    self.stats.ack_seconds.observe(self._clock() - done.sent_at)
                if self._journals_events:
                    self.record((DeleteEvent(endpoint.id, done.seq),))

    # -------------------------------------------------------------- delivery

    def deliver(self, targets: Iterable[UserEndpoint], payload: bytes, qos: int) -> DeliveryReport:
        """Send one event to each target. QoS 1 goes through the endpoint's bounded outbox."""
        report = DeliveryReport()
        now = self._clock()
        if qos == 0 or not self._journals_events:
            self._deliver(targets, payload, qos, report, now)  # nothing to journal
            return report
        with self.journal_batch():  # one append for the whole fan-out
            self._deliver(targets, payload, qos, report, now)
        return report

    def _deliver(self, targets: Iterable[UserEndpoint], payload: bytes, qos: int, report: DeliveryReport,
                 now: float) -> None:
        for endpoint in targets:
            if endpoint.removed:
                continue
            if qos == 1:
                if endpoint.outbox is None:
                    endpoint.outbox = Outbox(self.policy.queue_max_events, self.policy.queue_max_bytes)
                seq = next(self._event_seq)
                if endpoint.outbox.offer(payload, seq) is None:
                    self.stats.dropped_queue_full += 1
                    report.full.append(endpoint.id)
                    continue
                if self._journals_events:
                    self.record((PutEvent(StoredEvent(endpoint.id, seq, payload)),))
                report.delivered += 1
                self._flush(endpoint, now)
            elif self._publish_once(endpoint, payload):
                report.delivered += 1

    def publish_on(self, endpoint: UserEndpoint, topic: str, payload: bytes) -> bool:
        """Best effort on one topic, if the endpoint's live link subscribed to it."""
        link = endpoint.link
        return link is not None and topic in endpoint.subscriptions and link.publish(topic, payload, 0, None, False)

    def _publish_once(self, endpoint: UserEndpoint, payload: bytes) -> bool:
        link = endpoint.link
        if link is None or not endpoint.subscriptions:
            return False
        written = False
        for topic in endpoint.subscriptions:
            if link.publish(topic, payload, 0, None, False):
                self.stats.copies_sent += 1
                written = True
        return written

    def _flush(self, endpoint: UserEndpoint, now: float) -> None:
        link, outbox = endpoint.link, endpoint.outbox
        if link is None or outbox is None or not endpoint.subscriptions:
            return
        sent_any = False
        while (event := outbox.next_unsent()) is not None:
            if not self._send(link, outbox, event, endpoint.subscriptions, self.stats):
                break
            if outbox.mark_sent(event, now) and self._journals_events:  # done: no PUBACK awaited
                self.record((DeleteEvent(endpoint.id, event.seq),))
            sent_any = True
        if sent_any:
            self._arm_at(endpoint, now + self.policy.ack_timeout_seconds)

    @staticmethod
    def _send(link: EndpointLink, outbox: Outbox, event: PendingEvent, subscriptions: dict[str, int],
              stats: TableStats) -> bool:
        """PUBLISH `event` on each subscribed topic form (DUP if it was sent before).

        MQTT delivers at the lower of the event's QoS and the subscription's: a topic
        subscribed at QoS 0 gets the event at QoS 0, with no PUBACK to wait for.
        """
        if event.unacked:
            # Sent before and not all acknowledged (a timeout, or a resumed persistent
            # session): the same PUBLISHes again, under their original packet ids.
            for packet_id, topic in event.unacked.items():
                if not link.publish(topic, event.payload, 1, packet_id, True):
                    return False
                stats.copies_sent_dup += 1
            return True
        dup = event.sends > 0
        for topic, granted in subscriptions.items():
            if granted == 0:
                if not link.publish(topic, event.payload, 0, None, False):
                    return False
                stats.copies_sent += 1
                continue
            packet_id = outbox.allocate_packet_id()
            if not link.publish(topic, event.payload, 1, packet_id, dup):
                return False
            if dup:
                stats.copies_sent_dup += 1
            else:
                stats.copies_sent += 1
            outbox.record_send(event, packet_id, topic)
        return True

    def _redeliver(self, endpoint: UserEndpoint, now: float) -> None:
        link, outbox = endpoint.link, endpoint.outbox
        if link is None or outbox is None:
            return
        for event in outbox.overdue(now, self.policy.ack_timeout_seconds):
            # Same packet ids, DUP set: the client may have missed them or their PUBACKs.
            if not self._send(link, outbox, event, endpoint.subscriptions, self.stats):
                return
            self.stats.events_redelivered += 1
            outbox.mark_resent(event, now)

    # ---------------------------------------------------------------- expiry

    def advance(self, now: float | None = None) -> None:
        """Run every timer that is due: reminders, SICK, expiry and QoS 1 redelivery."""
        now = self._clock() if now is None else now
        # self._heap, not a local: a timer may re-arm and so compact (replace) the heap.
        # At most MAX_TIMERS_PER_PASS at once: after a restart or a mass disconnect thousands of
        # endpoints fall due together, and the rest waits for the next pass rather than the loop.
        handled = 0
        while self._heap and self._heap[0][0] <= now and handled < MAX_TIMERS_PER_PASS:
            handled += 1
            _, token, endpoint = heapq.heappop(self._heap)
            if token != endpoint.timer_token:
                continue  # superseded by a later arm, or the endpoint is gone
            endpoint.timer_token = 0
            endpoint.timer_at = math.inf
            try:
                self._on_timer(endpoint, now)
            except Exception:
                # A failing link must not stop expiry for everyone else, nor leave
                # this endpoint without a timer.
                log.exception("timer of endpoint %s failed; retrying in a second", endpoint.id)
                self._arm_at(endpoint, now + 1.0)

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][1] != heap[0][2].timer_token:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    @staticmethod
    def _period(endpoint: UserEndpoint) -> float:
        """The keepalive period in force: see the module docstring for an attached connection."""
        link_keep_alive = endpoint.link_keep_alive
        if link_keep_alive is None:
            return endpoint.keep_alive_seconds
        if link_keep_alive == 0:
            return math.inf
        return max(endpoint.keep_alive_seconds, link_keep_alive)

    def _deadline(self, endpoint: UserEndpoint) -> float:
        """When the endpoint turns SICK without a keepalive (table clock)."""
        return endpoint.last_keepalive + self._period(endpoint)

    def _grace(self, endpoint: UserEndpoint) -> float:
        p = self.policy
        return max(p.min_expiry_grace_seconds, self._period(endpoint) * p.expiry_grace_ratio)

    def _reminder_at(self, endpoint: UserEndpoint) -> float:
        return endpoint.last_keepalive + self._period(endpoint) * self.policy.reminder_ratio

    def _on_timer(self, endpoint: UserEndpoint, now: float) -> None:
        deadline = self._deadline(endpoint)
        if now >= deadline + self._grace(endpoint):
            self.remove(endpoint, RemovalReason.EXPIRED)
            return
        if now >= deadline:
            if endpoint.state is not EndpointState.SICK:
                previous_state, endpoint.state = endpoint.state, EndpointState.SICK
                endpoint.version += 1
                self._journal_endpoint(endpoint)
                self._emit(LifecycleType.STATE_CHANGED, endpoint, previous_state=previous_state)
                log.info("endpoint %s is SICK: no keepalive for %ss", endpoint.id, self._period(endpoint))
        elif (
            endpoint.server_keep_alive_reminder_on
            and not endpoint.reminder_sent
            and now >= self._reminder_at(endpoint)
        ):
            endpoint.reminder_sent = True
            self._send_reminder(endpoint, deadline)
        if endpoint.outbox is not None:
            self._redeliver(endpoint, now)
        self._arm(endpoint, now)

    def _send_reminder(self, endpoint: UserEndpoint, deadline: float) -> None:
        if endpoint.link is None or not endpoint.subscriptions:
            return
        payload = keepalive_reminder(endpoint.id, endpoint.user_id, wall_time_of(deadline, self._clock))
        self._publish_once(endpoint, payload)

    def _next_event_at(self, endpoint: UserEndpoint, now: float) -> float:
        deadline = self._deadline(endpoint)
        when = deadline + self._grace(endpoint) if now >= deadline else deadline
        if endpoint.server_keep_alive_reminder_on and not endpoint.reminder_sent:
            reminder = self._reminder_at(endpoint)
            if reminder > now:
                when = min(when, reminder)
        if endpoint.outbox is not None:
            retry = endpoint.outbox.next_retry_at(self.policy.ack_timeout_seconds)
            if retry is not None:
                when = min(when, max(retry, now))
        return when

    def _arm(self, endpoint: UserEndpoint, now: float) -> None:
        """Make sure a timer fires no later than the endpoint's next event."""
        self._arm_at(endpoint, self._next_event_at(endpoint, now))

    def _arm_at(self, endpoint: UserEndpoint, when: float) -> None:
        if endpoint.removed or when == math.inf:
            return  # nothing will ever be due (a keep-alive-0 connection); a detach re-arms
        if endpoint.timer_token and endpoint.timer_at <= when:
            return  # the live entry fires earlier and will re-arm
        token = next(self._tokens)
        endpoint.timer_token = token
        endpoint.timer_at = when
        heapq.heappush(self._heap, (when, token, endpoint))
        if len(self._heap) > 2 * len(self._by_id) + 64:
            self._compact()
        if self._heap[0][1] == token and self.on_earlier_deadline is not None:
            self.on_earlier_deadline(when)

    def _compact(self) -> None:
        """Drop stale heap entries: O(n), after at least n pushes, so O(1) amortised."""
        self._heap = [(e.timer_at, e.timer_token, e) for e in self._by_id.values() if e.timer_token]
        heapq.heapify(self._heap)

    # --------------------------------------------------------------- helpers

    def _create(
        self,
        endpoint_id: str,
        user_id: str,
        organization_id: str,
        keep_alive_seconds: int,
        reminder_on: bool,
        origin: Origin,
        now: float,
    ) -> UserEndpoint:
        owner = (organization_id, user_id)
        siblings = self._by_owner.get(owner)
        if siblings is not None and len(siblings) >= self.policy.max_endpoints_per_user:
            raise too_many_endpoints(len(siblings), "userEndpointId")
        endpoint = UserEndpoint(endpoint_id, user_id, organization_id, keep_alive_seconds, reminder_on,
                                origin, now)
        self._by_id[endpoint_id] = endpoint
        self._by_owner.setdefault(owner, {})[endpoint_id] = endpoint
        self._arm(endpoint, now)
        self._journal_endpoint(endpoint)
        self._emit(LifecycleType.REGISTERED, endpoint)
        return endpoint

    def _unindex(self, endpoint: UserEndpoint) -> None:
        """The endpoint is out of the table: no id, no owner entry, no live timer."""
        endpoint.removed = True
        endpoint.timer_token = 0
        del self._by_id[endpoint.id]
        owner = (endpoint.organization_id, endpoint.user_id)
        siblings = self._by_owner[owner]
        del siblings[endpoint.id]
        if not siblings:
            del self._by_owner[owner]

    def _keepalive(self, endpoint: UserEndpoint, now: float) -> None:
        endpoint.last_keepalive = now
        endpoint.reminder_sent = False
        if endpoint.state is not EndpointState.HEALTHY:
            previous_state, endpoint.state = endpoint.state, EndpointState.HEALTHY
            endpoint.version += 1
            self._journal_endpoint(endpoint)
            self._emit(LifecycleType.STATE_CHANGED, endpoint, previous_state=previous_state)

    def _emit(self, kind: LifecycleType, endpoint: UserEndpoint, *, previous_state: EndpointState | None = None,
              reason: str | None = None, transport: str | None = None) -> None:
        """The one place lifecycle events come from: called inside the transitions themselves."""
        if not self.observers:
            return
        event = LifecycleEvent(
            kind, time.time(), endpoint.id, endpoint.user_id, endpoint.organization_id, endpoint.state.value,
            endpoint.version, endpoint.origin.name, endpoint.keep_alive_seconds,
            None if previous_state is None else previous_state.value, reason, transport,
        )
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                # An observer's bug must not undo or half-apply a transition.
                log.exception("lifecycle observer failed on %s of %s", kind, endpoint.id)

    # --------------------------------------------------------------- journal

    def journal_to(self, journal: Journal) -> None:
        """Where changes go from now on. The one place that decides whether QoS 1 events are
        journalled: not for a journal that discards changes (Journal)."""
        self._journal = journal
        self._journals_events = not getattr(journal, "discards_changes", False)

    def record(self, changes: Sequence[Change]) -> None:
        """Journal changes (the table's own, or one an operation adds to its batch, like an idempotency key)."""
        self.journalled += len(changes)
        if self._batch is not None:
            self._batch.extend(changes)
        else:
            self._journal.append(changes)

    def journal_batch(self) -> JournalBatch:
        """`with table.journal_batch():` everything journalled inside reaches the store in one
        append, so it commits together. Batches nest: the outermost one appends."""
        return self._journal_batch

    def _journal_endpoint(self, endpoint: UserEndpoint) -> None:
        """Record the endpoint as a restart must see it (not its state or deadline: those restart)."""
        self.record((PutEndpoint(EndpointRecord(
            id=endpoint.id,
            user_id=endpoint.user_id,
            organization_id=endpoint.organization_id,
            keep_alive_seconds=endpoint.keep_alive_seconds,
            reminder_on=endpoint.server_keep_alive_reminder_on,
            origin=endpoint.origin.value,
            version=endpoint.version,
            persistent_session=endpoint.persistent_session,
            subscriptions=tuple(endpoint.subscriptions.items()) if endpoint.persistent_session else (),
        )),))

    def restore(self, snapshot: Snapshot) -> None:
        """Load what a store kept, before anything else happens (see the module docstring).

        Every endpoint comes back UNKNOWN with its version up by one, and a full period
        from now before it turns SICK. Its queued events come back in order, marked as
        possibly sent, so that they go out with DUP.
        """
        now = self._clock()
        last_seq = 0
        for record in snapshot.endpoints:
            endpoint = UserEndpoint(record.id, record.user_id, record.organization_id, record.keep_alive_seconds,
                                    record.reminder_on, Origin(record.origin), now,
                                    state=EndpointState.UNKNOWN, version=record.version + 1,
                                    persistent_session=record.persistent_session,
                                    subscriptions=dict(record.subscriptions))
            events = snapshot.events.get(record.id, [])
            if events:
                # Restored in full, even past a bound lowered since: nothing accepted is lost.
                endpoint.outbox = Outbox(max(self.policy.queue_max_events, len(events)),
                                         max(self.policy.queue_max_bytes, sum(len(e.payload) for e in events)))
                for stored in events:
                    endpoint.outbox.offer(stored.payload, stored.seq, sends=1)
                last_seq = max(last_seq, events[-1].seq)
            self._by_id[record.id] = endpoint
            self._by_owner.setdefault((record.organization_id, record.user_id), {})[record.id] = endpoint
            self._arm(endpoint, now)
            self._journal_endpoint(endpoint)
            self._emit(LifecycleType.STATE_CHANGED, endpoint)  # to UNKNOWN: nobody knows since when
        self._event_seq = itertools.count(last_seq + 1)

    def _check_keep_alive(self, keep_alive_seconds: int) -> None:
        maximum = self.policy.max_keep_alive_seconds
        if not 1 <= keep_alive_seconds <= maximum:
            raise InvalidInput(f"keepAliveSeconds must be an integer from 1 to {maximum}", "keepAliveSeconds")

    @staticmethod
    def _require_organization(organization_id: str | None) -> str:
        if organization_id is None:
            raise Forbidden("an endpoint belongs to an organisation; the token names none", "organization_id")
        return organization_id

    @staticmethod
    def _check_owner(endpoint: UserEndpoint, user_id: str, organization_id: str) -> None:
        if endpoint.user_id != user_id or endpoint.organization_id != organization_id:
            raise id_taken(endpoint.id, "userEndpointId")
