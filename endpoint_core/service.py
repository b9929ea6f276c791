"""The endpoint service: the operations both adapters offer, with their access rules.

Rate limits are applied here too, the one place both adapters pass through:
registrations and events per principal, CONNECTs per client id.

Access rules, in one place:
- a normal caller acts on its own endpoints; another user's endpoint in the same
  organisation is Forbidden; an endpoint in another organisation is NotFound,
  exactly like an unknown id, so nothing leaks across organisations;
- a SERVICE caller bypasses organisation scoping (the platform's rule), but must
  name the organisation when it sends an event.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Mapping
from typing import Any

import orjson

from endpoint_core.clock import Clock, monotonic
from endpoint_core.endpoint import EndpointLink, RemovalReason, UserEndpoint, endpoint_id_of_topic
from endpoint_core.errors import DomainError, Forbidden, InvalidInput, NotAuthenticated, NotFound, Unavailable
from endpoint_core.events import SendEventCommand, masked, parse_send_event
from endpoint_core.feeds import LifecycleFeeds
from endpoint_core.idempotency import IdempotencyKeys, KeyState, body_digest
from endpoint_core.ids import require_endpoint_id
from endpoint_core.journal import PutIdempotency, Store, StoreUnavailable
from endpoint_core.logtext import loggable
from endpoint_core.principals import Principal, TokenVerifier
from endpoint_core.ratelimit import RateLimitPolicy, TokenBuckets
from endpoint_core.table import DeliveryReport, EndpointTable

log = logging.getLogger("endpoint_broker.service")

# sendEvent outcomes: some endpoint took the event, none did (none targeted, none
# connected, or QoS 0 with no subscription), or it was refused with an error.
SEND_OUTCOMES = ("delivered", "not_delivered", "refused")


class ServiceStats:
    """Plain counters, read at scrape time by the metrics collector."""

    __slots__ = ("auth_failures", "send_events")

    def __init__(self) -> None:
        # [qos][outcome index]; qos 2 stands for "unknown": refused before the QoS was read.
        self.send_events = [[0] * len(SEND_OUTCOMES) for _ in range(3)]
        # (reason from NotAuthenticated, protocol "http" or "mqtt") -> failures.
        self.auth_failures: dict[tuple[str, str], int] = {}

    def auth_failed(self, reason: str, protocol: str) -> None:
        key = (reason, protocol)
        self.auth_failures[key] = self.auth_failures.get(key, 0) + 1

event_log = logging.getLogger("endpoint_broker.events")


class EndpointService:
    def __init__(
        self,
        table: EndpointTable,
        verifier: TokenVerifier,
        store: Store | None = None,
        idempotency: IdempotencyKeys | None = None,
        *,
        limits: RateLimitPolicy | None = None,
        clock: Clock = monotonic,
        feeds: LifecycleFeeds | None = None,
    ) -> None:
        self.table = table
        # Lifecycle events to `$events/...` MQTT subscribers (endpoint_core.feeds).
        self.feeds = feeds or LifecycleFeeds(ack_timeout_seconds=table.policy.ack_timeout_seconds, clock=clock)
        table.observers.append(self.feeds)
        table.peer_observers.append(self.feeds)
        self.verifier = verifier
        self.store = store
        self.idempotency = idempotency or IdempotencyKeys()
        limits = limits or RateLimitPolicy()
        self._register_limit = TokenBuckets(limits.register_rate_per_second, limits.register_burst, clock)
        self._send_event_limit = TokenBuckets(limits.send_event_rate_per_second, limits.send_event_burst, clock)
        self._connect_limit = TokenBuckets(limits.connect_rate_per_second, limits.connect_burst, clock)
        self.stats = ServiceStats()

    # ---------------------------------------------------------- durability

    async def committed(self) -> None:
        """Wait until every change made so far is on disk; 503 (Unavailable) if it cannot be."""
        if self.store is not None:
            await self._stored(self.store.committed())

    @staticmethod
    async def _stored(future: asyncio.Future[None]) -> None:
        """Wait for one of the store's commit futures; 503 (Unavailable) if it failed."""
        try:
            await future if not future.done() else future.result()
        except StoreUnavailable as exc:
            raise Unavailable(f"the change could not be stored: {exc}") from None

    # ---------------------------------------------------------- identity

    def authenticate_bearer(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer <jwt>` header."""
        try:
            if not authorization:
                raise NotAuthenticated("the Authorization header is missing", "Authorization", "missing")
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise NotAuthenticated("the Authorization header must be 'Bearer <token>'", "Authorization",
                                       "malformed")
            return self.verifier.verify(token.strip())
        except NotAuthenticated as failure:
            self.stats.auth_failed(failure.reason, "http")
            raise

    def authenticate_connect(self, token: str) -> Principal:
        """The principal of an MQTT CONNECT's token (its password).

        Not cached: each connected endpoint's own token would cost about 0.5 KB for the life of
        its connection, for a reconnect that rarely reuses it (REST requests, which repeat
        their token, are cached).
        """
        return self.verifier.verify(token, remember=False)

    # ------------------------------------------------------------ REST

    def register(self, principal: Principal, body: object) -> UserEndpoint:
        keep_alive, reminder, endpoint_id = self._register_command(principal, body)
        endpoint, created = self.table.register(
            principal.user_id, principal.organization_id, endpoint_id, keep_alive, reminder
        )
        log.info("endpoint %s %s by user %s", endpoint.id, "registered" if created else "re-registered",
                 principal.user_id)
        return endpoint

    def _register_command(self, principal: Principal, body: object) -> tuple[int, bool, Any]:
        """(keepAliveSeconds, serverKeepAliveReminderOn, userEndpointId as given) of a register body."""
        self._register_limit.take(caller_of(principal), "registrations")
        command = object_of(body)
        keep_alive = command.get("keepAliveSeconds")
        if isinstance(keep_alive, bool) or not isinstance(keep_alive, int):
            raise InvalidInput("keepAliveSeconds is required and must be an integer", "keepAliveSeconds")
        reminder = command.get("serverKeepAliveReminderOn")
        if reminder is None:
            reminder = False
        if not isinstance(reminder, bool):
            raise InvalidInput("serverKeepAliveReminderOn must be a boolean", "serverKeepAliveReminderOn")
        return keep_alive, reminder, command.get("userEndpointId")

    def keepalive(self, principal: Principal, body: object) -> None:
        endpoint = self._visible(principal, endpoint_id_of(object_of(body)))
        self.table.keepalive(endpoint)

    def unregister(self, principal: Principal, body: object) -> None:
        command = object_of(body)
        endpoint = self._visible(principal, endpoint_id_of(command))  # a 404 before a bad reason's 400
        reason, block = unregister_options(command)
        self.table.remove(endpoint, RemovalReason.UNREGISTERED, reason, block=block)

    # ---------------------------------------------- what the REST routes answer
    # Each waits for what the contract promises is stored. A cluster node (cluster.service)
    # answers the same from Redis, so these are the routes' only way in.

    async def answer_register(self, principal: Principal, body: object) -> str:
        endpoint = self.register(principal, body)
        await self.committed()
        return endpoint.id

    async def answer_keepalive(self, principal: Principal, body: object) -> None:
        self.keepalive(principal, body)  # keepalives are never stored: a restart gives a fresh deadline

    async def answer_unregister(self, principal: Principal, body: object) -> None:
        self.unregister(principal, body)
        await self.committed()

    async def answer_get(self, principal: Principal, endpoint_id: str) -> dict[str, Any]:
        return self.table.view(self.get(principal, endpoint_id))

    async def answer_list(self, principal: Principal, user_id: str | None, organization_id: str | None
                          ) -> list[dict[str, Any]]:
        return [self.table.view(e) for e in self.list(principal, user_id, organization_id)]

    def get(self, principal: Principal, endpoint_id: str) -> UserEndpoint:
        return self._visible(principal, endpoint_id)

    def list(
        self, principal: Principal, user_id: str | None = None, organization_id: str | None = None
    ) -> list[UserEndpoint]:
        user_id, organization_id = list_scope(principal, user_id, organization_id)
        if user_id is not None and organization_id is not None:
            return self.table.endpoints_of(organization_id, user_id)
        return [
            e for e in self.table
            if (user_id is None or e.user_id == user_id)
            and (organization_id is None or e.organization_id == organization_id)
        ]

    def send_event(self, principal: Principal, body: object) -> int:
        """Deliver an event to one or all endpoints of a user. Returns how many took it.

        QoS 1 events are journalled; `send_event_durably` answers once they are stored.
        """
        return self._send_event(principal, body)[0]

    async def send_event_durably(self, principal: Principal, body: object, idempotency_key: str | None) -> int:
        """sendEvent as the REST route answers it: after its QoS 1 events (and its key) are on disk.

        With an idempotency key, a retry gets the first answer and delivers nothing again
        (see endpoint_core.idempotency).
        """
        if idempotency_key is None:
            count, journalled = self._send_event(principal, body)
            if journalled and self.store is not None:
                future = self.store.committed()
                if not future.done() or future.cancelled() or future.exception() is not None:
                    await self._stored(future)  # else already on disk (the memory store: always)
            return count
        keys, scope = self.idempotency, principal.scope
        prior = keys.begin(scope, idempotency_key, body_digest(body))
        if prior is not None:
            if prior.state is KeyState.UNCOMMITTED:
                await self.committed()
                keys.settle(scope, idempotency_key, committed=True)
            return prior.count
        try:
            # The events and their key reach the store in one append, so in one commit: a crash
            # can never keep the events and lose the key (the retry would deliver them again).
            with self.table.journal_batch():
                count, _ = self._send_event(principal, body)
                self.table.record((PutIdempotency(keys.record(scope, idempotency_key, 200, count)),))
        except DomainError:
            keys.forget(scope, idempotency_key)
            raise
        stored = False
        try:
            await self.committed()
            stored = True
        finally:
            # Not stored (a failed commit, or the request was cancelled): a retry waits for the commit.
            keys.settle(scope, idempotency_key, committed=stored)
        return count

    def _send_event(self, principal: Principal, body: object) -> tuple[int, bool]:
        """(endpoints that took the event, whether any of them journalled it)."""
        qos = 2  # unknown until the body is read
        try:
            if self._send_event_limit.enabled:  # off by default: no caller key to build per event
                self._send_event_limit.take(caller_of(principal), "events")
            command = parse_send_event(object_of(body))
            qos = command.qos
            delivered, journalled = self._deliver_event(principal, command)
        except DomainError:
            self.stats.send_events[qos][2] += 1
            raise
        self.stats.send_events[qos][0 if delivered else 1] += 1
        return delivered, journalled

    def _deliver_event(self, principal: Principal, command: SendEventCommand) -> tuple[int, bool]:
        organization_id = self._target_organization(principal, command.organization_id)
        if command.endpoint_id is not None:
            endpoint = self.table.get(command.endpoint_id)
            if (
                endpoint is None
                or endpoint.user_id != command.user_id
                or endpoint.organization_id != organization_id
            ):
                raise not_an_endpoint_of_user()
            targets = [endpoint]
        else:
            targets = self.table.endpoints_of(organization_id, command.user_id)
        payload = event_payload(command)
        report = self.table.deliver(targets, payload, command.qos)
        return self._delivered(command, organization_id, payload, report), command.qos == 1 and report.delivered > 0

    @staticmethod
    def _delivered(command: SendEventCommand, organization_id: str, payload: bytes, report: DeliveryReport) -> int:
        """Log a delivery and return its count; Unavailable (503) if every target's queue was full."""
        if report.full:
            log.warning(
                "sendEvent %s: queue full, event not taken by endpoint(s) %s",
                command.event["type"], ", ".join(report.full),
            )
        if event_log.isEnabledFor(logging.INFO):
            logged = orjson.dumps(masked(command.event, command.masks)) if command.masks else payload
            # One string and no arguments: the record skips the %-formatting and its Mapping check.
            event_log.info("sendEvent " + orjson.dumps({
                "type": command.event["type"],
                "organizationId": organization_id,
                "userId": command.user_id,
                "userEndpointId": command.endpoint_id,
                "endpoints": report.delivered,
                "qos": command.qos,
                "event": orjson.Fragment(logged),  # already JSON: no second encoding, no extra depth
            }).decode())
        if report.full and report.delivered == 0:
            raise Unavailable(
                "no targeted endpoint could take the event: their queues are full", "userEndpointId"
            )
        return report.delivered

    async def dashboard_rows(self, organization_id: str | None) -> builtins.list[dict[str, Any]]:
        """The dashboard's snapshot: every endpoint (of one organisation), with its transport."""
        table = self.table
        rows = []
        for endpoint in table:
            if organization_id is None or endpoint.organization_id == organization_id:
                link = endpoint.link
                rows.append({**table.view(endpoint), "transport": None if link is None else link.transport_name})
        return rows

    # ------------------------------------------------------------ MQTT

    def connect(
        self,
        principal: Principal,
        endpoint_id: str,
        mqtt_keep_alive: int,
        link: EndpointLink,
        persistent_session: bool,
    ) -> tuple[UserEndpoint, bool] | asyncio.Future[tuple[UserEndpoint, bool]]:
        """Attach an MQTT connection. It lives only until the token's `exp`, so a token
        already past it (accepted by the verifier's clock-skew leeway) is refused.

        Answers at once here; a cluster node (cluster.service) answers with a future, once
        Redis has decided."""
        self._admit_connect(principal, endpoint_id)
        return self.table.connect(
            principal.user_id, principal.organization_id, endpoint_id, mqtt_keep_alive, link,
            persistent_session,
        )

    def _admit_connect(self, principal: Principal, endpoint_id: str) -> None:
        """A CONNECT's token must not be past its `exp`, and its client id within its rate."""
        if principal.expires_at <= time.time():
            raise NotAuthenticated("token has expired", "Authorization", "expired")
        self._connect_limit.take(endpoint_id, "CONNECTs for this client id")

    def relay(self, publisher: UserEndpoint, topic: str, payload: bytes) -> bool:
        """An allowed client PUBLISH: best effort to the endpoint whose topic it is, in the
        publisher's own organisation only. Returns whether it was written."""
        found = endpoint_id_of_topic(topic)
        if found is None:
            return False
        endpoint_id, user_id = found
        target = self.table.get(endpoint_id)
        if (
            target is None
            or target.organization_id != publisher.organization_id
            or user_id not in (None, target.user_id)
        ):
            return False
        return self.table.publish_on(target, topic, payload)

    # --------------------------------------------------------- helpers

    def _visible(self, principal: Principal, endpoint_id: str) -> UserEndpoint:
        endpoint = self.table.get(endpoint_id)
        if endpoint is None or (
            not principal.is_service and endpoint.organization_id != principal.organization_id
        ):
            raise no_such_endpoint(endpoint_id)
        if not principal.is_service and endpoint.user_id != principal.user_id:
            raise another_users_endpoint()
        return endpoint

    @staticmethod
    def _target_organization(principal: Principal, requested: str | None) -> str:
        if principal.is_service:
            if requested is None:
                raise InvalidInput("SERVICE callers must give organizationId", "organizationId")
            return requested
        if requested is not None and requested != principal.organization_id:
            raise Forbidden("organizationId differs from the token's organisation", "organizationId")
        assert principal.organization_id is not None  # the verifier guarantees it for users
        return principal.organization_id


def list_scope(principal: Principal, user_id: str | None, organization_id: str | None
               ) -> tuple[str | None, str | None]:
    """(user, organisation) a list may show, None for any: a user lists its own endpoints only; a
    SERVICE caller whatever it names, its own scope if it names nothing."""
    if not principal.is_service:
        if user_id is not None and user_id != principal.user_id:
            raise Forbidden("only SERVICE callers may list another user's endpoints", "userId")
        if organization_id is not None and organization_id != principal.organization_id:
            raise Forbidden("only SERVICE callers may list another organisation", "organizationId")
        return principal.user_id, principal.organization_id
    if user_id is None and organization_id is None:
        return principal.user_id, principal.organization_id
    return user_id, organization_id


def no_such_endpoint(endpoint_id: str) -> NotFound:
    """Also for an endpoint in another organisation: nothing leaks across organisations."""
    return NotFound(f"no endpoint {endpoint_id!r}", "userEndpointId")


def another_users_endpoint() -> Forbidden:
    return Forbidden("the endpoint belongs to another user", "userEndpointId")


def event_payload(command: SendEventCommand) -> bytes:
    """The event as every endpoint receives it."""
    try:
        return orjson.dumps(command.event)
    except orjson.JSONEncodeError:
        # orjson reads JSON nested up to 1024 levels but writes at most 254.
        raise InvalidInput("event is nested too deeply (at most 254 levels)", "event") from None


def not_an_endpoint_of_user() -> NotFound:
    return NotFound("userEndpointId is not an endpoint of this user in this organisation", "userEndpointId")


def caller_of(principal: Principal) -> tuple[str, str | None, bool]:
    """Whose bucket a request takes from: the user in its organisation, or the SERVICE client."""
    return principal.user_id, principal.organization_id, principal.is_service


def object_of(body: object) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidInput("the request body must be a JSON object", "body")
    return body


def unregister_options(command: Mapping[str, Any]) -> tuple[str, bool]:
    """(reason as it may be logged, block) of an unregister body."""
    reason = command.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidInput("reason must be a string", "reason")
    block = command.get("block", False)
    if not isinstance(block, bool):
        raise InvalidInput("block must be a boolean", "block")
    return loggable(reason, 200) if reason else "", block


def endpoint_id_of(command: Mapping[str, Any]) -> str:
    endpoint_id = command.get("userEndpointId")
    if endpoint_id is None:
        raise InvalidInput("userEndpointId is required", "userEndpointId")
    return require_endpoint_id(endpoint_id)
