"""The README's subscribers, as real programs: mosquitto_sub over TCP, MQTT.js over WebSocket.

paho (TCP and WebSocket) is used throughout the other process tests.
"""

from __future__ import annotations

import subprocess

from tests.support import ROOT, ServiceProcess, event, token, wait_until

CLIENTS = ROOT / "tests" / "clients"


def _connected(service: ServiceProcess, bearer: str, endpoint_id: str) -> bool:
    response = service.view(bearer, endpoint_id)
    return response.status_code == 200 and response.json()["connected"]


def test_mosquitto_sub_receives_an_event_as_the_readme_shows(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"tab-{unique}"
    bearer = token(user)
    command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(service.mqtt_port), "-i", endpoint_id,
               "-u", user, "-P", bearer, "-q", "1", "-t", f"users/endpoints/{endpoint_id}", "-C", "1", "-W", "30"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as subscriber:
        wait_until(lambda: _connected(service, bearer, endpoint_id), timeout=15)
        # Connected is enough: a QoS 1 event waits in the queue until the subscription is in.
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(callId="c-42")}).json() == 1
        output, errors = subscriber.communicate(timeout=30)
    assert subscriber.returncode == 0, errors
    assert '"callId":"c-42"' in output


def test_mqtt_js_over_websocket_receives_an_event(service: ServiceProcess, unique: str) -> None:
    user, endpoint_id = f"u-{unique}", f"js-{unique}"
    bearer = token(user)
    command = ["node", str(CLIENTS / "subscribe.mjs"), f"ws://127.0.0.1:{service.http_port}/ws", endpoint_id, user,
               bearer, f"user/{user}/{endpoint_id}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=CLIENTS) as client:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "SUBSCRIBED"
        assert service.send_event(bearer, {"userId": user, "qos": 1, "event": event(callId="c-7")}).json() == 1
        output, errors = client.communicate(timeout=30)
    assert client.returncode == 0, errors
    assert '"callId":"c-7"' in output
