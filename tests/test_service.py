"""EndpointService: every operation's input rules and access rules, over a real table on a fake clock.

Unit tests of the core: principals are built directly, the MQTT connection is a
recording FakeLink, and nothing starts a process or opens a socket. The process
tests keep one flow per route showing that these errors become HTTP problems.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from typing import Any

import orjson
import pytest

from endpoint_core.endpoint import DisconnectReason, EndpointState, UserEndpoint
from endpoint_core.errors import Conflict, DomainError, Forbidden, InvalidInput, NotAuthenticated, NotFound, Unavailable
from endpoint_core.principals import JwtVerifier, Principal
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable, TablePolicy
from tests.fakes import FakeClock, FakeLink
from tests.support import SECRET, event, token


def user(user_id: str, organization_id: str = "org-a") -> Principal:
    return Principal(user_id, organization_id, False, time.time() + 3600)


def service_caller(organization_id: str | None = None) -> Principal:
    return Principal("backend", organization_id, True, time.time() + 3600)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def endpoint_service(clock: FakeClock) -> EndpointService:
    return make_service(clock)


def make_service(clock: FakeClock, **policy: Any) -> EndpointService:
    return EndpointService(EndpointTable(TablePolicy(**policy), clock=clock), JwtVerifier(secret=SECRET))


def refused(kind: type[DomainError], call: Any, *args: Any) -> str | None:
    """Call, expect exactly a `kind` error with a detail; return the field it names."""
    with pytest.raises(DomainError) as caught:
        call(*args)
    assert type(caught.value) is kind, caught.value
    assert caught.value.detail
    return caught.value.field


def register(endpoint_service: EndpointService, principal: Principal, endpoint_id: str | None = None,
             keep_alive: int = 60, **extra: Any) -> UserEndpoint:
    body: dict[str, Any] = {"keepAliveSeconds": keep_alive, **extra}
    if endpoint_id is not None:
        body["userEndpointId"] = endpoint_id
    return endpoint_service.register(principal, body)


def connect(endpoint_service: EndpointService, principal: Principal, endpoint_id: str,
            *topics: str, qos: int = 1) -> tuple[UserEndpoint, FakeLink]:
    """An MQTT client of `principal` on `endpoint_id`, subscribed to `topics`."""
    link = FakeLink()
    endpoint, _ = endpoint_service.connect(principal, endpoint_id, 60, link, False)
    for topic in topics:
        assert endpoint_service.table.subscribe(endpoint, link, topic, qos) is not None
    return endpoint, link


# ------------------------------------------------------------ authentication


@pytest.mark.parametrize("header", [
    None,
    "",
    "Basic dXNlcjpwYXNz",
    "Bearer",
    "Bearer ",
    "Bearer    ",
    "Token " + token("alice"),
    "Bearer not-a-jwt",
    "Bearer " + token("mallory", secret="a-different-secret-0123456789-0123456789"),
    "Bearer " + token("late", ttl=-120),
    "Bearer " + token("early", nbf=4102444800),
    "Bearer " + token("forever", ttl=3600, exp=None),
    "Bearer " + token("orgless", None),
])
def test_requests_without_a_valid_bearer_token_are_not_authenticated(
    endpoint_service: EndpointService, header: str | None
) -> None:
    assert refused(NotAuthenticated, endpoint_service.authenticate_bearer, header) == "Authorization"


@pytest.mark.parametrize("template", ["Bearer {}", "bearer {}", "BEARER {}", "Bearer  {} "])
def test_a_bearer_token_gives_its_principal(endpoint_service: EndpointService, template: str) -> None:
    principal = endpoint_service.authenticate_bearer(template.format(token("alice", "acme")))
    assert (principal.user_id, principal.organization_id, principal.is_service) == ("alice", "acme", False)


def test_a_connect_token_is_verified_but_not_cached_and_a_bearer_token_is(endpoint_service: EndpointService) -> None:
    connect_token, bearer_token = token("alice", "acme"), token("bob", "acme")

    assert endpoint_service.authenticate_connect(connect_token).user_id == "alice"
    assert endpoint_service.authenticate_bearer(f"Bearer {bearer_token}").user_id == "bob"

    cache = endpoint_service.verifier._cache  # type: ignore[attr-defined]
    assert connect_token not in cache and bearer_token in cache


# ------------------------------------------------------------------ register


def test_register_makes_a_uuid_and_a_healthy_endpoint(endpoint_service: EndpointService) -> None:
    endpoint = register(endpoint_service, user("alice"), keep_alive=30)
    assert uuid.UUID(endpoint.id).version == 4
    assert endpoint_service.table.view(endpoint) == {
        "id": endpoint.id, "userId": "alice", "organizationId": "org-a", "keepAliveSeconds": 30,
        "state": "HEALTHY", "version": 0, "serverKeepAliveReminderOn": False, "connected": False,
        "connectedSince": None, "lastKeepaliveAgoSeconds": 0,
    }
    assert endpoint_service.get(user("alice"), endpoint.id) is endpoint


def test_register_keeps_a_caller_supplied_id_and_ignores_unknown_fields(endpoint_service: EndpointService) -> None:
    endpoint = register(endpoint_service, user("alice"), "tab-1", userId="someone-else", extra=[1])
    assert (endpoint.id, endpoint.user_id) == ("tab-1", "alice")


def test_registering_again_updates_in_place_and_increments_the_version(endpoint_service: EndpointService) -> None:
    first = register(endpoint_service, user("alice"), "e1", keep_alive=30)
    again = register(endpoint_service, user("alice"), "e1", keep_alive=45, serverKeepAliveReminderOn=True)
    assert again is first
    assert (again.keep_alive_seconds, again.version, again.server_keep_alive_reminder_on) == (45, 1, True)


@pytest.mark.parametrize("intruder", [user("intruder"), user("alice", "another-org")])
def test_registering_another_users_id_is_a_conflict(endpoint_service: EndpointService, intruder: Principal) -> None:
    register(endpoint_service, user("alice"), "e1")
    assert refused(Conflict, register, endpoint_service, intruder, "e1") == "userEndpointId"


def test_a_caller_without_an_organisation_cannot_register(endpoint_service: EndpointService) -> None:
    assert refused(Forbidden, register, endpoint_service, service_caller(None)) == "organization_id"


@pytest.mark.parametrize("body", [
    {},
    {"keepAliveSeconds": None},
    {"keepAliveSeconds": "30"},
    {"keepAliveSeconds": 30.5},
    {"keepAliveSeconds": 30.0},
    {"keepAliveSeconds": True},
    {"keepAliveSeconds": [30]},
    {"keepAliveSeconds": 0},
    {"keepAliveSeconds": -5},
    {"keepAliveSeconds": 86401},
])
def test_keep_alive_seconds_is_a_mandatory_integer_in_range(
    endpoint_service: EndpointService, body: dict[str, Any]
) -> None:
    assert refused(InvalidInput, endpoint_service.register, user("alice"), body) == "keepAliveSeconds"
    assert len(endpoint_service.table) == 0


@pytest.mark.parametrize("keep_alive", [1, 86400])
def test_keep_alive_seconds_bounds_are_inclusive(endpoint_service: EndpointService, keep_alive: int) -> None:
    assert register(endpoint_service, user("alice"), keep_alive=keep_alive).keep_alive_seconds == keep_alive


def test_the_keep_alive_maximum_is_the_policys(clock: FakeClock) -> None:
    endpoint_service = make_service(clock, max_keep_alive_seconds=100)
    register(endpoint_service, user("alice"), keep_alive=100)
    assert refused(InvalidInput, register, endpoint_service, user("alice"), None, 101) == "keepAliveSeconds"


@pytest.mark.parametrize("endpoint_id", ["", "a/b", "a+b", "a#b", "a b", "tab\t1", "line\n", "nul\x00", "x" * 129,
                                         17, ["x"], {"id": "x"}, True])
def test_endpoint_ids_must_be_one_topic_level(endpoint_service: EndpointService, endpoint_id: object) -> None:
    body = {"keepAliveSeconds": 30, "userEndpointId": endpoint_id}
    assert refused(InvalidInput, endpoint_service.register, user("alice"), body) == "userEndpointId"


@pytest.mark.parametrize("endpoint_id", ["x" * 128, "ä-ö:tab.~!", "$dollar", "ü" * 128, "e-1_2"])
def test_the_longest_id_and_unusual_characters_are_accepted(
    endpoint_service: EndpointService, endpoint_id: str
) -> None:
    assert register(endpoint_service, user("alice"), endpoint_id).id == endpoint_id


@pytest.mark.parametrize("flag", ["yes", "true", 1, 0, [], {}])
def test_the_reminder_flag_must_be_a_boolean(endpoint_service: EndpointService, flag: object) -> None:
    body = {"keepAliveSeconds": 30, "serverKeepAliveReminderOn": flag}
    assert refused(InvalidInput, endpoint_service.register, user("alice"), body) == "serverKeepAliveReminderOn"


@pytest.mark.parametrize(("flag", "stored"), [(None, False), (False, False), (True, True)])
def test_the_reminder_flag_is_optional(endpoint_service: EndpointService, flag: bool | None, stored: bool) -> None:
    body = {"keepAliveSeconds": 30, "serverKeepAliveReminderOn": flag}
    assert endpoint_service.register(user("alice"), body).server_keep_alive_reminder_on is stored


@pytest.mark.parametrize("body", [[1, 2], "text", None, 5, True, [{"keepAliveSeconds": 30}], [event()]])
def test_a_body_that_is_not_a_json_object_is_refused_by_every_command(
    endpoint_service: EndpointService, body: object
) -> None:
    alice = user("alice")
    for command in (endpoint_service.register, endpoint_service.keepalive, endpoint_service.unregister,
                    endpoint_service.send_event):
        assert refused(InvalidInput, command, alice, body) == "body"


# ----------------------------------------------------------------- keepalive


@pytest.mark.parametrize("body", [{}, {"userEndpointId": None}, {"userEndpointId": 5}, {"userEndpointId": "a/b"},
                                  {"userEndpointId": ""}])
def test_keepalive_and_unregister_need_a_valid_endpoint_id(
    endpoint_service: EndpointService, body: dict[str, Any]
) -> None:
    assert refused(InvalidInput, endpoint_service.keepalive, user("alice"), body) == "userEndpointId"
    assert refused(InvalidInput, endpoint_service.unregister, user("alice"), body) == "userEndpointId"


def test_rest_keepalives_keep_an_endpoint_healthy_and_their_absence_expires_it(
    endpoint_service: EndpointService, clock: FakeClock
) -> None:
    alice = user("alice")
    endpoint = register(endpoint_service, alice, "e1", keep_alive=1)
    table = endpoint_service.table
    for _ in range(12):  # three times the keep-alive, a keepalive every quarter
        clock.now += 0.25
        table.advance()
        endpoint_service.keepalive(alice, {"userEndpointId": "e1", "userId": "alice"})  # the iOS extra is ignored
    assert endpoint.state is EndpointState.HEALTHY and not endpoint.removed
    clock.now += 1.01
    table.advance()
    assert endpoint_service.get(alice, "e1").state is EndpointState.SICK
    endpoint_service.keepalive(alice, {"userEndpointId": "e1"})
    assert endpoint.state is EndpointState.HEALTHY
    clock.now += 2.01  # keep-alive plus the minimum grace of 1 s
    table.advance()
    assert refused(NotFound, endpoint_service.get, alice, "e1") == "userEndpointId"


# -------------------------------------------------------------- access rules


def call(endpoint_service: EndpointService, operation: str, principal: Principal, endpoint_id: str) -> None:
    if operation == "get":
        endpoint_service.get(principal, endpoint_id)
    elif operation == "keepalive":
        endpoint_service.keepalive(principal, {"userEndpointId": endpoint_id})
    else:
        endpoint_service.unregister(principal, {"userEndpointId": endpoint_id})


OPERATIONS = ["get", "keepalive", "unregister"]


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("caller", [user("owner"), service_caller(), service_caller("org-elsewhere")])
def test_the_owner_and_a_service_may_act_on_an_endpoint(
    endpoint_service: EndpointService, clock: FakeClock, operation: str, caller: Principal
) -> None:
    endpoint = register(endpoint_service, user("owner"), "e1")
    clock.now += 5
    if operation == "get":
        assert endpoint_service.get(caller, "e1") is endpoint
    call(endpoint_service, operation, caller, "e1")
    assert endpoint.removed is (operation == "unregister")
    assert endpoint.last_keepalive == (clock.now if operation == "keepalive" else clock.now - 5)


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize(("caller", "error"), [
    (user("colleague"), Forbidden),  # same organisation, another user
    (user("owner", "org-b"), NotFound),  # same user name, another organisation: as if it did not exist
])
def test_other_users_get_403_and_other_organisations_404(
    endpoint_service: EndpointService, clock: FakeClock, operation: str, caller: Principal,
    error: type[DomainError],
) -> None:
    endpoint = register(endpoint_service, user("owner"), "e1")
    registered_at = clock.now
    clock.now += 5
    assert refused(error, call, endpoint_service, operation, caller, "e1") == "userEndpointId"
    assert not endpoint.removed and endpoint.last_keepalive == registered_at


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("caller", [user("owner"), service_caller()])
def test_an_unknown_endpoint_is_404(endpoint_service: EndpointService, operation: str, caller: Principal) -> None:
    assert refused(NotFound, call, endpoint_service, operation, caller, "nope") == "userEndpointId"


def test_other_organisations_look_exactly_like_unknown_ids(endpoint_service: EndpointService) -> None:
    register(endpoint_service, user("owner"), "e1")
    stranger = user("owner", "org-b")
    with pytest.raises(NotFound) as foreign:
        endpoint_service.get(stranger, "e1")
    with pytest.raises(NotFound) as unknown:
        endpoint_service.get(stranger, "e2")
    assert foreign.value.detail.replace("e1", "?") == unknown.value.detail.replace("e2", "?")


# ---------------------------------------------------------------- unregister


def test_unregister_removes_the_endpoint_and_closes_its_connection(
    endpoint_service: EndpointService, caplog: pytest.LogCaptureFixture
) -> None:
    alice = user("alice")
    register(endpoint_service, alice, "e1")
    _, link = connect(endpoint_service, alice, "e1")
    with caplog.at_level(logging.INFO, "endpoint_broker.table"):
        endpoint_service.unregister(alice, {"userEndpointId": "e1", "reason": "User logout"})
    assert link.closed == [DisconnectReason.UNREGISTERED]
    assert "endpoint e1 removed: unregistered ('User logout')" in caplog.text
    assert refused(NotFound, endpoint_service.get, alice, "e1") == "userEndpointId"
    assert refused(NotFound, endpoint_service.unregister, alice, {"userEndpointId": "e1"}) == "userEndpointId"


def test_the_unregister_reason_is_optional(endpoint_service: EndpointService) -> None:
    alice = user("alice")
    for body in ({"userEndpointId": "e1"}, {"userEndpointId": "e1", "reason": None},
                 {"userEndpointId": "e1", "reason": ""}):
        register(endpoint_service, alice, "e1")
        _, link = connect(endpoint_service, alice, "e1")
        endpoint_service.unregister(alice, body)
        assert link.closed == [DisconnectReason.UNREGISTERED]


@pytest.mark.parametrize("block", ["yes", 1, [True]])
def test_the_unregister_block_flag_must_be_a_boolean(endpoint_service: EndpointService, block: object) -> None:
    alice = user("alice")
    endpoint = register(endpoint_service, alice, "e1")
    body = {"userEndpointId": "e1", "block": block}
    assert refused(InvalidInput, endpoint_service.unregister, alice, body) == "block"
    assert not endpoint.removed


def test_a_blocking_unregister_refuses_the_clients_reconnect(endpoint_service: EndpointService) -> None:
    alice = user("alice")
    register(endpoint_service, alice, "e1")
    endpoint_service.unregister(alice, {"userEndpointId": "e1", "block": True})
    assert refused(Forbidden, endpoint_service.connect, alice, "e1", 60, FakeLink(), False) == "client id"
    assert len(endpoint_service.table) == 0
    endpoint_service.unregister(alice, {"userEndpointId": register(endpoint_service, alice, "e2").id})
    endpoint_service.connect(alice, "e2", 60, FakeLink(), False)  # without the flag it may come back


@pytest.mark.parametrize("reason", [7, True, ["logout"], {"text": "logout"}])
def test_the_unregister_reason_must_be_a_string(endpoint_service: EndpointService, reason: object) -> None:
    alice = user("alice")
    endpoint = register(endpoint_service, alice, "e1")
    body = {"userEndpointId": "e1", "reason": reason}
    assert refused(InvalidInput, endpoint_service.unregister, alice, body) == "reason"
    assert not endpoint.removed


def test_an_unknown_endpoint_is_404_before_its_reason_is_checked(endpoint_service: EndpointService) -> None:
    body = {"userEndpointId": "nope", "reason": 7}
    assert refused(NotFound, endpoint_service.unregister, user("alice"), body) == "userEndpointId"


def test_the_unregister_reason_is_quoted_and_capped_for_the_log(
    endpoint_service: EndpointService, caplog: pytest.LogCaptureFixture
) -> None:
    alice = user("alice")
    register(endpoint_service, alice, "e1")
    forged = "logout\n2026-01-01 00:00:00,000 WARNING endpoint_broker.events: FORGED" + "x" * 500
    with caplog.at_level(logging.INFO, "endpoint_broker.table"):
        endpoint_service.unregister(alice, {"userEndpointId": "e1", "reason": forged})
    (line,) = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert "\n" not in line and "'logout\\n2026-01-01 " in line  # escaped: it cannot start a line of its own
    assert "x" * 300 not in line and f"({len(forged)} chars)" in line  # capped, saying how long it was


# ------------------------------------------------------------------- listing


def test_a_user_lists_only_its_own_endpoints(endpoint_service: EndpointService) -> None:
    mine = {register(endpoint_service, user("me")).id for _ in range(2)}
    register(endpoint_service, user("you"))
    register(endpoint_service, user("me", "elsewhere"))
    me = user("me")
    assert {e.id for e in endpoint_service.list(me)} == mine
    assert {e.id for e in endpoint_service.list(me, "me")} == mine
    assert {e.id for e in endpoint_service.list(me, "me", "org-a")} == mine
    assert {e.id for e in endpoint_service.list(me, None, "org-a")} == mine


def test_a_user_may_not_list_anyone_else(endpoint_service: EndpointService) -> None:
    me = user("me")
    assert refused(Forbidden, endpoint_service.list, me, "you") == "userId"
    assert refused(Forbidden, endpoint_service.list, me, None, "elsewhere") == "organizationId"
    assert refused(Forbidden, endpoint_service.list, me, "me", "elsewhere") == "organizationId"


def test_a_service_lists_any_user_and_organisation_by_filter(endpoint_service: EndpointService) -> None:
    alice = register(endpoint_service, user("alice")).id
    bob = register(endpoint_service, user("bob")).id
    elsewhere = register(endpoint_service, user("alice", "far")).id
    backend = service_caller()
    assert [e.id for e in endpoint_service.list(backend, "alice", "org-a")] == [alice]
    assert {e.id for e in endpoint_service.list(backend, None, "org-a")} == {alice, bob}
    assert {e.id for e in endpoint_service.list(backend, "alice")} == {alice, elsewhere}
    assert endpoint_service.list(backend) == []  # unfiltered: its own endpoints, and it has none


# --------------------------------------------------------------- sendEvent


def send(endpoint_service: EndpointService, principal: Principal, **body: Any) -> int:
    return endpoint_service.send_event(principal, {"event": event(), **body})


def test_a_user_without_endpoints_gets_zero(endpoint_service: EndpointService) -> None:
    assert send(endpoint_service, user("sender"), userId="nobody") == 0
    assert send(endpoint_service, user("sender"), userId="nobody", qos=1) == 0


def test_fan_out_to_every_endpoint_of_the_user_or_to_one(endpoint_service: EndpointService) -> None:
    alice = user("alice")
    links = [connect(endpoint_service, alice, f"e{n}", f"users/endpoints/e{n}")[1] for n in range(3)]
    _, bystander = connect(endpoint_service, user("bob"), "by", "users/endpoints/by")
    payload = event(callId="c-1", nested={"list": [1, 2.5, None, True], "text": "héllo"})
    assert endpoint_service.send_event(user("sender"), {"userId": "alice", "event": payload}) == 3
    for n, link in enumerate(links):
        assert link.sent == [(f"users/endpoints/e{n}", orjson.dumps(payload), 0, None, False)]
    assert bystander.sent == []
    assert send(endpoint_service, user("sender"), userId="alice", userEndpointId="e1") == 1
    assert [len(link.sent) for link in links] == [1, 2, 1]


def test_counts_for_qos0_and_qos1(endpoint_service: EndpointService) -> None:
    alice = user("alice")
    register(endpoint_service, alice, "offline")
    connect(endpoint_service, alice, "unsubscribed")
    _, live = connect(endpoint_service, alice, "live", "users/endpoints/live")
    # QoS 0: only the endpoints with a live subscription that was written to.
    assert send(endpoint_service, alice, userId="alice", qos=0) == 1
    assert send(endpoint_service, alice, userId="alice", qos=2) == 1  # any other integer is best effort
    assert [qos for _, _, qos, _, _ in live.sent] == [0, 0]
    # QoS 1: sent or queued, for every endpoint.
    assert send(endpoint_service, alice, userId="alice", qos=1) == 3
    assert [qos for _, _, qos, _, _ in live.sent] == [0, 0, 1]
    for endpoint_id in ("offline", "unsubscribed", "live"):
        outbox = endpoint_service.get(alice, endpoint_id).outbox
        assert outbox is not None and len(outbox) == 1


def test_qos0_written_to_a_stuck_link_is_not_counted(endpoint_service: EndpointService) -> None:
    _, link = connect(endpoint_service, user("alice"), "e1", "users/endpoints/e1")
    link.accepts = False
    assert send(endpoint_service, user("alice"), userId="alice") == 0


def test_a_service_must_name_the_organisation(endpoint_service: EndpointService) -> None:
    body = {"userId": "u", "event": event()}
    assert refused(InvalidInput, endpoint_service.send_event, service_caller(), body) == "organizationId"
    assert refused(InvalidInput, endpoint_service.send_event, service_caller("org-a"), body) == "organizationId"


def test_a_user_may_name_only_its_own_organisation(endpoint_service: EndpointService) -> None:
    body = {"userId": "u", "organizationId": "org-b", "event": event()}
    assert refused(Forbidden, endpoint_service.send_event, user("sender", "org-a"), body) == "organizationId"
    assert send(endpoint_service, user("sender", "org-a"), userId="u", organizationId="org-a") == 0


def test_organisations_are_isolated_both_ways_and_a_service_picks_one(endpoint_service: EndpointService) -> None:
    _, in_a = connect(endpoint_service, user("same-name", "a"), "ea", "users/endpoints/ea")
    _, in_b = connect(endpoint_service, user("same-name", "b"), "eb", "users/endpoints/eb")
    assert send(endpoint_service, user("x", "a"), userId="same-name") == 1
    assert (len(in_a.sent), len(in_b.sent)) == (1, 0)
    assert send(endpoint_service, user("y", "b"), userId="same-name") == 1
    assert (len(in_a.sent), len(in_b.sent)) == (1, 1)
    assert send(endpoint_service, service_caller(), userId="same-name", organizationId="b") == 1
    assert (len(in_a.sent), len(in_b.sent)) == (1, 2)


@pytest.mark.parametrize(("target_user", "endpoint_id"), [
    ("bob", "alice-1"),  # not bob's
    ("alice", "alice-far"),  # alice's, in another organisation
    ("alice", "nope"),  # unknown
])
def test_a_named_endpoint_must_be_the_users_in_the_organisation(
    endpoint_service: EndpointService, target_user: str, endpoint_id: str
) -> None:
    register(endpoint_service, user("alice"), "alice-1")
    register(endpoint_service, user("alice", "far"), "alice-far")
    body = {"userId": target_user, "userEndpointId": endpoint_id, "event": event(), "qos": 1}
    assert refused(NotFound, endpoint_service.send_event, user("bob"), body) == "userEndpointId"
    assert all(e.outbox is None for e in endpoint_service.table)


def test_full_queues_refuse_the_event_and_say_so(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    endpoint_service = make_service(clock, queue_max_events=2)
    busy = user("busy")
    register(endpoint_service, busy, "full-ep")
    assert [send(endpoint_service, busy, userId="busy", qos=1) for _ in range(2)] == [1, 1]
    body = {"userId": "busy", "qos": 1, "event": event()}
    assert refused(Unavailable, endpoint_service.send_event, busy, body) == "userEndpointId"
    # Another endpoint of the same user can still take events: it is counted, the full one is not.
    register(endpoint_service, busy, "roomy-ep")
    with caplog.at_level(logging.WARNING, "endpoint_broker.service"):
        assert send(endpoint_service, busy, userId="busy", qos=1) == 1
    assert "queue full" in caplog.text and "full-ep" in caplog.text and "roomy-ep" not in caplog.text
    # Delivering and acknowledging drains the queue, and then it takes events again.
    endpoint, link = connect(endpoint_service, busy, "full-ep", "users/endpoints/full-ep")
    endpoint_service.table.flush(endpoint, link)
    assert len(link.sent) == 2
    for _, _, _, packet_id, _ in link.sent:
        assert packet_id is not None
        endpoint_service.table.acknowledge(endpoint, link, packet_id)
    assert send(endpoint_service, busy, userId="busy", userEndpointId="full-ep", qos=1) == 1


def test_an_event_nested_too_deeply_to_send_is_invalid(endpoint_service: EndpointService) -> None:
    nested: dict[str, Any] = {}
    deepest = nested
    for _ in range(300):
        deepest["next"] = {}
        deepest = deepest["next"]
    body = {"userId": "nobody", "event": event(nested=nested)}
    assert refused(InvalidInput, endpoint_service.send_event, user("deep"), body) == "event"


def test_the_largest_mask_search_allowed_is_accepted(endpoint_service: EndpointService) -> None:
    body = {"userId": "nobody", "event": event(items=list(range(1200))), "masks": ["$..zz"] * 16}
    assert endpoint_service.send_event(user("masker"), body) == 0


def test_masks_hide_secrets_from_the_event_log_but_not_from_subscribers(
    endpoint_service: EndpointService, caplog: pytest.LogCaptureFixture
) -> None:
    alice = user("alice")
    _, link = connect(endpoint_service, alice, "e1", "users/endpoints/e1")
    payload = event(credentials={"password": "hunter2"}, guests=[{"pin": "4242"}, {"pin": "x"}], note="visible")
    body = {"userId": "alice", "qos": 1, "event": payload, "masks": ["$.credentials.password", "$.guests[*].pin"]}
    with caplog.at_level(logging.INFO, "endpoint_broker.events"):
        assert endpoint_service.send_event(alice, body) == 1
    assert orjson.loads(link.sent[0][1]) == payload
    assert "hunter2" not in caplog.text and "4242" not in caplog.text
    (record,) = [r for r in caplog.records if r.name == "endpoint_broker.events"]
    logged = orjson.loads(record.getMessage().split("sendEvent ", 1)[1])
    assert logged["event"] == {**payload, "credentials": {"password": "*******"}, "guests": [{"pin": "****"},
                                                                                         {"pin": "*"}]}
    assert (logged["type"], logged["organizationId"], logged["userId"], logged["userEndpointId"],
            logged["endpoints"], logged["qos"]) == ("CallCreatedEvent", "org-a", "alice", None, 1, 1)


# ---------------------------------------------------------------------- MQTT


def test_connect_refuses_a_token_past_its_exp(endpoint_service: EndpointService) -> None:
    late = Principal("alice", "org-a", False, time.time() - 1)  # accepted by the verifier's leeway, not here
    with pytest.raises(NotAuthenticated) as caught:
        endpoint_service.connect(late, "e1", 60, FakeLink(), False)
    assert caught.value.field == "Authorization"
    assert len(endpoint_service.table) == 0


def test_connect_registers_and_attaches(endpoint_service: EndpointService) -> None:
    link = FakeLink()
    endpoint, session_present = endpoint_service.connect(user("alice"), "e1", 25, link, False)
    assert (endpoint.id, endpoint.keep_alive_seconds, endpoint.link, session_present) == ("e1", 25, link, False)
    assert endpoint_service.table.view(endpoint_service.get(user("alice"), "e1"))["connected"] is True


def test_the_view_says_since_when_connected_and_how_long_ago_the_last_keepalive_was(
    endpoint_service: EndpointService, clock: FakeClock
) -> None:
    link = FakeLink()
    before = time.time()
    endpoint, _ = endpoint_service.connect(user("alice"), "e1", 0, link, False)
    clock.now += 42.7
    view = endpoint_service.table.view(endpoint)
    assert view["lastKeepaliveAgoSeconds"] == 42
    since = datetime.datetime.fromisoformat(view["connectedSince"]).timestamp()
    assert before - 1 <= since + 42.7 <= time.time() + 1  # 42.7 s before now, on the wall clock
    endpoint_service.table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    assert endpoint_service.table.view(endpoint)["connectedSince"] is None


@pytest.fixture
def relay_setup(endpoint_service: EndpointService) -> tuple[UserEndpoint, FakeLink, FakeLink]:
    """A publisher and a peer in org-a (the peer subscribed to its spec topic) and a subscriber in org-b."""
    publisher, _ = connect(endpoint_service, user("p"), "publisher")
    _, peer = connect(endpoint_service, user("t"), "peer", "users/endpoints/peer")
    _, foreign = connect(endpoint_service, user("f", "org-b"), "foreign", "users/endpoints/foreign",
                         "user/f/foreign")
    return publisher, peer, foreign


def test_relay_reaches_a_subscribed_topic_in_the_same_organisation_at_qos0(
    endpoint_service: EndpointService, relay_setup: tuple[UserEndpoint, FakeLink, FakeLink]
) -> None:
    publisher, peer, _ = relay_setup
    assert endpoint_service.relay(publisher, "users/endpoints/peer", b"hello")
    assert peer.sent == [("users/endpoints/peer", b"hello", 0, None, False)]


@pytest.mark.parametrize("topic", [
    "users/endpoints/foreign", "user/f/foreign",  # another organisation
    "user/t/peer",  # the peer's own form, but it did not subscribe to it
    "user/someone-else/peer",  # names the wrong user
    "users/endpoints/nobody",  # no such endpoint
    "users/endpoints", "users/endpoints/peer/x", "anything", "",  # not an endpoint topic
])
def test_relay_refuses_everything_else(
    endpoint_service: EndpointService, relay_setup: tuple[UserEndpoint, FakeLink, FakeLink], topic: str
) -> None:
    publisher, peer, foreign = relay_setup
    assert not endpoint_service.relay(publisher, topic, b"hello")
    assert peer.sent == [] and foreign.sent == []


def test_relay_uses_the_user_form_once_subscribed_and_needs_a_live_link(
    endpoint_service: EndpointService, relay_setup: tuple[UserEndpoint, FakeLink, FakeLink]
) -> None:
    publisher, peer_link, _ = relay_setup
    peer = endpoint_service.get(user("t"), "peer")
    assert endpoint_service.table.subscribe(peer, peer_link, "user/t/peer") is not None
    assert endpoint_service.relay(publisher, "user/t/peer", b"hi")
    endpoint_service.table.disconnect(peer, peer_link, DisconnectReason.DROPPED)
    assert not endpoint_service.relay(publisher, "users/endpoints/peer", b"gone")
    assert peer_link.payloads == [b"hi"]
