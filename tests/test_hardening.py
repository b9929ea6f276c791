"""Hostile input against the real process: one flow per hole (the rules are unit-tested in the core)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import httpx

from tests.support import ROOT, RawMqtt, ServiceProcess, free_port, token

BASE = "/rtc-api/users/endpoints"


def assert_problem(response: httpx.Response, status: int, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json().get("field") == field


# ------------------------------------------------------------ identities


def test_two_authorization_headers_are_400_on_get_and_post_routes(service: ServiceProcess) -> None:
    good, other = f"Bearer {token('twice')}", f"Bearer {token('other-user')}"
    headers = [("Authorization", good), ("Authorization", other)]
    assert_problem(httpx.get(service.base_url + BASE, headers=headers), 400, "Authorization")
    assert_problem(httpx.get(service.base_url + BASE + "/some-id", headers=headers), 400, "Authorization")
    for path in ("", "/register", "/keepalive", "/unregister", "/sendEvent"):
        response = httpx.post(service.base_url + BASE + path, headers=headers, json={"keepAliveSeconds": 5})
        assert_problem(response, 400, "Authorization")


def test_a_wildcard_or_newline_user_id_is_refused_on_rest_and_mqtt(service: ServiceProcess) -> None:
    for user in ("+", "eve\nINFO forged"):
        response = httpx.get(service.base_url + BASE, headers={"Authorization": f"Bearer {token(user)}"})
        assert_problem(response, 401, "Authorization")
        assert "userId" in response.json()["detail"]
        with RawMqtt(service.mqtt_port) as client:
            assert client.connect("id-of-a-wildcard-user", "u", token(user)) == (4, False)


def test_invisible_characters_in_endpoint_ids_are_refused_on_rest_and_mqtt(service: ServiceProcess) -> None:
    bearer = token("invisible")
    for endpoint_id in ("tab\u200b1", "tab\u202e1", "tab\x1b1", "tab\x7f1"):
        with service.http(bearer) as http:
            response = http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": endpoint_id})
        assert_problem(response, 400, "userEndpointId")
        with RawMqtt(service.mqtt_port) as client:
            assert client.connect(endpoint_id, "invisible", bearer) == (2, False)


def test_the_endpoint_id_pattern_applies_to_rest_and_connect(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_ENDPOINT_ID_PATTERN": "app-[0-9a-f]{8}"})
    bearer = token("patterned")
    with process.http(bearer) as http:
        refused = http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": "my-tab"})
        assert_problem(refused, 400, "userEndpointId")
        assert "pattern" in refused.json()["detail"]
        assert http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": "app-0123abcd"}).status_code == 200
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("app-0123abcdX", "patterned", bearer) == (2, False)
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("app-4567cdef", "patterned", bearer) == (0, False)


def test_a_short_hs256_secret_stops_startup_with_status_2() -> None:
    env = {"ENDPOINT_BROKER_JWT_SECRET": "x" * 31, "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_broker.py"), "--http-port", str(free_port()),
         "--mqtt-port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "32 bytes" in result.stderr and "RFC 7518" in result.stderr
    assert "x" * 31 not in result.stderr + result.stdout  # and the secret is not echoed


# ------------------------------------------------------------ rate limits


def test_over_a_rate_limit_http_answers_429_and_mqtt_connack_3(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={
        "ENDPOINT_BROKER_REGISTER_RATE_PER_SECOND": "0.01", "ENDPOINT_BROKER_REGISTER_BURST": "2",
        "ENDPOINT_BROKER_CONNECT_RATE_PER_SECOND": "0.01", "ENDPOINT_BROKER_CONNECT_BURST": "2",
        "ENDPOINT_BROKER_SEND_EVENT_RATE_PER_SECOND": "0.01", "ENDPOINT_BROKER_SEND_EVENT_BURST": "1",
    })
    bearer = token("hasty")
    with process.http(bearer) as http:
        assert [http.post(BASE, json={"keepAliveSeconds": 30}).status_code for _ in range(2)] == [200, 200]
        refused = http.post(BASE, json={"keepAliveSeconds": 30})
        assert_problem(refused, 429, None)
        assert 90 <= int(refused.headers["retry-after"]) <= 100  # one token back at 0.01 a second
        event = {"userId": "hasty", "event": {"type": "CallCreatedEvent", "timestamp": "2011-12-03T10:15:30Z"}}
        assert http.post(BASE + "/sendEvent", json=event).status_code == 200
        assert_problem(http.post(BASE + "/sendEvent", json=event), 429, None)
    for _ in range(2):
        with RawMqtt(process.mqtt_port) as client:
            assert client.connect("hasty-tab", "hasty", bearer) == (0, False)
            client.disconnect()
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("hasty-tab", "hasty", bearer) == (3, False)
    with RawMqtt(process.mqtt_port) as client:  # per client id: another one is not limited
        assert client.connect("calm-tab", "hasty", bearer) == (0, False)
