"""Lifecycle events on the real process: over MQTT to a SERVICE subscriber, and to a signed webhook."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.support import RawMqtt, ServiceProcess, free_port, service_token, token, wait_until

WEBHOOK_SECRET = "webhook-secret-for-the-test"
SUBACK_FAILURE = 0x80
REGISTERED, STATE_CHANGED, CONNECTED, DISCONNECTED, UNREGISTERED = (
    "UserEndpointRegisteredEvent", "UserEndpointStateChangedEvent", "UserEndpointConnectedEvent",
    "UserEndpointDisconnectedEvent", "UserEndpointUnregisteredEvent",
)


@dataclass
class Receiver:
    """A webhook receiver on a free loopback port: answers 500 to the first `failures` POSTs."""

    failures: int = 0
    requests: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)  # (status, headers, body)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for status, _, body in self.requests if status == 200]


@contextlib.contextmanager
def receiver(failures: int, port: int | None = None) -> Iterator[tuple[Receiver, str]]:
    state = Receiver(failures)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                status = 500 if len(state.requests) < state.failures else 200
                state.requests.append((status, {k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks/endpoints"
    finally:
        server.shutdown()
        server.server_close()


def collect(subscriber: RawMqtt, until: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """PUBLISHes to the subscriber (acknowledged as they come), until `until(events)` holds."""
    events: list[dict[str, Any]] = []
    while not until(events):
        publish = subscriber.next_publish(timeout=10)
        assert publish.topic.startswith("$events/organizations/")
        if publish.packet_id is not None:
            subscriber.puback(publish.packet_id)
        events.append(publish.json())
    return events


def sequence(events: list[dict[str, Any]], endpoint_id: str) -> list[tuple[str, str]]:
    """The (type, state or reason) of one endpoint's events, each event once (at-least-once may repeat)."""
    seen: dict[str, tuple[str, str]] = {}
    for event in events:
        if event["userEndpointId"] == endpoint_id:
            seen.setdefault(event["id"], (event["type"], event.get("reason") or event["state"]))
    return list(seen.values())


@pytest.fixture
def hooked(make_service: Callable[..., ServiceProcess]) -> Iterator[tuple[ServiceProcess, Receiver]]:
    with receiver(failures=2) as (state, url):
        process = make_service(env={
            "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_URL": url,
            "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_RETRY_INITIAL_SECONDS": "0.05",
            # SICK after keepAliveSeconds, but no expiry for a long while: the test decides what comes next.
            "ENDPOINT_BROKER_MIN_EXPIRY_GRACE_SECONDS": "60",
        })
        yield process, state


def test_every_event_type_reaches_the_service_subscriber_and_the_signed_webhook_in_order(
    hooked: tuple[ServiceProcess, Receiver], unique: str
) -> None:
    process, hook = hooked
    org_a, org_b = f"a-{unique}", f"b-{unique}"
    alice = token("alice", org_a)
    # Org B's activity comes first: were it leaked to org A's subscriber, it would arrive before A's.
    process.register(token("bob", org_b), endpoint_id=f"b1-{unique}")

    with RawMqtt(process.mqtt_port) as subscriber, RawMqtt(process.mqtt_port) as phone:
        assert subscriber.connect(f"svc-{unique}", "backend", service_token("backend", org_a)) == (0, False)
        assert subscriber.subscribe(f"$events/organizations/{org_a}/endpoints", qos=1) == [1]

        rest_id, mqtt_id = f"rest-{unique}", f"mqtt-{unique}"
        process.register(alice, keep_alive=1, endpoint_id=rest_id)
        wait_until(lambda: process.view(alice, rest_id).json()["state"] == "SICK", timeout=10)
        with process.http(alice) as client:
            assert client.post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": rest_id}).status_code \
                == 204
            assert phone.connect(mqtt_id, "alice", alice) == (0, False)
            phone.disconnect()
            assert client.post("/rtc-api/users/endpoints/unregister",
                               json={"userEndpointId": rest_id}).status_code == 204

        mqtt_events = collect(subscriber, lambda events: len(sequence(events, rest_id)) == 4
                              and len(sequence(events, mqtt_id)) == 4)

    expected = {
        rest_id: [(REGISTERED, "HEALTHY"), (STATE_CHANGED, "SICK"), (STATE_CHANGED, "HEALTHY"),
                  (UNREGISTERED, "unregistered")],
        mqtt_id: [(REGISTERED, "HEALTHY"), (CONNECTED, "HEALTHY"), (DISCONNECTED, "clean"),
                  (UNREGISTERED, "disconnected")],
    }
    for endpoint_id, types in expected.items():
        assert sequence(mqtt_events, endpoint_id) == types
    assert {event["organizationId"] for event in mqtt_events} == {org_a}
    sick = next(e for e in mqtt_events if e["userEndpointId"] == rest_id and e["state"] == "SICK")
    assert (sick["previousState"], sick["origin"], sick["keepAliveSeconds"]) == ("HEALTHY", "REST", 1)

    # The webhook gets the same events (every organisation's), signed, after two 500s.
    wait_until(lambda: all(len(sequence(hook.accepted(), e)) == 4 for e in expected), timeout=15)
    for endpoint_id, types in expected.items():
        assert sequence(hook.accepted(), endpoint_id) == types
    assert any(event["organizationId"] == org_b for event in hook.accepted())
    with hook.lock:
        requests = list(hook.requests)
    assert [status for status, _, _ in requests[:3]] == [500, 500, 200]
    assert len({body for _, _, body in requests[:3]}) == 1  # the same event, retried
    for _, headers, body in requests:
        expected_signature = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-endpoint-broker-signature"] == expected_signature
        assert headers["content-type"] == "application/json"
    # Same event, same id, on both paths: receivers can deduplicate.
    assert {e["id"] for e in mqtt_events} <= {e["id"] for e in hook.accepted()}
    assert WEBHOOK_SECRET not in process.stderr() + process.stdout()


