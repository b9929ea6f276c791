"""sendEvent: validated, masked, delivered at least once; over HTTP, received by real MQTT subscribers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import RawMqtt, ServiceProcess, event, paho_client, service_token, token, wait_until

SEND = "/rtc-api/users/endpoints/sendEvent"


def assert_problem(response: Any, status: int, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json().get("field") == field


# --------------------------------------------------------------- validation


@pytest.mark.parametrize(("body", "field"), [
    ({"userId": "u"}, "event"),
    ({"userId": "u", "event": "CallCreatedEvent"}, "event"),
    ({"userId": "u", "event": [event()]}, "event"),
    ({"userId": "u", "event": {"timestamp": "2011-12-03T10:15:30Z"}}, "event.type"),
    ({"userId": "u", "event": event("callCreated")}, "event.type"),
    ({"userId": "u", "event": event("callCreatedEvent")}, "event.type"),
    ({"userId": "u", "event": event("Event")}, "event.type"),
    ({"userId": "u", "event": event("CallEvent")}, "event.type"),
    ({"userId": "u", "event": event("CallCreated")}, "event.type"),
    ({"userId": "u", "event": event("Call_CreatedEvent")}, "event.type"),
    ({"userId": "u", "event": event("CallCreatedEvents")}, "event.type"),
    ({"userId": "u", "event": event(1)}, "event.type"),  # type: ignore[arg-type]
    ({"userId": "u", "event": {"type": "CallCreatedEvent"}}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-12-03T10:15:30")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-12-03T10:15:30+01:00")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-12-03")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-13-03T10:15:30Z")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-12-03T25:15:30Z")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="2011-12-03T10:15:30.Z")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp=1322907330)}, "event.timestamp"),
    ({"event": event()}, "userId"),
    ({"userId": "", "event": event()}, "userId"),
    ({"userId": 7, "event": event()}, "userId"),
    ({"userId": "u", "event": event(), "userEndpointId": 5}, "userEndpointId"),
    ({"userId": "u", "event": event(), "userEndpointId": "a/b"}, "userEndpointId"),
    ({"userId": "u", "event": event(), "organizationId": 5}, "organizationId"),
    ({"userId": "u", "event": event(), "qos": "1"}, "qos"),
    ({"userId": "u", "event": event(), "qos": 1.0}, "qos"),
    ({"userId": "u", "event": event(), "masks": "$.secret"}, "masks"),
    ({"userId": "u", "event": event(), "masks": [5]}, "masks[0]"),
    ({"userId": "u", "event": event(), "masks": ["$.ok", "$.["]}, "masks[1]"),
    ({"userId": "u", "event": event(), "masks": ["$..["]}, "masks[0]"),
    ({"userId": "u", "event": event(n=5), "masks": ["$.n"]}, "masks[0]"),
    ({"userId": "u", "event": event(inner={"a": "b"}), "masks": ["$.inner"]}, "masks[0]"),
    ({"userId": "u", "event": event(items=["x", 2]), "masks": ["$.items[*]"]}, "masks[0]"),
    # Functions and the like compute values instead of naming places: masking them would hide nothing.
    ({"userId": "u", "event": event(password="pw"), "masks": ["$.password.`sub(/zzz/, q)`"]}, "masks[0]"),
    ({"userId": "u", "event": event(password="pw"), "masks": ["$.password.`split(a, 0, -1)`"]}, "masks[0]"),
    ({"userId": "u", "event": event(items=["pw"]), "masks": ["$.items.`len`"]}, "masks[0]"),
    ({"userId": "u", "event": event(inner={"pw": "x"}), "masks": ["$.inner.pw.`parent`"]}, "masks[0]"),
    ({"userId": "u", "event": event(), "masks": ["$.type"] * 17}, "masks"),
    # A caller's regex would run on the event loop (ReDoS); a deeply nested mask once answered 500.
    ({"userId": "u", "event": event(x=[{"s": "a" * 25 + "!"}]), "masks": ["$.type", '$.x[?(@.s =~ "(a+)+$")].s']},
     "masks[1]"),
    ({"userId": "u", "event": event(), "masks": ["$" + ".a" * 3000]}, "masks[0]"),
    ({"userId": "u", "event": event(items=list(range(4000))), "masks": ["$..zz"] * 6}, "masks"),
    ({"userId": "u", "event": event(timestamp="2011-12-03T10:15:30.\u0661\u0662Z")}, "event.timestamp"),
    ({"userId": "u", "event": event(timestamp="\u0662011-12-03T10:15:30Z")}, "event.timestamp"),
    ([event()], "body"),
])
def test_invalid_requests_are_400_naming_the_field(service: ServiceProcess, body: Any, field: str) -> None:
    response = service.send_event(token("sender"), body)
    assert_problem(response, 400, field)


@pytest.mark.parametrize("event_type", ["CallCreatedEvent", "ConferenceStreamPublishedEvent",
                                        "IceCandidatesFoundEvent", "Snapshot2AcquiredEvent"])
@pytest.mark.parametrize("timestamp", ["2011-12-03T10:15:30Z", "2011-12-03T10:15:30.123Z",
                                       "2011-12-03T10:15:30.123456789Z"])
def test_valid_types_and_timestamps(service: ServiceProcess, event_type: str, timestamp: str) -> None:
    response = service.send_event(token("sender"), {"userId": "nobody", "event": event(event_type,
                                                                                        timestamp=timestamp)})
    assert response.status_code == 200 and response.json() == 0


def test_a_user_without_endpoints_gives_zero(service: ServiceProcess, unique: str) -> None:
    assert service.send_event(token("sender"), {"userId": f"nobody-{unique}", "event": event()}).json() == 0


def test_a_service_must_name_the_organisation(service: ServiceProcess) -> None:
    assert_problem(service.send_event(service_token(), {"userId": "u", "event": event()}), 400, "organizationId")


def test_a_user_may_not_name_another_organisation(service: ServiceProcess) -> None:
    response = service.send_event(token("sender", "org-a"),
                                  {"userId": "u", "organizationId": "org-b", "event": event()})
    assert_problem(response, 403, "organizationId")
    same = service.send_event(token("sender", "org-a"), {"userId": "u", "organizationId": "org-a", "event": event()})
    assert same.status_code == 200


def test_a_missing_or_invalid_token_is_401(service: ServiceProcess) -> None:
    with service.http() as http:
        assert_problem(http.post(SEND, json={"userId": "u", "event": event()}), 401, "Authorization")
    assert_problem(service.send_event("garbage", {"userId": "u", "event": event()}), 401, "Authorization")


# ----------------------------------------------------------------- delivery


def test_fan_out_to_every_endpoint_of_the_user_and_to_one(service: ServiceProcess, unique: str) -> None:
    user, org = f"u-{unique}", f"org-{unique}"
    bearer = token(user, org)
    clients = [RawMqtt(service.mqtt_port) for _ in range(3)]
    try:
        for index, client in enumerate(clients):
            client.connect(f"e{index}-{unique}", user, bearer)
            client.subscribe(f"users/endpoints/e{index}-{unique}")
        with RawMqtt(service.mqtt_port) as bystander:  # same organisation, another user
            bystander.connect(f"by-{unique}", f"other-{unique}", token(f"other-{unique}", org))
            bystander.subscribe(f"users/endpoints/by-{unique}")
            sender = token(f"backend-{unique}", org)
            payload = event(callId="c-1", nested={"list": [1, 2.5, None, True], "text": "héllo"})
            assert service.send_event(sender, {"userId": user, "event": payload}).json() == 3
            for client in clients:
                received = client.next_publish()
                assert received.json() == payload  # as given
                assert received.qos == 0 and not received.retain
            assert bystander.publishes(timeout=0.3) == []
            one = service.send_event(sender, {"userId": user, "userEndpointId": f"e1-{unique}", "event": event(n=2)})
            assert one.json() == 1
            assert clients[1].next_publish().json()["n"] == 2
            assert clients[0].publishes(timeout=0.3) == [] and clients[2].publishes(timeout=0.1) == []
    finally:
        for client in clients:
            client.close()


def test_a_named_endpoint_must_be_the_users_in_the_organisation(service: ServiceProcess, unique: str) -> None:
    org = f"org-{unique}"
    alice_endpoint = service.register(token(f"alice-{unique}", org))
    elsewhere = service.register(token(f"alice-{unique}", f"far-{unique}"))
    sender = token(f"bob-{unique}", org)
    for body in (
        {"userId": f"bob-{unique}", "userEndpointId": alice_endpoint, "event": event()},  # not bob's
        {"userId": f"alice-{unique}", "userEndpointId": elsewhere, "event": event()},  # other organisation
        {"userId": f"alice-{unique}", "userEndpointId": f"nope-{unique}", "event": event()},
    ):
        assert_problem(service.send_event(sender, body), 404, "userEndpointId")


def test_organisations_are_isolated_both_ways(service: ServiceProcess, unique: str) -> None:
    user = f"same-name-{unique}"
    with RawMqtt(service.mqtt_port) as in_a, RawMqtt(service.mqtt_port) as in_b:
        in_a.connect(f"a-{unique}", user, token(user, f"a-{unique}"))
        in_b.connect(f"b-{unique}", user, token(user, f"b-{unique}"))
        in_a.subscribe(f"users/endpoints/a-{unique}")
        in_b.subscribe(f"users/endpoints/b-{unique}")
        assert service.send_event(token("x", f"a-{unique}"), {"userId": user, "event": event(n=1)}).json() == 1
        assert service.send_event(token("y", f"b-{unique}"), {"userId": user, "event": event(n=2)}).json() == 1
        assert [p.json()["n"] for p in in_a.publishes(timeout=0.4)] == [1]
        assert [p.json()["n"] for p in in_b.publishes(timeout=0.1)] == [2]
        backend = service_token()
        body = {"userId": user, "organizationId": f"b-{unique}", "event": event(n=3)}
        assert service.send_event(backend, body).json() == 1
        assert [p.json()["n"] for p in in_b.publishes(timeout=0.4)] == [3]
        assert in_a.publishes(timeout=0.1) == []


def test_counts_for_qos0_and_qos1(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    bearer = token(user)
    service.register(bearer, endpoint_id=f"offline-{unique}")
    with RawMqtt(service.mqtt_port) as unsubscribed, RawMqtt(service.mqtt_port) as live:
        unsubscribed.connect(f"unsub-{unique}", user, bearer)
        live.connect(f"live-{unique}", user, bearer)
        live.subscribe(f"users/endpoints/live-{unique}")
        # QoS 0: only endpoints with a live subscription that were written to.
        assert service.send_event(bearer, {"userId": user, "qos": 0, "event": event()}).json() == 1
        assert service.send_event(bearer, {"userId": user, "qos": 2, "event": event()}).json() == 1  # best effort
        # QoS 1: delivered plus queued.
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event()}).json() == 3


def test_qos1_reaches_an_endpoint_that_connects_later(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    bearer = token(user)
    endpoint_id = service.register(bearer)
    for n in range(3):
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=n)}).json() == 1
    with paho_client(service, endpoint_id, user, bearer) as client:
        assert client.connect() == 0
        assert client.no_message(within=0.3)  # nothing before it subscribes
        client.subscribe(f"user/{user}/{endpoint_id}")
        received = [json.loads(client.next_message().payload)["n"] for _ in range(3)]
    assert received == [0, 1, 2]  # in order


def test_unacknowledged_events_are_redelivered_with_dup_on_reconnect(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer, keep_alive=30)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=1)}).json() == 1
        first = client.next_publish()
        assert (first.qos, first.dup, first.json()["n"]) == (1, False, 1)
    # Dropped without a PUBACK.
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer, keep_alive=30)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        again = client.next_publish()
        assert (again.qos, again.dup, again.json()["n"]) == (1, True, 1)
        client.puback(again.packet_id)  # type: ignore[arg-type]
        time.sleep(0.2)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer, keep_alive=30)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        assert client.publishes(timeout=0.5) == []  # acknowledged: gone
        client.disconnect()


def test_unacknowledged_events_are_resent_after_the_timeout(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_ACK_TIMEOUT_SECONDS": "1"})
    bearer = token("slow")
    with RawMqtt(process.mqtt_port) as client:
        client.connect("slow-ep", "slow", bearer, keep_alive=30)
        client.subscribe("users/endpoints/slow-ep")
        process.send_event(bearer, {"userId": "slow", "qos": 1, "event": event(n=1)})
        first = client.next_publish()
        start = time.monotonic()
        second = client.next_publish(timeout=3)
        assert 0.8 <= time.monotonic() - start <= 2.0
        assert (second.dup, second.packet_id, second.json()) == (True, first.packet_id, first.json())
        client.puback(second.packet_id)  # type: ignore[arg-type]
        assert client.publishes(timeout=1.5) == []


def test_paho_acknowledges_and_nothing_is_resent(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_ACK_TIMEOUT_SECONDS": "1"})
    bearer = token("fine")
    with paho_client(process, "fine-ep", "fine", bearer) as client:
        client.connect()
        client.subscribe("users/endpoints/fine-ep", qos=1)
        for n in range(5):
            process.send_event(bearer, {"userId": "fine", "qos": 1, "event": event(n=n)})
        assert [json.loads(client.next_message().payload)["n"] for _ in range(5)] == list(range(5))
        assert client.no_message(within=1.5)


def test_a_full_queue_refuses_the_event_and_says_so(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_QUEUE_MAX_EVENTS": "2"})
    bearer = token("busy")
    full_id = process.register(bearer, endpoint_id="full-ep")
    for _ in range(2):
        assert process.send_event(bearer, {"userId": "busy", "qos": 1, "event": event()}).json() == 1
    refused = process.send_event(bearer, {"userId": "busy", "qos": 1, "event": event()})
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert "full" in refused.json()["detail"]
    # Another endpoint of the same user can still take events: counted, the full one is not.
    process.register(bearer, endpoint_id="roomy-ep")
    assert process.send_event(bearer, {"userId": "busy", "qos": 1, "event": event()}).json() == 1
    log = wait_until(lambda: "queue full" in process.stderr() and process.stderr())
    assert full_id in log.split("queue full", 1)[1].splitlines()[0]
    # Delivering drains the queue, and then it takes events again.
    with RawMqtt(process.mqtt_port) as client:
        client.connect("full-ep", "busy", bearer)
        client.subscribe("users/endpoints/full-ep")
        for received in (client.next_publish(), client.next_publish()):
            client.puback(received.packet_id)  # type: ignore[arg-type]
        time.sleep(0.2)
        body = {"userId": "busy", "userEndpointId": "full-ep", "qos": 1, "event": event()}
        assert process.send_event(bearer, body).json() == 1


def test_masks_hide_secrets_from_logs_but_not_from_subscribers(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    bearer = token(user)
    secret, other_secret = f"pw-{unique}-hunter2", f"pin-{unique}-4242"
    payload = event(credentials={"password": secret}, guests=[{"pin": other_secret}, {"pin": "x"}], note="visible")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e-{unique}", user, bearer)
        client.subscribe(f"users/endpoints/e-{unique}")
        body = {"userId": user, "qos": 1, "event": payload, "masks": ["$.credentials.password", "$.guests[*].pin"]}
        assert service.send_event(bearer, body).json() == 1
        received = client.next_publish()
        assert received.json() == payload
        client.puback(received.packet_id)  # type: ignore[arg-type]
    log = wait_until(lambda: f'"userId":"{user}"' in service.stderr() and service.stderr())
    assert secret not in log and other_secret not in log
    line = next(line for line in log.splitlines() if f'"userId":"{user}"' in line and "sendEvent" in line)
    logged = json.loads(line.split("sendEvent ", 1)[1])
    assert logged["event"]["credentials"]["password"] == "*" * len(secret)
    assert logged["event"]["guests"] == [{"pin": "*" * len(other_secret)}, {"pin": "*"}]
    assert logged["event"]["note"] == "visible"
    assert (logged["type"], logged["userId"], logged["endpoints"], logged["qos"]) == ("CallCreatedEvent", user, 1, 1)


def test_qos1_events_follow_the_subscriptions_granted_qos(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer)
        assert client.subscribe(f"users/endpoints/{endpoint_id}", qos=0) == [0]
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=1)}).json() == 1
        received = client.next_publish()
        assert (received.qos, received.packet_id, received.json()["n"]) == (0, None, 1)
        assert client.subscribe(f"users/endpoints/{endpoint_id}", qos=1) == [1]  # replaces it
        service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=2)})
        received = client.next_publish()
        assert (received.qos, received.json()["n"]) == (1, 2)


def test_an_event_nested_too_deeply_to_send_is_400_not_500(service: ServiceProcess) -> None:
    nested: dict[str, Any] = {}
    deepest = nested
    for _ in range(300):
        deepest["next"] = {}
        deepest = deepest["next"]
    response = service.send_event(token("deep"), {"userId": "nobody", "event": event(nested=nested)})
    assert_problem(response, 400, "event")


def test_a_mask_search_cannot_stall_the_service(service: ServiceProcess) -> None:
    """The biggest search the mask budget allows still answers quickly, and healthz with it."""
    body = {"userId": "nobody", "event": event(items=list(range(1200))), "masks": ["$..zz"] * 16}
    response = service.send_event(token("masker"), body)
    assert response.status_code == 200, response.text
