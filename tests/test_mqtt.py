"""The MQTT side: CONNECT is registration, packets are keepalives, topics are guarded.

Against the real process, over TCP and over WebSocket at /ws. CONNACK and SUBACK
codes are read off the wire with RawMqtt; paho-mqtt shows real clients work.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest

from tests.support import (
    PahoClient,
    RawMqtt,
    ServiceProcess,
    event,
    paho_client,
    token,
    wait_until,
)

BASE = "/rtc-api/users/endpoints"


def connected(service: ServiceProcess, bearer: str, endpoint_id: str) -> bool:
    response = service.view(bearer, endpoint_id)
    return response.status_code == 200 and response.json()["connected"]


# ------------------------------------------------------------------ CONNACK


def test_connack_0_registers_the_endpoint(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", f"u-{unique}", bearer, keep_alive=25) == (0, False)
        view = service.view(bearer, f"e-{unique}").json()
    assert (view["keepAliveSeconds"], view["state"], view["userId"], view["connected"]) == (
        25, "HEALTHY", f"u-{unique}", True)


@pytest.mark.parametrize(("username", "password"), [
    (None, None),
    ("someone", None),
    ("someone", "not-a-token"),
    ("someone", token("late", ttl=-120)),
    ("someone", token("forged", secret="another-secret-0123456789-0123456789-abc")),
    ("", token("nameless")),
])
def test_connack_4_for_a_missing_bad_or_expired_token(service: ServiceProcess, username: str | None,
                                                      password: str | None) -> None:
    with RawMqtt(service.mqtt_port) as client:
        if username is None and password is not None:
            pytest.skip("MQTT forbids a password without a username")
        assert client.connect("ep-with-bad-token", username, password) == (4, False)
        client.wait_closed(timeout=2)


def test_connack_4_for_a_token_past_exp_but_within_the_leeway(service: ServiceProcess, unique: str) -> None:
    late = token(f"u-{unique}", ttl=-10)  # REST still accepts it (30 s of leeway for clock skew)
    with service.http(late) as http:
        assert http.get(BASE).status_code == 200
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", f"u-{unique}", late) == (4, False)
    assert service.view(token(f"u-{unique}"), f"e-{unique}").status_code == 404  # nothing registered


def test_connack_4_when_a_password_comes_without_a_username(service: ServiceProcess) -> None:
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect("ep-no-user", None, token("x")) == (4, False)


@pytest.mark.parametrize("client_id", ["", "a/b", "a+b", "a#b", "with space", "x" * 129])
def test_connack_2_for_an_empty_or_invalid_client_id(service: ServiceProcess, client_id: str) -> None:
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(client_id, "u", token("u")) == (2, False)


def test_connack_5_for_another_users_endpoint(service: ServiceProcess, unique: str) -> None:
    service.register(token(f"owner-{unique}"), endpoint_id=f"e-{unique}")
    for user, org in ((f"intruder-{unique}", "org-a"), (f"owner-{unique}", "other-org")):
        with RawMqtt(service.mqtt_port) as client:
            assert client.connect(f"e-{unique}", user, token(user, org)) == (5, False)


@pytest.mark.parametrize(("level", "name"), [(5, b"MQTT"), (3, b"MQIsdp")])
def test_connack_1_for_other_protocol_versions(service: ServiceProcess, level: int, name: bytes) -> None:
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect("ep-v5", "u", token("u"), level=level, name=name) == (1, False)


def test_paho_sees_the_same_codes(service: ServiceProcess, unique: str) -> None:
    with paho_client(service, f"e-{unique}", f"u-{unique}", token(f"u-{unique}")) as client:
        assert client.connect() == 0
    bad = PahoClient(f"e2-{unique}", username="u", password="nope", port=service.mqtt_port)
    try:
        assert bad.connect() == 134  # paho's name for CONNACK 4: bad user name or password
    finally:
        bad.close(clean=False)


def test_a_failed_connect_leaves_nothing_behind(service: ServiceProcess, unique: str) -> None:
    before = service.health()
    for attempt in range(20):
        with RawMqtt(service.mqtt_port) as client:
            assert client.connect(f"ghost-{unique}-{attempt}", "u", "bad-token")[0] == 4
            client.wait_closed(timeout=2)
    after = wait_until(lambda: (h := service.health())["connections"] == before["connections"] and h)
    assert after["pendingConnects"] == before["pendingConnects"]
    assert after["endpoints"] == before["endpoints"]


def test_mqtt_over_websocket(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with paho_client(service, f"e-{unique}", f"u-{unique}", bearer, websocket=True) as client:
        assert client.connect() == 0
        assert client.subscribe(f"users/endpoints/e-{unique}") == [1]
        assert client.subscribe(f"users/endpoints/other-{unique}") == [0x80]
        response = service.send_event(bearer, {"userId": f"u-{unique}", "event": event(n=1)})
        assert response.json() == 1
        assert json.loads(client.next_message().payload)["n"] == 1
        assert connected(service, bearer, f"e-{unique}")
    wait_until(lambda: service.view(bearer, f"e-{unique}").status_code == 404)  # clean DISCONNECT unregisters


def test_websocket_messages_are_capped_like_mqtt_packets(service: ServiceProcess) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{service.http_port}/ws", subprotocols=["mqtt"], max_size=None) as ws:
        assert ws.subprotocol == "mqtt"
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(b"\x10" + b"x" * (300 * 1024))  # over mqtt_max_packet_bytes (256 KiB), unauthenticated
            ws.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    assert service.health()["status"] == "ok"


def test_websocket_refusals_use_the_same_codes(service: ServiceProcess) -> None:
    client = PahoClient("bad/id", username="u", password=token("u"), port=service.http_port, websocket=True)
    try:
        assert client.connect() == 133  # paho's name for CONNACK 2: client identifier not valid
    finally:
        client.close(clean=False)


# ---------------------------------------------------------- attach or register


def test_connect_attaches_to_a_rest_endpoint_and_keeps_its_settings(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer, keep_alive=300, serverKeepAliveReminderOn=True)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, f"u-{unique}", bearer, keep_alive=10) == (0, False)
        view = service.view(bearer, endpoint_id).json()
        assert (view["keepAliveSeconds"], view["serverKeepAliveReminderOn"], view["connected"]) == (300, True, True)
        with service.http(bearer) as http:
            assert [e["id"] for e in http.get(BASE).json()] == [endpoint_id]
        client.disconnect()
    wait_until(lambda: not connected(service, bearer, endpoint_id))  # the DISCONNECT has been handled
    assert service.view(bearer, endpoint_id).status_code == 200  # REST-made: stays after a clean DISCONNECT


def test_keep_alive_zero_takes_the_configured_default(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_DEFAULT_MQTT_KEEP_ALIVE_SECONDS": "42"})
    bearer = token("zero")
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("zero-ka", "zero", bearer, keep_alive=0) == (0, False)
        assert process.view(bearer, "zero-ka").json()["keepAliveSeconds"] == 42


def test_mqtt_registered_endpoints_are_listed_over_rest(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as a, RawMqtt(service.mqtt_port) as b:
        a.connect(f"a-{unique}", f"u-{unique}", bearer)
        b.connect(f"b-{unique}", f"u-{unique}", bearer)
        with service.http(bearer) as http:
            assert {e["id"] for e in http.get(BASE).json()} == {f"a-{unique}", f"b-{unique}"}


# ------------------------------------------------------------ keepalive/expiry


def test_pingreq_keeps_an_endpoint_alive_and_silence_expires_it(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as pinging, RawMqtt(service.mqtt_port) as silent:
        assert pinging.connect(f"ping-{unique}", f"u-{unique}", bearer, keep_alive=1)[0] == 0
        assert silent.connect(f"silent-{unique}", f"u-{unique}", bearer, keep_alive=1)[0] == 0
        # When it expires (1 s of keep-alive, at least 1 s of grace) is a table rule, tested on a fake
        # clock in test_table.py; here only that it happens, to the silent client alone.
        closed: list[float] = []
        watcher = threading.Thread(target=lambda: closed.append(silent.wait_closed(timeout=30)))
        watcher.start()
        while watcher.is_alive():
            pinging.ping()
            assert pinging.read_packet()[0] == 13  # PINGRESP
            time.sleep(0.3)  # the pinging client's own pace, well inside its 1 s keep-alive
        watcher.join()
        assert closed, "the silent client was not closed"
        assert service.view(bearer, f"ping-{unique}").json()["state"] == "HEALTHY"
        assert service.view(bearer, f"silent-{unique}").status_code == 404


def test_rest_keepalive_and_mqtt_packets_count_alike(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer, keep_alive=1)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, f"u-{unique}", bearer, keep_alive=1)[0] == 0
        with service.http(bearer) as http:
            for _ in range(10):
                time.sleep(0.3)  # the pace of the REST keepalives under test, not a synchronisation
                http.post(f"{BASE}/keepalive", json={"userEndpointId": endpoint_id})
        assert connected(service, bearer, endpoint_id)
        # REST keepalives stop and the client sends nothing: the 1 s schedule closes the connection.
        client.wait_closed(timeout=10)
    assert service.view(bearer, endpoint_id).status_code == 404


def test_the_connection_closes_when_the_token_expires(service: ServiceProcess, unique: str) -> None:
    import jwt

    short_lived = token(f"u-{unique}", ttl=2)
    expires_at = jwt.decode(short_lived, options={"verify_signature": False})["exp"]
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", f"u-{unique}", short_lived, keep_alive=60)[0] == 0
        client.ping()
        assert client.read_packet()[0] == 13  # PINGRESP: open and healthy while the token is valid
        client.wait_closed(timeout=30)
        # Not before `exp` (a slow machine can only make the close later); 0.1 s for timer rounding.
        assert time.time() >= expires_at - 0.1
    # A dropped connection leaves the endpoint; reconnecting needs a fresh token.
    fresh = token(f"u-{unique}")
    assert service.view(fresh, f"e-{unique}").status_code == 200
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", f"u-{unique}", fresh)[0] == 0


def test_rest_unregister_closes_the_mqtt_connection(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e-{unique}", f"u-{unique}", bearer)
        with service.http(bearer) as http:
            response = http.post(f"{BASE}/unregister", json={"userEndpointId": f"e-{unique}", "reason": "logout"})
        assert response.status_code == 204
        client.wait_closed(timeout=10)  # raises TimeoutError if the connection stays open


# -------------------------------------------------------- disconnect rules


def test_clean_disconnect_unregisters_an_mqtt_endpoint(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e-{unique}", f"u-{unique}", bearer)
        client.disconnect()
    wait_until(lambda: service.view(bearer, f"e-{unique}").status_code == 404)


def test_a_dropped_connection_keeps_the_endpoint_and_its_queue(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e-{unique}", f"u-{unique}", bearer, keep_alive=30)
        client.subscribe(f"users/endpoints/e-{unique}")
    wait_until(lambda: not connected(service, bearer, f"e-{unique}"))
    assert service.send_event(bearer, {"userId": f"u-{unique}", "qos": 1, "event": event(n=7)}).json() == 1
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", f"u-{unique}", bearer, keep_alive=30)[0] == 0
        client.subscribe(f"users/endpoints/e-{unique}")
        assert client.next_publish().json()["n"] == 7


# ------------------------------------------------------------------ topics


def test_subscriptions_only_to_the_endpoints_own_topics(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    service.register(token(f"other-{unique}"), endpoint_id=f"other-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, token(user))
        granted = client.subscribe(f"users/endpoints/{endpoint_id}", f"user/{user}/{endpoint_id}", qos=1)
        assert granted == [1, 1]
        assert client.subscribe(f"users/endpoints/{endpoint_id}", qos=2) == [1]  # events go out at most at QoS 1
        assert client.subscribe(f"users/endpoints/{endpoint_id}", qos=0) == [0]
        refused = client.subscribe(
            f"users/endpoints/other-{unique}", f"user/other-{unique}/{endpoint_id}", "users/endpoints/+", "#",
            "users/#", "$SYS/#", "$SYS/broker/uptime", f"users/endpoints/{endpoint_id}/#", "anything",
        )
        assert refused == [0x80] * 9


def test_events_go_to_each_subscribed_topic_form(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer)
        client.subscribe(f"users/endpoints/{endpoint_id}", f"user/{user}/{endpoint_id}", qos=0)
        assert service.send_event(bearer, {"userId": user, "event": event(n=1)}).json() == 1
        topics = sorted(p.topic for p in client.publishes(timeout=0.5))
        assert topics == sorted([f"users/endpoints/{endpoint_id}", f"user/{user}/{endpoint_id}"])
        client.unsubscribe(f"user/{user}/{endpoint_id}")
        service.send_event(bearer, {"userId": user, "event": event(n=2)})
        assert [p.topic for p in client.publishes(timeout=0.5)] == [f"users/endpoints/{endpoint_id}"]


def test_client_publish_is_refused_and_never_retained(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        client.publish(f"users/endpoints/{endpoint_id}", b'{"type":"ForgedThingEvent"}', qos=1, retain=True)
        kinds = []
        with pytest.raises(TimeoutError):
            while True:
                kinds.append(client.read_packet(timeout=0.5)[0])
        assert kinds == [4]  # the PUBACK, and no message
        client.ping()
        assert client.read_packet()[0] == 13  # the connection is still fine
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        assert client.publishes(timeout=0.5) == []  # nothing retained
    assert wait_until(lambda: "refused publish to" in service.stderr())


def test_the_publish_allow_list_opens_topics_within_an_organisation(
    make_service: Callable[..., ServiceProcess],
) -> None:
    process = make_service(env={"ENDPOINT_BROKER_CLIENT_PUBLISH_ALLOW": "users/endpoints/+"})
    with RawMqtt(process.mqtt_port) as sender, RawMqtt(process.mqtt_port) as peer, \
            RawMqtt(process.mqtt_port) as foreign:
        sender.connect("sender", "s", token("s", "org-1"))
        peer.connect("peer", "p", token("p", "org-1"))
        foreign.connect("foreign", "f", token("f", "org-2"))
        peer.subscribe("users/endpoints/peer")
        foreign.subscribe("users/endpoints/foreign")
        sender.publish("users/endpoints/peer", b"hello", qos=0, retain=True)
        sender.publish("users/endpoints/foreign", b"hello", qos=0)
        sender.publish("user/p/peer", b"not allowed", qos=0)
        assert [p.payload for p in peer.publishes(timeout=0.5)] == [b"hello"]
        assert foreign.publishes(timeout=0.3) == []
    with RawMqtt(process.mqtt_port) as late:
        late.connect("peer", "p", token("p", "org-1"))
        late.subscribe("users/endpoints/peer")
        assert late.publishes(timeout=0.3) == []  # the retain flag was ignored


# ------------------------------------------------------------------ reminder


def test_keepalive_reminder_event(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    bearer = token(user)
    endpoint_id = service.register(bearer, keep_alive=3, serverKeepAliveReminderOn=True)
    with RawMqtt(service.mqtt_port) as client:
        # A keep-alive no longer than keepAliveSeconds: a longer one would stretch the period (README).
        client.connect(endpoint_id, user, bearer, keep_alive=3)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        reminder = client.next_publish(timeout=10)  # when it comes is a table rule, tested on a fake clock
        assert reminder.qos == 0 and not reminder.retain
        body = reminder.json()
        assert body["type"] == "UserEndpointKeepAliveRequestedEvent"
        assert (body["userId"], body["userEndpointId"]) == (user, endpoint_id)
        assert body["timestamp"].endswith("Z") and body["expiresAt"].endswith("Z") and body["id"]
        assert client.publishes(timeout=0.6) == []  # once per period
        client.ping()  # the keepalive starts a new period
        client.read_packet()
        assert client.next_publish(timeout=10).json()["type"] == "UserEndpointKeepAliveRequestedEvent"


# ------------------------------------------------------------- amqtt corners


def test_an_unauthenticated_connect_with_a_live_id_does_not_disturb_it(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as victim:
        victim.connect(endpoint_id, user, bearer)
        victim.subscribe(f"users/endpoints/{endpoint_id}")
        for username, password in (("attacker", "garbage"), (user, token(user, secret="wrong-" * 8)),
                                   (f"x-{unique}", token(f"x-{unique}"))):
            with RawMqtt(service.mqtt_port) as attacker:
                code, _ = attacker.connect(endpoint_id, username, password)
                assert code in (4, 5)
        assert service.send_event(bearer, {"userId": user, "event": event(n=1)}).json() == 1
        assert victim.next_publish().json()["n"] == 1


def test_take_over_leaves_one_live_connection(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    connections_before = service.health()["connections"]
    with RawMqtt(service.mqtt_port) as old:
        old.connect(endpoint_id, user, bearer, keep_alive=30)
        old.subscribe(f"users/endpoints/{endpoint_id}")
        with RawMqtt(service.mqtt_port) as new:
            assert new.connect(endpoint_id, user, bearer, keep_alive=30) == (0, False)
            old.wait_closed(timeout=5)  # the old socket is closed, not left as a zombie
            new.subscribe(f"users/endpoints/{endpoint_id}")
            # Once the old socket's disconnect is processed, one connection is left, and it is attached.
            wait_until(lambda: service.health()["connections"] == connections_before + 1)
            assert connected(service, bearer, endpoint_id)
            assert service.send_event(bearer, {"userId": user, "event": event(n=2)}).json() == 1
            assert new.next_publish().json()["n"] == 2


def test_take_over_with_paho_over_both_transports(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with paho_client(service, endpoint_id, user, bearer) as first:
        assert first.connect() == 0
        with paho_client(service, endpoint_id, user, bearer, websocket=True) as second:
            assert second.connect() == 0
            first.disconnected.get(timeout=3)
            second.subscribe(f"user/{user}/{endpoint_id}")
            assert service.send_event(bearer, {"userId": user, "event": event(n=3)}).json() == 1
            assert json.loads(second.next_message().payload)["n"] == 3
    wait_until(lambda: service.view(bearer, endpoint_id).status_code == 404)


def test_clean_session_false_resends_with_the_original_packet_ids(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(endpoint_id, user, bearer, clean_session=False)
        client.subscribe(f"users/endpoints/{endpoint_id}")
        service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=1)})
        first = client.next_publish()  # and no PUBACK
    wait_until(lambda: not connected(service, bearer, endpoint_id))
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer, clean_session=False) == (0, True)
        again = client.next_publish()
        assert (again.packet_id, again.dup, again.json()) == (first.packet_id, True, first.json())
        client.puback(again.packet_id)  # type: ignore[arg-type]
        client.ping()
        client.read_packet()  # the PUBACK has been handled
    wait_until(lambda: not connected(service, bearer, endpoint_id))
    with RawMqtt(service.mqtt_port) as client:  # acknowledged under its original id: never sent again
        assert client.connect(endpoint_id, user, bearer, clean_session=False) == (0, True)
        assert client.publishes(timeout=0.5) == []
        client.disconnect()


def test_clean_session_false_keeps_subscriptions_and_delivers_on_reconnect(
    service: ServiceProcess, unique: str
) -> None:
    user, endpoint_id = f"u-{unique}", f"e-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer, clean_session=False) == (0, False)
        client.subscribe(f"users/endpoints/{endpoint_id}")
    wait_until(lambda: not connected(service, bearer, endpoint_id))
    assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(n=4)}).json() == 1
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer, clean_session=False) == (0, True)  # session present
        delivered = client.next_publish()  # without subscribing again
        assert delivered.json()["n"] == 4 and delivered.qos == 1
        client.puback(delivered.packet_id)  # type: ignore[arg-type]
        assert service.send_event(bearer, {"userId": user, "event": event(n=5)}).json() == 1
        assert client.next_publish().json()["n"] == 5
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(endpoint_id, user, bearer, clean_session=True) == (0, False)  # clean: no session
        assert service.send_event(bearer, {"userId": user, "event": event(n=6)}).json() == 0


def test_the_table_stays_consistent_under_connect_and_drop_storms(
    make_service: Callable[..., ServiceProcess], unique: str
) -> None:
    # 31 CONNECTs of one client id at once: over connect_burst, which this test is not about.
    service = make_service(env={"ENDPOINT_BROKER_CONNECT_RATE_PER_SECOND": "0"})
    user = f"u-{unique}"
    bearer = token(user)
    before = service.health()
    clients = []
    for round_ in range(30):
        client = RawMqtt(service.mqtt_port)
        client.connect(f"storm-{unique}", user, bearer, keep_alive=30)
        clients.append(client)
        if round_ % 3 == 0:
            client.close()  # drop right after CONNACK, racing the next CONNECT
    with RawMqtt(service.mqtt_port) as last:
        assert last.connect(f"storm-{unique}", user, bearer, keep_alive=30) == (0, False)
        last.subscribe(f"users/endpoints/storm-{unique}")
        for client in clients:
            if client.sock.fileno() != -1:  # still open on our side: the server must close it
                client.wait_closed(timeout=2)
            client.close()
        assert wait_until(lambda: service.health()["connections"] == before["connections"] + 1)
        assert service.send_event(bearer, {"userId": user, "event": event(n=9)}).json() == 1
        assert last.next_publish().json()["n"] == 9
        last.disconnect()
    wait_until(lambda: service.view(bearer, f"storm-{unique}").status_code == 404)


def test_the_password_never_appears_in_the_log(make_service: Callable[..., ServiceProcess], unique: str) -> None:
    service = make_service()  # its own log: refusal lines are rate-limited per peer address
    secret_token = token(f"u-{unique}")
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e-{unique}", f"u-{unique}", secret_token)
    with RawMqtt(service.mqtt_port) as client:
        client.connect("bad/id", f"u-{unique}", secret_token)
    with RawMqtt(service.mqtt_port) as client:
        client.connect(f"e2-{unique}", f"u-{unique}", secret_token + "x")
    # INFO lines reach the log within 0.25 s (config/log_output.py).
    log = wait_until(lambda: f"e2-{unique}" in service.stderr() and f"e-{unique}" in service.stderr()
                     and service.stderr())
    assert secret_token not in log and secret_token.split(".")[2] not in log


def test_garbage_and_oversized_packets_cost_only_their_connection(service: ServiceProcess, unique: str) -> None:
    user = f"u-{unique}"
    bearer = token(user)
    with RawMqtt(service.mqtt_port) as healthy:
        healthy.connect(f"e-{unique}", user, bearer)
        healthy.subscribe(f"users/endpoints/e-{unique}")
        for junk in (b"GET / HTTP/1.1\r\n\r\n", b"\x10\xff\xff\xff\xff\x7f", b"\x30\x02\x00\x00",
                     b"\x10" + bytes([0x80, 0x80, 0x80, 0x01]) + b"x" * 10):
            with RawMqtt(service.mqtt_port) as bad:
                bad.send(junk)
                bad.wait_closed(timeout=3)
        with RawMqtt(service.mqtt_port) as big:
            big.connect(f"big-{unique}", user, bearer)
            big.publish("users/endpoints/x", b"x" * (300 * 1024))
            big.wait_closed(timeout=3)
        assert service.send_event(bearer, {"userId": user, "event": event(n=1)}).json() == 1
        assert healthy.next_publish().json()["n"] == 1