def test_undelivered_webhook_events_survive_a_restart(make_service: Callable[..., ServiceProcess], unique: str) -> None:
    port = free_port()  # nobody listens there until after the restart
    process = make_service(env={
        "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
        "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_RETRY_INITIAL_SECONDS": "0.05",
        "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_RETRY_MAX_SECONDS": "0.2",
    })
    endpoint_id = process.register(token("alice", f"o-{unique}"), endpoint_id=f"e-{unique}")  # 200: stored
    wait_until(lambda: "lifecycle webhook delivery failed" in process.stderr(), timeout=10)
    process.restart()
    with receiver(failures=0, port=port) as (hook, _):
        wait_until(lambda: sequence(hook.accepted(), endpoint_id)[:1] == [(REGISTERED, "HEALTHY")], timeout=15)
        # After the restart the table restores the endpoint as UNKNOWN: that event follows the stored one.
        wait_until(lambda: sequence(hook.accepted(), endpoint_id) == [(REGISTERED, "HEALTHY"),
                                                                     (STATE_CHANGED, "UNKNOWN")], timeout=15)
    assert "lifecycle event(s) restored for the webhook" in process.stderr()


def test_only_a_service_principal_may_subscribe_and_only_to_its_own_organisation(
    service: ServiceProcess, unique: str
) -> None:
    org = f"o-{unique}"
    own = f"$events/organizations/{org}/endpoints"
    with RawMqtt(service.mqtt_port) as user:
        assert user.connect(f"u-{unique}", "alice", token("alice", org)) == (0, False)
        assert user.subscribe(own, qos=1) == [SUBACK_FAILURE]
    with RawMqtt(service.mqtt_port) as backend:
        assert backend.connect(f"s-{unique}", "backend", service_token("backend", org)) == (0, False)
        assert backend.subscribe(f"$events/organizations/other-{unique}/endpoints", "$events/#",
                                 "$events/organizations/+/endpoints", qos=1) == [SUBACK_FAILURE] * 3
        assert backend.subscribe(own, qos=0) == [0]


def test_the_dashboard_stream_needs_a_service_token_and_scopes_it_to_its_organisation(
    service: ServiceProcess, unique: str
) -> None:
    org_a, org_b = f"a-{unique}", f"b-{unique}"
    mine = service.register(token("alice", org_a))
    theirs = service.register(token("bob", org_b))
    for bearer in (None, token("alice", org_a)):
        with service.http(bearer) as client:
            response = client.get("/dashboard/events")
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["field"] == "Authorization"

    def first_snapshot(bearer: str) -> list[dict[str, Any]]:
        with service.http(bearer) as client, client.stream("GET", "/dashboard/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            assert next(lines) == "event: snapshot"
            rows: list[dict[str, Any]] = json.loads(next(lines).removeprefix("data: "))["endpoints"]
            return rows

    scoped = first_snapshot(service_token("backend", org_a))
    assert {row["id"] for row in scoped} == {mine}
    assert {"connectedSince", "lastKeepaliveAgoSeconds", "transport"} <= set(scoped[0])
    everyone = {row["id"] for row in first_snapshot(service_token("backend"))}
    assert {mine, theirs} <= everyone


def test_the_page_is_served_without_a_cdn(service: ServiceProcess) -> None:
    page = httpx.get(service.base_url + "/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/dashboard.js">' in page.text and "https://" not in page.text
    script = httpx.get(service.base_url + "/dashboard/dashboard.js")
    assert script.status_code == 200 and "sessionStorage" in script.text and "/dashboard/events" in script.text


def test_sigterm_ends_open_dashboard_streams_instead_of_waiting_for_them(
    make_service: Callable[..., ServiceProcess]
) -> None:
    # A drain bound far above stop()'s 15 s: were the stream left open, the stop would end in a SIGKILL.
    process = make_service(env={"ENDPOINT_BROKER_SHUTDOWN_TIMEOUT_SECONDS": "120"})
    with process.http(service_token()) as client, client.stream("GET", "/dashboard/events") as response:
        lines = response.iter_lines()
        assert next(lines) == "event: snapshot"
        assert process.stop() == 0
        assert list(lines)[-1:] in ([], [""])  # the server ended the stream
