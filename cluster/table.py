"""A node's own table: the endpoints whose MQTT connections this node holds.

In a cluster, Redis holds every endpoint (cluster.scripts); a node keeps a local copy
of an endpoint only while it holds the endpoint's connection, for what must happen
next to the socket: subscriptions, the QoS 1 outbox and its redelivery, the reminder,
and the keepalives its packets bring. The copy never decides liveness: SICK and expiry
are decided in Redis, once, by whichever node's sweep comes first (cluster.node).

The table's invariants still hold, and two are added:
- a copy exists only with a link (attached by `adopt`, dropped when the link goes);
- a copy carries the fencing epoch of its CONNECT (`epochs`), and every write of the
  node about it is fenced by that epoch, so a node that lost the endpoint changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from cluster.directory import EndpointEntry
from endpoint_core.clock import Clock, monotonic
from endpoint_core.endpoint import DisconnectReason, EndpointLink, EndpointState, Origin, UserEndpoint
from endpoint_core.journal import EndpointRecord, PutEndpoint
from endpoint_core.lifecycle import LifecycleType
from endpoint_core.outbox import Outbox
from endpoint_core.table import EndpointTable, TablePolicy


class ClusterTable(EndpointTable):
    """EndpointTable for local copies; see the module docstring."""

    def __init__(self, policy: TablePolicy | None = None, clock: Clock = monotonic) -> None:
        # The journal is the node's store, made after this table (journal_to).
        super().__init__(policy, clock)
        # Endpoint id -> the fencing epoch its connection was granted.
        self.epochs: dict[str, int] = {}
        # Endpoint id -> the newest queued event loaded from its stream (cluster.directory.stream_seq).
        self.loaded: dict[str, int] = {}
        # Called with every keepalive a held endpoint's packets bring (cluster.node.Leases).
        self.on_keepalive: Callable[[UserEndpoint], None] | None = None
        # Called when a held copy's link detached: (endpoint, epoch, reason).
        self.on_detach: Callable[[UserEndpoint, int, DisconnectReason], None] | None = None

    # ------------------------------------------------------------ copies

    def adopt(self, entry: EndpointEntry, link: EndpointLink, events: list[tuple[int, bytes]]) -> UserEndpoint | None:
        """Hold the endpoint `entry` with `link`, as the CONNECT script granted it (epoch included).

        A link of an earlier CONNECT here is closed (a take-over on the same node); its queued
        events come from Redis, which has them all. None if a newer CONNECT here already holds
        it (their answers from Redis came back out of order): the newest connection wins.
        """
        now = self._clock()
        previous = self._by_id.get(entry.id)
        if previous is not None:
            if self.epochs.get(entry.id, 0) > entry.epoch:
                return None
            self.forget(previous, DisconnectReason.TAKEN_OVER)
        endpoint = UserEndpoint(entry.id, entry.user_id, entry.organization_id, entry.keep_alive_seconds,
                                entry.reminder_on, entry.origin, now, state=entry.state, version=entry.version,
                                persistent_session=entry.persistent_session,
                                subscriptions=dict(entry.subscriptions))
        endpoint.link, endpoint.link_keep_alive, endpoint.connected_since = link, entry.link_keep_alive, now
        self._by_id[entry.id] = endpoint
        self._by_owner.setdefault((entry.organization_id, entry.user_id), {})[entry.id] = endpoint
        self.epochs[entry.id] = entry.epoch
        self.loaded[entry.id] = 0
        self.take(endpoint, events, sent_before=True)
        self._arm(endpoint, now)
        return endpoint

    def forget(self, endpoint: UserEndpoint, reason: DisconnectReason) -> None:
        """Drop the copy and close its link, changing nothing in Redis (another node or a script did)."""
        if endpoint.removed or self._by_id.get(endpoint.id) is not endpoint:
            return
        self._unindex(endpoint)
        self.epochs.pop(endpoint.id, None)
        self.loaded.pop(endpoint.id, None)
        endpoint.outbox = None
        link, endpoint.link = endpoint.link, None
        if link is not None:
            link.close(reason)

    def take(self, endpoint: UserEndpoint, events: list[tuple[int, bytes]], *, sent_before: bool = False) -> None:
        """Queue events already stored in the endpoint's stream, then send what the link can take.

        Unbounded here: Redis bounded the stream when it took them. `sent_before` marks events
        that may have gone out on an earlier connection, so that they go with DUP.
        """
        loaded = self.loaded.get(endpoint.id, 0)
        fresh = [(seq, payload) for seq, payload in events if seq > loaded]
        if not fresh or endpoint.removed:
            return
        if endpoint.outbox is None:
            endpoint.outbox = Outbox(math.inf, math.inf)  # type: ignore[arg-type]
        for seq, payload in fresh:
            endpoint.outbox.offer(payload, seq, sends=1 if sent_before else 0)
        self.loaded[endpoint.id] = fresh[-1][0]
        self._flush(endpoint, self._clock())

    def set_state(self, endpoint: UserEndpoint, state: EndpointState) -> None:
        """What a sweep decided (SICK): the next packet from the client then revives it at once."""
        endpoint.state = state

    def period_of(self, endpoint: UserEndpoint) -> float:
        return self._period(endpoint)

    def refresh(self, endpoint: UserEndpoint, keep_alive_seconds: int, reminder_on: bool, origin: str) -> None:
        """A REST registration on any node changed the held endpoint's settings."""
        endpoint.keep_alive_seconds = keep_alive_seconds
        endpoint.server_keep_alive_reminder_on = reminder_on
        endpoint.origin = Origin(origin)
        self._arm(endpoint, self._clock())

    def emit_of(self, kind: LifecycleType, endpoint: UserEndpoint, *, reason: str | None = None) -> None:
        """The lifecycle event of a transition of a copy this node held."""
        self._emit(kind, endpoint, reason=reason)

    def emit(self, kind: LifecycleType, entry: EndpointEntry, *, previous_state: EndpointState | None = None,
             reason: str | None = None, transport: str | None = None) -> None:
        """The lifecycle event of a transition a script made on this node (the one place, as alone)."""
        self._emit(kind, entry.as_endpoint(), previous_state=previous_state, reason=reason, transport=transport)

    # ----------------------------------------------- the table's transitions

    def _keepalive(self, endpoint: UserEndpoint, now: float) -> None:
        endpoint.last_keepalive = now
        endpoint.reminder_sent = False
        if endpoint.server_keep_alive_reminder_on and not endpoint.timer_token:
            self._arm(endpoint, now)
        if self.on_keepalive is not None:
            self.on_keepalive(endpoint)

    def disconnect(self, endpoint: UserEndpoint, link: EndpointLink, reason: DisconnectReason) -> None:
        """The link ended: the copy goes, and the node tells Redis (fenced), which decides the rest."""
        if endpoint.link is not link or self._by_id.get(endpoint.id) is not endpoint:
            return
        epoch = self.epochs.get(endpoint.id, 0)
        endpoint.link = None
        self.forget(endpoint, reason)
        if self.on_detach is not None:  # which reports it (DISCONNECTED) once Redis took it
            self.on_detach(endpoint, epoch, reason)

    def _on_timer(self, endpoint: UserEndpoint, now: float) -> None:
        """Reminders and redelivery only: SICK and expiry are Redis's (cluster.scripts.SWEEP)."""
        deadline = self._deadline(endpoint)
        if (endpoint.server_keep_alive_reminder_on and not endpoint.reminder_sent
                and self._reminder_at(endpoint) <= now < deadline):
            endpoint.reminder_sent = True
            self._send_reminder(endpoint, deadline)
        if endpoint.outbox is not None:
            self._redeliver(endpoint, now)
        self._arm(endpoint, now)

    def _next_event_at(self, endpoint: UserEndpoint, now: float) -> float:
        when = math.inf
        if endpoint.server_keep_alive_reminder_on and not endpoint.reminder_sent:
            reminder = self._reminder_at(endpoint)
            if reminder > now:
                when = reminder
        if endpoint.outbox is not None:
            retry = endpoint.outbox.next_retry_at(self.policy.ack_timeout_seconds)
            if retry is not None:
                when = min(when, max(retry, now))
        return when

    def subscribe(self, endpoint: UserEndpoint, link: EndpointLink, topic_filter: str, qos: int = 1) -> int | None:
        """As alone, but every change is journalled: Redis counts subscribed endpoints for QoS 0."""
        before = dict(endpoint.subscriptions)
        granted = super().subscribe(endpoint, link, topic_filter, qos)
        if endpoint.subscriptions != before and not endpoint.persistent_session:
            self._journal_endpoint(endpoint)
        return granted

    def unsubscribe(self, endpoint: UserEndpoint, link: EndpointLink, topic_filter: str) -> None:
        before = len(endpoint.subscriptions)
        super().unsubscribe(endpoint, link, topic_filter)
        if len(endpoint.subscriptions) != before and not endpoint.persistent_session:
            self._journal_endpoint(endpoint)

    def _journal_endpoint(self, endpoint: UserEndpoint) -> None:
        """Only a held copy's subscriptions reach the journal (cluster.store writes them, fenced):
        everything else about an endpoint is written by the scripts themselves."""
        if endpoint.id in self.epochs:
            self.record((PutEndpoint(EndpointRecord(
                endpoint.id, endpoint.user_id, endpoint.organization_id, endpoint.keep_alive_seconds,
                endpoint.server_keep_alive_reminder_on, endpoint.origin.value, endpoint.version,
                endpoint.persistent_session, tuple(endpoint.subscriptions.items()),
            )),))
