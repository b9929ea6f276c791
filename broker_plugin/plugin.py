"""EndpointPlugin: the amqtt plugin that decides what MQTT clients may do, over the domain core.

amqtt loads it from the broker config like any plugin. Its three callbacks are the
decisions a connection cannot make by itself, in the style of Mosquitto's plugin
events: may this CONNECT register or attach (and with which CONNACK code), may this
filter be subscribed, may this PUBLISH be relayed. Each has a contract saying what it
may change. MqttLink calls them synchronously and in packet order (amqtt's own event
callbacks run later, as unordered tasks). A callback receives the link only to pass
it to the table, which compares identities; it never keeps it.

Every rule itself lives in the domain core (endpoint_core); these callbacks only
translate between MQTT and it. The mechanics that need no decision (a keepalive per
packet, a PUBACK, an UNSUBSCRIBE, a detach) go from the link to the table directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from broker_plugin import codec
from endpoint_core.endpoint import EndpointLink, UserEndpoint
from endpoint_core.errors import Conflict, DomainError, Forbidden, NotAuthenticated, RateLimited, Unavailable
from endpoint_core.feeds import is_lifecycle_filter
from endpoint_core.ids import endpoint_id_problem
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from endpoint_core.topics import topic_matches


@dataclass(frozen=True, slots=True)
class ConnectVerdict:
    code: int  # the CONNACK return code
    reason: str = ""
    endpoint: UserEndpoint | None = None
    principal: Principal | None = None
    session_present: bool = False


class EndpointPlugin(BasePlugin[BrokerContext]):
    @dataclass
    class Config:
        # The EndpointService shared with the HTTP bridge: one table, one verifier.
        service: Any = None
        # Topic filters clients may PUBLISH to. Empty: client PUBLISH is refused.
        client_publish_allow: list[str] = field(default_factory=list)

    def __init__(self, context: BrokerContext) -> None:
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
    ) -> ConnectVerdict | asyncio.Future[ConnectVerdict]:
        """Decide a CONNECT, before any CONNACK is written (in a cluster, once Redis has answered).

        May: register a new endpoint or attach `link` to the caller's existing one
        (closing the link it replaces). Must not: touch any other endpoint. On
        refusal nothing has changed, and nothing is left in the broker. Codes:
        2 for a client id that is not an endpoint id, 4 for missing or bad
        credentials, 5 for an id that is not the caller's to use, 3 when the service
        cannot decide now (a rate limit, or the cluster's Redis is unreachable).
        """
        problem = endpoint_id_problem(client_id) if client_id else "must not be empty"
        if problem is not None:
            return ConnectVerdict(codec.IDENTIFIER_REJECTED, f"client id {problem}")
        if not username or not password:
            self.service.stats.auth_failed("missing", "mqtt")
            return ConnectVerdict(codec.BAD_USERNAME_OR_PASSWORD, "a username and a token password are required")
        try:
            principal = self.service.authenticate_connect(password)
            attached = self.service.connect(
                principal, client_id, keep_alive, link, persistent_session=not clean_session
            )
        except DomainError as exc:
            return self._refusal(exc)
        if isinstance(attached, asyncio.Future):
            # A cluster node (cluster.service) asks Redis first: the verdict follows its answer.
            return _chain(attached, lambda done: self._verdict(done, principal))
        endpoint, session_present = attached
        return ConnectVerdict(codec.ACCEPTED, "", endpoint, principal, session_present)

    def _verdict(self, attached: asyncio.Future[tuple[UserEndpoint, bool]], principal: Principal) -> ConnectVerdict:
        exc = attached.exception()
        if isinstance(exc, DomainError):
            return self._refusal(exc)
        if exc is not None:
            raise exc
        endpoint, session_present = attached.result()
        return ConnectVerdict(codec.ACCEPTED, "", endpoint, principal, session_present)

    def _refusal(self, exc: DomainError) -> ConnectVerdict:
        """The CONNACK code of a refused CONNECT (see on_connect)."""
        if isinstance(exc, NotAuthenticated):
            self.service.stats.auth_failed(exc.reason, "mqtt")
            return ConnectVerdict(codec.BAD_USERNAME_OR_PASSWORD, exc.detail)
        if isinstance(exc, (Conflict, Forbidden)):
            return ConnectVerdict(codec.NOT_AUTHORIZED, exc.detail)
        if isinstance(exc, (RateLimited, Unavailable)):
            return ConnectVerdict(codec.SERVER_UNAVAILABLE, exc.detail)
        return ConnectVerdict(codec.IDENTIFIER_REJECTED, exc.detail)

    def on_subscribe(self, link: EndpointLink, endpoint: UserEndpoint, topic_filter: str, qos: int,
                     principal: Principal) -> int:
        """Return the granted QoS or 0x80. May: add the filter to the endpoint's subscriptions.

        Only the endpoint's own topics are granted; wildcards, other endpoints'
        topics and $SYS are refused. QoS 2 is granted as 1: events go out at most at QoS 1.
        Under `$events/` the lifecycle rule decides (endpoint_core.feeds), for the connection only.
        """
        if is_lifecycle_filter(topic_filter):
            granted = self.service.feeds.subscribe(principal, link, topic_filter, qos)
            return codec.SUBACK_FAILURE if granted is None else granted
        granted = self.table.subscribe(endpoint, link, topic_filter, qos)
        return codec.SUBACK_FAILURE if granted is None else granted

    def on_publish(
        self, link: EndpointLink, endpoint: UserEndpoint, topic: str, payload: bytes, retain: bool
    ) -> bool:
        """A client PUBLISH. Refused unless an allow-list filter matches; never retained.

        May: deliver an allowed message, at QoS 0, to endpoint topics of the
        publisher's own organisation. Returns whether it was allowed.
        """
        if not any(topic_matches(f, topic) for f in self.publish_allow):
            return False
        self.service.relay(endpoint, topic, payload)
        return True


Attached = asyncio.Future[tuple[UserEndpoint, bool]]


def _chain(future: Attached, verdict: Callable[[Attached], ConnectVerdict]) -> asyncio.Future[ConnectVerdict]:
    """A future of the verdict that `verdict` makes of `future` once it is done."""
    chained: asyncio.Future[ConnectVerdict] = asyncio.get_running_loop().create_future()

    def done(attached: Attached) -> None:
        if chained.cancelled():
            return
        try:
            chained.set_result(verdict(attached))
        except BaseException as exc:
            chained.set_exception(exc)

    future.add_done_callback(done)
    return chained
