"""The REST contract of Registration v1.0 (all but sendEvent), against the real process."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support import ServiceProcess, service_token, token, wait_until

BASE = "/rtc-api/users/endpoints"


def assert_problem(response: httpx.Response, status: int, field: str | None) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body.get("field") == field
    assert "Traceback" not in response.text
    return body


# ------------------------------------------------------------------ register


def test_register_answers_the_id_as_a_json_string_and_makes_a_uuid(service: ServiceProcess, unique: str) -> None:
    with service.http(token(f"u-{unique}")) as http:
        response = http.post(BASE, json={"keepAliveSeconds": 30})
    assert response.status_code == 200
    endpoint_id = response.json()
    assert isinstance(endpoint_id, str)
    assert uuid.UUID(endpoint_id).version == 4


def test_register_keeps_a_caller_supplied_id(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}", f"org-{unique}")
    with service.http(bearer) as http:
        registered = http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": f"tab-{unique}"})
        assert registered.json() == f"tab-{unique}"
        view = http.get(f"{BASE}/tab-{unique}").json()
    assert view["id"] == f"tab-{unique}"
    assert view["userId"] == f"u-{unique}"
    assert view["organizationId"] == f"org-{unique}"
    assert view["keepAliveSeconds"] == 30
    assert view["state"] == "HEALTHY"
    assert view["version"] == 0
    assert view["serverKeepAliveReminderOn"] is False


def test_ios_register_answers_an_object_and_ignores_query_and_unknown_fields(
    service: ServiceProcess, unique: str
) -> None:
    endpoint_id = str(uuid.uuid4())
    with service.http(token(f"u-{unique}")) as http:
        response = http.post(
            f"{BASE}/register?authenticated=true&authorities%5B0%5D.authority=ROLE_USER",
            json={"keepAliveSeconds": 15, "userEndpointId": endpoint_id, "userId": f"u-{unique}"},
        )
    assert response.status_code == 200
    assert response.json() == {"id": endpoint_id}


def test_registering_again_updates_in_place_and_increments_the_version(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    with service.http(bearer) as http:
        http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": f"e-{unique}"})
        again = http.post(BASE, json={"keepAliveSeconds": 45, "userEndpointId": f"e-{unique}",
                                      "serverKeepAliveReminderOn": True})
        assert again.status_code == 200 and again.json() == f"e-{unique}"
        view = http.get(f"{BASE}/e-{unique}").json()
    assert (view["keepAliveSeconds"], view["version"], view["serverKeepAliveReminderOn"]) == (45, 1, True)


def test_registering_another_users_id_is_a_conflict(service: ServiceProcess, unique: str) -> None:
    service.register(token(f"owner-{unique}"), endpoint_id=f"e-{unique}")
    for intruder in (token(f"intruder-{unique}"), token(f"owner-{unique}", "another-org")):
        with service.http(intruder) as http:
            response = http.post(BASE, json={"keepAliveSeconds": 30, "userEndpointId": f"e-{unique}"})
        assert_problem(response, 409, "userEndpointId")


def test_an_invalid_registration_is_a_400_problem_naming_the_field(service: ServiceProcess) -> None:
    """One flow through HTTP. Every input rule of register is a unit test in tests/test_service.py."""
    with service.http(token("validator")) as http:
        assert_problem(http.post(BASE, json={"keepAliveSeconds": 0}), 400, "keepAliveSeconds")


def test_a_body_that_is_not_json_is_400(service: ServiceProcess) -> None:
    """One flow: parsing is unit-tested in tests/test_http_bridge.py, non-object bodies in tests/test_service.py."""
    with service.http(token("validator")) as http:
        response = http.post(BASE, content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(response, 400, "body")


def test_a_body_over_the_limit_is_413(service: ServiceProcess) -> None:
    padding = "x" * (64 * 1024)
    with service.http(token("validator")) as http:
        response = http.post(BASE, json={"keepAliveSeconds": 30, "padding": padding})
        assert_problem(response, 413, "body")
        # Also when the client streams without announcing a length.
        chunks = iter([b'{"keepAliveSeconds": 30, "padding": "', padding.encode(), b'"}'])
        streamed = http.post(BASE, content=chunks, headers={"content-type": "application/json"})
        assert_problem(streamed, 413, "body")
        # ...and in a single chunk, which the server receives as one message.
        whole = iter([b'{"keepAliveSeconds": 30, "padding": "' + padding.encode() + b'"}'])
        one_chunk = http.post(BASE, content=whole, headers={"content-type": "application/json"})
    assert_problem(one_chunk, 413, "body")


# ----------------------------------------------------------------- keepalive


def test_keepalive_answers_204_and_accepts_the_ios_extra_user_id(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer)
    with service.http(bearer) as http:
        response = http.post(f"{BASE}/keepalive", json={"userEndpointId": endpoint_id, "userId": f"u-{unique}"})
    assert response.status_code == 204
    assert response.content == b""


def test_keepalive_needs_an_endpoint_id(service: ServiceProcess) -> None:
    with service.http(token("validator")) as http:
        assert_problem(http.post(f"{BASE}/keepalive", json={}), 400, "userEndpointId")
        assert_problem(http.post(f"{BASE}/keepalive", json={"userEndpointId": 5}), 400, "userEndpointId")


def test_access_rules_for_endpoint_routes(service: ServiceProcess, unique: str) -> None:
    """Own: allowed. Same organisation, other user: 403. Other organisation or unknown: 404. SERVICE: allowed."""
    owner = token(f"owner-{unique}", f"org-{unique}")
    endpoint_id = service.register(owner)
    colleague = token(f"colleague-{unique}", f"org-{unique}")
    stranger = token(f"owner-{unique}", f"other-org-{unique}")  # same user name, other organisation
    backend = service_token()
    cases = [
        (owner, 204, 200, None),
        (colleague, 403, 403, "userEndpointId"),
        (stranger, 404, 404, "userEndpointId"),
        (backend, 204, 200, None),
    ]
    for bearer, keepalive_status, get_status, field in cases:
        with service.http(bearer) as http:
            keepalive = http.post(f"{BASE}/keepalive", json={"userEndpointId": endpoint_id})
            view = http.get(f"{BASE}/{endpoint_id}")
            unregister = http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id})
        if keepalive_status == 204:
            assert keepalive.status_code == 204
            assert view.status_code == 200 and view.json()["id"] == endpoint_id
        else:
            assert_problem(keepalive, keepalive_status, field)
            assert_problem(view, get_status, field)
            assert_problem(unregister, keepalive_status, field)
            continue
        assert unregister.status_code == 204
        endpoint_id = service.register(owner)  # unregistered: make another for the next caller
    with service.http(owner) as http:
        for route in ("keepalive", "unregister"):
            assert_problem(http.post(f"{BASE}/{route}", json={"userEndpointId": f"nope-{unique}"}), 404,
                           "userEndpointId")
        assert_problem(http.get(f"{BASE}/nope-{unique}"), 404, "userEndpointId")


# ---------------------------------------------------------------- unregister


def test_unregister_removes_the_endpoint(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer)
    with service.http(bearer) as http:
        response = http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id, "reason": "User logout"})
        assert response.status_code == 204
        assert_problem(http.get(f"{BASE}/{endpoint_id}"), 404, "userEndpointId")
        assert_problem(http.post(f"{BASE}/keepalive", json={"userEndpointId": endpoint_id}), 404, "userEndpointId")
        assert_problem(http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id, "reason": 7}), 404,
                       "userEndpointId")


def test_unregister_reason_must_be_a_string(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer)
    with service.http(bearer) as http:
        assert_problem(http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id, "reason": 7}), 400,
                       "reason")


# ------------------------------------------------------------------- listing


def test_listing_shows_only_the_callers_own_endpoints(service: ServiceProcess, unique: str) -> None:
    org = f"org-{unique}"
    mine = {service.register(token(f"me-{unique}", org)) for _ in range(2)}
    service.register(token(f"you-{unique}", org))
    service.register(token(f"me-{unique}", f"elsewhere-{unique}"))
    with service.http(token(f"me-{unique}", org)) as http:
        listed = http.get(BASE).json()
        assert {e["id"] for e in listed} == mine
        assert all(set(e) >= {"id", "userId", "organizationId", "keepAliveSeconds", "state", "version"}
                   for e in listed)
        # Filtering on oneself is allowed; on anyone else is not.
        assert {e["id"] for e in http.get(BASE, params={"userId": f"me-{unique}"}).json()} == mine
        assert_problem(http.get(BASE, params={"userId": f"you-{unique}"}), 403, "userId")
        assert_problem(http.get(BASE, params={"organizationId": f"elsewhere-{unique}"}), 403, "organizationId")


def test_a_service_lists_any_user_and_organisation_by_filter(service: ServiceProcess, unique: str) -> None:
    org = f"org-{unique}"
    alice = service.register(token(f"alice-{unique}", org))
    bob = service.register(token(f"bob-{unique}", org))
    elsewhere = service.register(token(f"alice-{unique}", f"far-{unique}"))
    with service.http(service_token()) as http:
        by_user_and_org = http.get(BASE, params={"userId": f"alice-{unique}", "organizationId": org}).json()
        by_org = http.get(BASE, params={"organizationId": org}).json()
        by_user = http.get(BASE, params={"userId": f"alice-{unique}"}).json()
    assert [e["id"] for e in by_user_and_org] == [alice]
    assert {e["id"] for e in by_org} == {alice, bob}
    assert {e["id"] for e in by_user} == {alice, elsewhere}


# ------------------------------------------------------------ authentication


# Every way a header or a token can fail is a unit test: tests/test_service.py and tests/test_tokens.py.
@pytest.mark.parametrize("header", [
    None,
    "Bearer " + token("mallory", secret="a-different-secret-0123456789-0123456789"),
])
def test_requests_without_a_valid_token_are_401(service: ServiceProcess, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    response = httpx.get(service.base_url + BASE, headers=headers)
    assert_problem(response, 401, "Authorization")
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_alg_none_is_refused(service: ServiceProcess) -> None:
    import base64
    import json
    import time

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"userId": "mallory", "organization_id": "org-a", "exp": int(time.time()) + 3600}
    for alg in ("none", "None", "NONE"):
        unsigned = f"{part({'alg': alg, 'typ': 'JWT'})}.{part(claims)}."
        response = httpx.get(service.base_url + BASE, headers={"Authorization": f"Bearer {unsigned}"})
        assert_problem(response, 401, "Authorization")


def test_an_algorithm_outside_the_configured_list_is_refused(service: ServiceProcess) -> None:
    import jwt

    other = jwt.encode({"userId": "u", "organization_id": "o", "exp": 4102444800}, "x" * 64, algorithm="HS512")
    response = httpx.get(service.base_url + BASE, headers={"Authorization": f"Bearer {other}"})
    body = assert_problem(response, 401, "Authorization")
    assert "HS512" in str(body["detail"])


def test_unknown_routes_and_methods_answer_problems(service: ServiceProcess) -> None:
    assert_problem(httpx.get(service.base_url + "/nowhere"), 404, None)
    not_allowed = httpx.delete(service.base_url + BASE)
    assert_problem(not_allowed, 405, None)
    assert set(not_allowed.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_204_answers_carry_no_body_headers(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer)
    with service.http(bearer) as http:
        response = http.post(f"{BASE}/keepalive", json={"userEndpointId": endpoint_id})
    assert response.status_code == 204
    assert "content-length" not in response.headers and "content-type" not in response.headers


def test_the_unregister_reason_cannot_forge_log_lines(service: ServiceProcess, unique: str) -> None:
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer)
    forged = f"logout\n2026-01-01 00:00:00,000 WARNING endpoint_broker.events: FORGED-{unique}"
    with service.http(bearer) as http:
        http.post(f"{BASE}/unregister", json={"userEndpointId": endpoint_id, "reason": forged})
    log = wait_until(lambda: f"FORGED-{unique}" in service.stderr() and service.stderr())
    assert not any(line.startswith("2026-01-01") for line in log.splitlines())


def test_healthz(service: ServiceProcess) -> None:
    body = service.health()
    assert body["status"] == "ok" and body["mqtt"] is True and body["http"] is True
