"""Durability against the real process: restarts, a crash mid-stream, idempotency, a full store."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx

from tests.support import ROOT, RawMqtt, ServiceProcess, event, token, wait_until

BASE = "/rtc-api/users/endpoints"
STORE = "endpoints.sqlite3"


def view(service: ServiceProcess, bearer: str, endpoint_id: str) -> dict[str, Any]:
    response = service.view(bearer, endpoint_id)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_a_crash_loses_no_endpoint_and_no_event_that_was_answered(
        make_service: Callable[..., ServiceProcess], unique: str) -> None:
    service = make_service()
    user = f"u-{unique}"
    bearer = token(user)
    # A REST endpoint; an MQTT one with a clean_session=0 subscription, connected and not acknowledging;
    # and a REST endpoint nobody keeps alive, which must expire on schedule after the restart.
    rest_id = service.register(bearer, keep_alive=60, endpoint_id=f"rest-{unique}")
    idle_id = service.register(bearer, keep_alive=2, endpoint_id=f"idle-{unique}")
    mqtt_id = f"mqtt-{unique}"
    silent = RawMqtt(service.mqtt_port)
    assert silent.connect(mqtt_id, user, bearer, keep_alive=60, clean_session=False)[0] == 0
    assert silent.subscribe(f"users/endpoints/{mqtt_id}") == [1]
    versions = {e: view(service, bearer, e)["version"] for e in (rest_id, mqtt_id)}

    # A stream of QoS 1 sendEvents to every endpoint of the user, killed -9 in the middle.
    answered: list[int] = []
    stop = threading.Event()

    def stream() -> None:
        with service.http(bearer) as http:
            for n in range(100_000):
                if stop.is_set():
                    return
                try:
                    response = http.post(f"{BASE}/sendEvent",
                                         json={"userId": user, "qos": 1, "event": event(n=n)},
                                         headers={"Idempotency-Key": f"k-{n}"})
                except httpx.HTTPError:
                    return
                if response.status_code == 200:
                    answered.append(n)

    sender = threading.Thread(target=stream)
    sender.start()
    wait_until(lambda: len(answered) >= 50, timeout=20)
    service.stop(signal.SIGKILL)
    stop.set()
    sender.join(10)
    silent.close()
    service.start()

    assert answered
    for endpoint_id in (rest_id, mqtt_id):
        restored = view(service, bearer, endpoint_id)
        assert restored["state"] == "UNKNOWN" and restored["version"] == versions[endpoint_id] + 1
        assert not restored["connected"]
    # The clean_session=0 session is back, and every answered event reaches it (possibly sent before: DUP).
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(mqtt_id, user, bearer, keep_alive=60, clean_session=False) == (0, True)
        received: set[int] = set()
        while not set(answered) <= received:
            message = client.next_publish(timeout=10)
            received.add(message.json()["n"])
            client.puback(message.packet_id)  # type: ignore[arg-type]
        assert view(service, bearer, mqtt_id)["state"] == "HEALTHY"
    # The REST endpoint's queue is back too, in order.
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(rest_id, user, bearer, keep_alive=60)[0] == 0
        client.subscribe(f"users/endpoints/{rest_id}")
        seen: list[int] = []
        while not set(answered) <= set(seen):
            message = client.next_publish(timeout=10)
            seen.append(message.json()["n"])
            client.puback(message.packet_id)  # type: ignore[arg-type]
        firsts = list(dict.fromkeys(seen))
        assert firsts == sorted(firsts)  # in the order they were accepted
    # An answered key still holds: the retry gets the first count and delivers nothing again.
    first = answered[0]
    with service.http(bearer) as http:
        retry = http.post(f"{BASE}/sendEvent", json={"userId": user, "qos": 1, "event": event(n=first)},
                          headers={"Idempotency-Key": f"k-{first}"})
        assert retry.status_code == 200 and retry.json() == 3
        other = http.post(f"{BASE}/sendEvent", json={"userId": user, "qos": 1, "event": event(n=-1)},
                          headers={"Idempotency-Key": f"k-{first}"})
        assert other.status_code == 422 and other.json()["field"] == "Idempotency-Key"
    # Nobody kept the idle endpoint alive: SICK at 2 s after the restart, gone at 3 s.
    wait_until(lambda: service.view(bearer, idle_id).status_code == 404, timeout=15)


def test_a_clean_restart_keeps_the_dev_token_working(make_service: Callable[..., ServiceProcess]) -> None:
    service = make_service(secret=None)
    dev_token = wait_until(lambda: next((line.split("=", 1)[1] for line in service.stdout().splitlines()
                                          if line.startswith("DEV_TOKEN=")), None))
    endpoint_id = service.register(dev_token, endpoint_id="dev-tab")
    service.restart()
    assert view(service, dev_token, endpoint_id)["version"] == 1


def test_a_full_store_answers_503_and_the_process_stays_up(
        make_service: Callable[..., ServiceProcess], unique: str) -> None:
    service = make_service(env={"ENDPOINT_BROKER_STORE_MAX_BYTES": "65536"})
    user = f"u-{unique}"
    bearer = token(user)
    existing = service.register(bearer)
    body = {"userId": user, "qos": 1, "event": event(blob="x" * 4000)}
    with service.http(bearer) as http:
        statuses = set()
        for _ in range(200):
            response = http.post(f"{BASE}/sendEvent", json=body)
            statuses.add(response.status_code)
            if response.status_code == 503:
                assert response.headers["content-type"] == "application/problem+json"
                break
        assert 503 in statuses
        assert http.post(BASE, json={"keepAliveSeconds": 60}).status_code == 503
    health = service.health()
    assert health["store"] == "failing" and health["status"] == "degraded"
    assert service.process is not None and service.process.poll() is None
    # A CONNECT that would register: CONNACK 3, and nothing is left registered.
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"new-{unique}", user, bearer)[0] == 3
    assert service.view(bearer, f"new-{unique}").status_code == 404
    # Attaching to an endpoint that is already stored changes nothing on disk: it still works,
    # and QoS 0 events still reach it.
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(existing, user, bearer)[0] == 0
        assert client.subscribe(f"users/endpoints/{existing}") == [1]
        assert service.send_event(bearer, {"userId": user, "userEndpointId": existing,
                                           "event": event(n=0)}).json() == 1
        # The QoS 1 events stored before the store filled up come first, then this one.
        assert any(client.next_publish().json().get("n") == 0 for _ in range(300))


def test_a_store_of_an_unknown_schema_version_stops_startup(tmp_path: Any) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / STORE) as db:
        db.execute("PRAGMA user_version = 999")
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_broker.py"), "--data-dir", str(data), "--http-port", "0", "--mqtt-port", "0"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=30,
        env={"PATH": "/usr/bin:/bin", "ENDPOINT_BROKER_JWT_SECRET": "x" * 40},
    )
    assert result.returncode == 2 and "999" in result.stderr and STORE in result.stderr
