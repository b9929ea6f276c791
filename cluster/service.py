"""The endpoint service of a cluster node: the same operations and rules, answered from Redis.

Every REST answer and every CONNECT is one script (cluster.scripts), so what a node
answers is what Redis decided, whichever node is asked: ids, caps, views, and where an
event must go. Validation, access rules, rate limits and log lines are the service's
own (endpoint_core.service); only the table behind them differs.

While Redis is unreachable, what needs it answers 503 (CONNACK 3 over MQTT); a QoS 0
sendEvent still reaches the connections this node holds, and says how many took it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cluster.directory import Argument, ClusterUnavailable, Directory, EndpointEntry, entry_of, text
from cluster.node import LEASE_FRACTION, ClusterNode
from cluster.table import ClusterTable
from endpoint_core.endpoint import (
    DisconnectReason,
    EndpointLink,
    EndpointState,
    RemovalReason,
    UserEndpoint,
    endpoint_id_of_topic,
)
from endpoint_core.errors import (
    DomainError,
    Unavailable,
    Unprocessable,
)
from endpoint_core.events import parse_send_event
from endpoint_core.idempotency import IdempotencyKeys, body_digest
from endpoint_core.lifecycle import LifecycleType
from endpoint_core.principals import Principal, TokenVerifier
from endpoint_core.service import (
    EndpointService,
    another_users_endpoint,
    caller_of,
    endpoint_id_of,
    event_payload,
    list_scope,
    no_such_endpoint,
    not_an_endpoint_of_user,
    object_of,
    unregister_options,
)
from endpoint_core.table import DeliveryReport, id_taken, logged_out, too_many_endpoints

log = logging.getLogger("endpoint_broker.service")


def unavailable(exc: ClusterUnavailable) -> Unavailable:
    return Unavailable(f"the cluster's shared table is unreachable: {exc}")


class ClusterService(EndpointService):
    table: ClusterTable

    def __init__(self, table: ClusterTable, node: ClusterNode, verifier: TokenVerifier,
                 idempotency: IdempotencyKeys, **options: Any) -> None:
        super().__init__(table, verifier, node, idempotency, **options)
        self.node = node
        self.directory: Directory = node.directory

    async def _run(self, script: str, *args: Argument) -> Any:
        try:
            return await self.directory.run(script, *args)
        except ClusterUnavailable as exc:
            raise unavailable(exc) from None

    # ------------------------------------------------------------ REST

    async def answer_register(self, principal: Principal, body: object) -> str:
        keep_alive, reminder, given_id = self._register_command(principal, body)
        organization_id, endpoint_id = self.table.admit_registration(principal.organization_id, given_id,
                                                                     keep_alive)
        answer = await self._run("REGISTER", endpoint_id, principal.user_id, organization_id, keep_alive,
                                 int(reminder), self.table.policy.max_endpoints_per_user)
        status = text(answer[0])
        if status == "full":
            raise too_many_endpoints(int(answer[1]), "userEndpointId")
        if status == "conflict":
            raise id_taken(endpoint_id, "userEndpointId")
        entry = entry_of(endpoint_id, answer[2])
        if status != "same":
            self.table.emit(LifecycleType.REGISTERED, entry)
        if answer[1] is not None:
            self.table.emit(LifecycleType.STATE_CHANGED, entry, previous_state=EndpointState(text(answer[1])))
        log.info("endpoint %s %s by user %s", endpoint_id, "registered" if status == "created" else "re-registered",
                 principal.user_id)
        return endpoint_id

    async def answer_keepalive(self, principal: Principal, body: object) -> None:
        endpoint_id = endpoint_id_of(object_of(body))
        answer = await self._run("KEEPALIVE", endpoint_id, *self._caller_args(principal), LEASE_FRACTION)
        status = text(answer[0])
        self._refuse(status, endpoint_id)
        self.table.stats.keepalives_rest += 1
        if status == "revived":
            entry = entry_of(endpoint_id, answer[2])
            self.table.emit(LifecycleType.STATE_CHANGED, entry, previous_state=EndpointState(text(answer[1])))
        elif status == "deferred":
            self.node.defer_keepalive(endpoint_id, float(text(answer[1])), float(text(answer[2])),
                                      float(text(answer[3])))

    async def answer_unregister(self, principal: Principal, body: object) -> None:
        command = object_of(body)
        endpoint_id = endpoint_id_of(command)
        try:
            reason, block = unregister_options(command)
        except DomainError:
            await self.answer_get(principal, endpoint_id)  # a 404 before a bad reason's 400, as alone
            raise
        block_seconds = self.table.policy.unregister_block_seconds if block else 0
        answer = await self._run("UNREGISTER", endpoint_id, *self._caller_args(principal), block_seconds)
        self._refuse(text(answer[0]), endpoint_id)
        entry, queued = entry_of(endpoint_id, answer[1]), int(answer[2])
        held = self.table.get(endpoint_id)
        if held is not None:
            self.table.forget(held, DisconnectReason.UNREGISTERED)
        if queued:
            self.table.stats.dropped_endpoint_removed += queued
            log.warning("endpoint %s removed (%s) with %d undelivered QoS 1 event(s); they are dropped with it",
                        endpoint_id, RemovalReason.UNREGISTERED, queued)
        log.info("endpoint %s removed: %s%s", endpoint_id, RemovalReason.UNREGISTERED, f" ({reason})" if reason else "")
        if entry.node:
            self.table.emit(LifecycleType.DISCONNECTED, entry, reason=DisconnectReason.UNREGISTERED)
        self.table.emit(LifecycleType.UNREGISTERED, entry, reason=RemovalReason.UNREGISTERED)

    async def answer_get(self, principal: Principal, endpoint_id: str) -> dict[str, Any]:
        answer = await self._run("VIEW", endpoint_id, *self._caller_args(principal))
        self._refuse(text(answer[0]), endpoint_id)
        return entry_of(endpoint_id, answer[2]).view(float(text(answer[1])))

    async def answer_list(self, principal: Principal, user_id: str | None, organization_id: str | None
                          ) -> list[dict[str, Any]]:
        user_id, organization_id = list_scope(principal, user_id, organization_id)
        answer = await self._run("LIST", organization_id or "", user_id or "")
        now = float(text(answer[0]))
        return [entry_of(text(raw_id), flat).view(now) for raw_id, flat in answer[1:]]

    async def dashboard_rows(self, organization_id: str | None) -> list[dict[str, Any]]:
        """Every node's endpoints, from Redis; this node's alone while Redis is unreachable."""
        try:
            answer = await self.directory.run("LIST", organization_id or "", "")
        except ClusterUnavailable:
            return await super().dashboard_rows(organization_id)
        now = float(text(answer[0]))
        rows = []
        for raw_id, flat in answer[1:]:
            entry = entry_of(text(raw_id), flat)
            rows.append({**entry.view(now), "transport": entry.transport})
        return rows

    async def send_event_durably(self, principal: Principal, body: object, idempotency_key: str | None) -> int:
        qos = 2
        try:
            self._send_event_limit.take(caller_of(principal), "events")
            command = parse_send_event(object_of(body))
            qos = command.qos
            organization_id = self._target_organization(principal, command.organization_id)
            payload = event_payload(command)
            digest = body_digest(body) if idempotency_key is not None else ""
            key = "" if idempotency_key is None else f"eb:idem:{principal.scope}\0{idempotency_key}"
            policy = self.table.policy
            try:
                answer = await self.directory.run(
                    "SEND", organization_id, command.user_id, command.endpoint_id or "", qos, payload,
                    policy.queue_max_events, policy.queue_max_bytes, self.node.node_id, key, digest,
                    int(self.idempotency.window_seconds * 1000))
            except ClusterUnavailable as exc:
                if qos == 1 or idempotency_key is not None:
                    raise unavailable(exc) from None
                report = self._deliver_here(organization_id, command.user_id, command.endpoint_id, payload)
            else:
                status = text(answer[0])
                if status == "prior":
                    prior_digest, _, count = text(answer[1]).partition(" ")
                    if prior_digest != digest:
                        raise Unprocessable("this idempotency key was used with a different request body",
                                            "Idempotency-Key")
                    return int(count)
                if status == "notfound":
                    raise not_an_endpoint_of_user()
                report = DeliveryReport(int(answer[1]), [text(i) for i in answer[2]])
                for raw_id, _ in answer[3]:  # targets whose connection this node holds
                    endpoint_id = text(raw_id)
                    if qos == 1:
                        self.node.pull(endpoint_id)  # in stream order, as a wake from another node would
                    elif (endpoint := self.table.get(endpoint_id)) is not None:
                        self.table.deliver((endpoint,), payload, 0)
            delivered = self._delivered(command, organization_id, payload, report)
        except DomainError:
            self.stats.send_events[qos][2] += 1
            raise
        self.stats.send_events[qos][0 if delivered else 1] += 1
        return delivered

    def _deliver_here(self, organization_id: str, user_id: str, endpoint_id: str | None,
                      payload: bytes) -> DeliveryReport:
        """QoS 0 while Redis is unreachable: the connections this node holds, and only those."""
        targets = [e for e in self.table.endpoints_of(organization_id, user_id)
                   if endpoint_id is None or e.id == endpoint_id]
        return self.table.deliver(targets, payload, 0)

    # ------------------------------------------------------------ MQTT

    def relay(self, publisher: UserEndpoint, topic: str, payload: bytes) -> bool:
        """As alone for an endpoint held here; one held by another node is told through Redis
        (best effort, like the relay itself: nothing is answered to the publisher)."""
        found = endpoint_id_of_topic(topic)
        if found is None:
            return False
        if self.table.get(found[0]) is not None:
            return super().relay(publisher, topic, payload)
        self.node.spawn(self._relay_elsewhere(publisher.organization_id, found[0], found[1] or "", topic, payload))
        return True

    async def _relay_elsewhere(self, organization_id: str, endpoint_id: str, user_id: str, topic: str,
                               payload: bytes) -> None:
        try:
            await self.directory.run("RELAY", organization_id, endpoint_id, user_id, topic, payload,
                                     self.node.node_id)
        except ClusterUnavailable as exc:
            log.debug("client PUBLISH to %s not relayed: %s", endpoint_id, exc)

    def connect(
        self,
        principal: Principal,
        endpoint_id: str,
        mqtt_keep_alive: int,
        link: EndpointLink,
        persistent_session: bool,
    ) -> asyncio.Future[tuple[UserEndpoint, bool]]:
        """As alone, but decided in Redis: the answer comes later, and the link waits for it."""
        self._admit_connect(principal, endpoint_id)
        organization_id = self.table.admit_connect(principal.organization_id, endpoint_id)
        return asyncio.ensure_future(self._connect(principal.user_id, organization_id, endpoint_id,
                                                   mqtt_keep_alive, link, persistent_session))

    async def _connect(self, user_id: str, organization_id: str, endpoint_id: str, mqtt_keep_alive: int,
                       link: EndpointLink, persistent_session: bool) -> tuple[UserEndpoint, bool]:
        policy = self.table.policy
        answer = await self._run(
            "CONNECT", endpoint_id, user_id, organization_id, mqtt_keep_alive, self.node.node_id,
            int(persistent_session), policy.default_mqtt_keep_alive_seconds, policy.max_keep_alive_seconds,
            policy.max_endpoints_per_user, link.transport_name)
        status = text(answer[0])
        if status == "blocked":
            raise logged_out(endpoint_id)
        if status == "full":
            raise too_many_endpoints(int(answer[1]), "client id")
        if status == "conflict":
            raise id_taken(endpoint_id, "client id")
        created, previous_node, left, present = answer[1] is not None, text(answer[2]), answer[3], answer[4]
        entry = entry_of(endpoint_id, answer[5])
        try:
            events = await self.directory.queued(endpoint_id, 0)
        except ClusterUnavailable:
            events = []  # loaded by the mailbox's resync once Redis answers again
        endpoint = None if self.node.superseded(endpoint_id, entry.epoch) else self.table.adopt(entry, link, events)
        # Made either way: the newer connection's node reports this one taken over.
        self._connect_events(entry, created, previous_node, left, link)
        if endpoint is None:
            raise Unavailable("a newer connection of this client id took the endpoint while this one connected")
        self.node.pull(endpoint_id)  # what was queued after that read, whose wake came before the copy
        return endpoint, present is not None

    def _connect_events(self, entry: EndpointEntry, created: bool, previous_node: str, left: Any,
                        link: EndpointLink) -> None:
        if created:
            self.table.emit(LifecycleType.REGISTERED, entry)
        if left is not None:
            self.table.emit(LifecycleType.STATE_CHANGED, entry, previous_state=EndpointState(text(left)))
        if previous_node:
            self.table.emit(LifecycleType.DISCONNECTED, entry, reason=DisconnectReason.TAKEN_OVER)
        self.table.emit(LifecycleType.CONNECTED, entry, transport=link.transport_name)

    # --------------------------------------------------------- helpers

    @staticmethod
    def _caller_args(principal: Principal) -> tuple[str, str, int]:
        return principal.user_id, principal.organization_id or "", int(principal.is_service)

    @staticmethod
    def _refuse(status: str, endpoint_id: str) -> None:
        if status == "notfound":
            raise no_such_endpoint(endpoint_id)
        if status == "forbidden":
            raise another_users_endpoint()
