"""EndpointPlugin: the amqtt plugin that makes the broker speak the endpoint model.

amqtt loads it from the broker config like any plugin. Its endpoint callbacks are
called by EndpointBroker's connections synchronously and in packet order,
because amqtt's own event callbacks run later, as unordered tasks (a disconnect
callback can overtake its connect callback), and cost a task per packet. Each
callback has a contract saying what it may change, in the style of Mosquitto's
plugin events.

Every rule itself lives in the domain core (endpoint_core); these callbacks only
translate between MQTT and it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from broker_plugin import codec
from endpoint_core.endpoint import EndpointLink, UserEndpoint
from endpoint_core.errors import Conflict, DomainError, Forbidden, NotAuthenticated
from endpoint_core.ids import endpoint_id_problem
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from endpoint_core.topics import topic_matches

log = logging.getLogger("endpoint_broker.mqtt")


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    code: int  # the CONNACK return code
    reason: str = ""
    endpoint: UserEndpoint | None = None
    principal: Principal | None = None
    session_present: bool = False


class EndpointPlugin(BaseAuthPlugin, BaseTopicPlugin):
    @dataclass
    class Config:
        # The EndpointService shared with the HTTP bridge: one table, one verifier.
        service: Any = None
        # Topic filters clients may PUBLISH to. Empty: client PUBLISH is refused.
        client_publish_allow: list[str] = field(default_factory=list)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        if not isinstance(self.config.service, EndpointService):
            raise TypeError("EndpointPlugin needs the EndpointService in its 'service' option")
        self.service: EndpointService = self.config.service
        self.table = self.service.table
        self.publish_allow: tuple[str, ...] = tuple(self.config.client_publish_allow)

    # ------------------------------------------------- endpoint callbacks

    def on_connect(
        self,
        link: EndpointLink,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        keep_alive: int,
        clean_session: bool,
    ) -> ConnectVerdict:
        """Decide a CONNECT, before any CONNACK is written.

        May: register a new endpoint or attach `link` to the caller's existing one
        (closing the link it replaces). Must not: touch any other endpoint. On
        refusal nothing has changed, and nothing is left in the broker.
        """
        problem = endpoint_id_problem(client_id) if client_id else "must not be empty"
        if problem is not None:
            return ConnectVerdict(codec.IDENTIFIER_REJECTED, f"client id {problem}")
        if not username or not password:
            return ConnectVerdict(codec.BAD_USERNAME_OR_PASSWORD, "a username and a token password are required")
        try:
            principal = self.service.verifier.verify(password)
        except NotAuthenticated as exc:
            return ConnectVerdict(codec.BAD_USERNAME_OR_PASSWORD, exc.detail)
        try:
            endpoint, session_present = self.service.connect(
                principal, client_id, keep_alive, link, persistent_session=not clean_session
            )
        except NotAuthenticated as exc:
            return ConnectVerdict(codec.BAD_USERNAME_OR_PASSWORD, exc.detail)
        except (Conflict, Forbidden) as exc:
            return ConnectVerdict(codec.NOT_AUTHORIZED, exc.detail)
        except DomainError as exc:
            return ConnectVerdict(codec.IDENTIFIER_REJECTED, exc.detail)
        return ConnectVerdict(codec.ACCEPTED, "", endpoint, principal, session_present)

    def on_packet(self, link: EndpointLink, endpoint: UserEndpoint) -> None:
        """Any packet from an attached client. May: count a keepalive for its endpoint."""
        self.table.touch(endpoint, link)

    def on_subscribe(self, link: EndpointLink, endpoint: UserEndpoint, topic_filter: str, qos: int) -> int:
        """Return the granted QoS or 0x80. May: add the filter to the endpoint's subscriptions.

        Only the endpoint's own topics are granted; wildcards, other endpoints'
        topics and $SYS are refused. QoS 2 is granted as 1: events go out at most at QoS 1.
        """
        granted = self.table.subscribe(endpoint, link, topic_filter, qos)
        if granted is not None:
            return granted
        log.info("%s refused subscription to %r", endpoint.id, topic_filter)
        return codec.SUBACK_FAILURE

    def on_subscribed(self, link: EndpointLink, endpoint: UserEndpoint) -> None:
        """After SUBACK (or CONNACK with a session). May: send the endpoint's queued events."""
        self.table.flush(endpoint, link)

    def on_unsubscribe(self, link: EndpointLink, endpoint: UserEndpoint, topic_filter: str) -> None:
        """May: remove the filter from the endpoint's subscriptions."""
        self.table.unsubscribe(endpoint, link, topic_filter)

    def on_publish(
        self, link: EndpointLink, endpoint: UserEndpoint, topic: str, payload: bytes, retain: bool
    ) -> bool:
        """A client PUBLISH. Refused unless an allow-list filter matches; never retained.

        May: deliver an allowed message, at QoS 0, to endpoint topics of the
        publisher's own organisation. Returns whether it was allowed.
        """
        if not any(topic_matches(f, topic) for f in self.publish_allow):
            log.warning("%s may not publish to %r; message dropped", endpoint.id, topic)
            return False
        self.service.relay(endpoint, topic, payload)
        return True

    def on_puback(self, link: EndpointLink, endpoint: UserEndpoint, packet_id: int) -> None:
        """May: complete the queued QoS 1 event that this PUBACK acknowledges."""
        self.table.acknowledge(endpoint, link, packet_id)

    def on_disconnect(self, link: EndpointLink, endpoint: UserEndpoint, clean: bool) -> None:
        """`link` ended, exactly once. May: detach it, and unregister an MQTT-made endpoint
        after a clean DISCONNECT. Must not: affect a newer link of the same endpoint."""
        self.table.disconnect(endpoint, link, clean)

    # ------------------------------------------- amqtt's own plugin hooks

    async def authenticate(self, *, session: Session) -> bool | None:
        """amqtt's auth hook, only reached if a stock amqtt code path is used: fail closed."""
        try:
            self.service.verifier.verify(session.password or "")
        except NotAuthenticated:
            return False
        return endpoint_id_problem(session.client_id) is None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        """amqtt's topic hook, for stock code paths: own endpoint topics only, receive-only."""
        if session is None or topic is None or session.client_id is None:
            return False
        endpoint = self.table.get(session.client_id)
        if endpoint is None:
            return False
        if action == Action.PUBLISH:
            return any(topic_matches(f, topic) for f in self.publish_allow)
        return endpoint.owns_topic(topic)
