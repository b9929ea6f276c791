"""The HTTP bridge's pure parts: reading a JSON body within its limit, and domain errors as problems.

With these as unit tests, the process tests need only one flow per route to show that a
refused request comes back as the right status with an application/problem+json body.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from endpoint_core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    Unavailable,
)
from http_bridge.problems import PayloadTooLarge, problem_body, problem_headers, status_of
from http_bridge.requests import check_declared_length, check_length, parse_json


@pytest.mark.parametrize("raw", [b"", b"   \n", b"{not json", b"\xff\xfe", b"{'single': 'quotes'}", b"[1, 2",
                                 b"NaN", b'{"a": 1} trailing', b"[" * 2000 + b"]" * 2000])
def test_a_body_that_is_not_json_is_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_json(raw)
    assert caught.value.field == "body" and caught.value.detail


@pytest.mark.parametrize(("raw", "parsed"), [
    (b'{"keepAliveSeconds": 30}', {"keepAliveSeconds": 30}),
    (b"[1, 2]", [1, 2]),  # JSON, but not an object: the service refuses it (tests/test_service.py)
    (b'"text"', "text"),
    (bytearray(b' {"a": "\xc3\xa4"} '), {"a": "ä"}),
])
def test_json_bodies_are_parsed(raw: bytes, parsed: Any) -> None:
    assert parse_json(raw) == parsed


def test_an_event_nested_300_levels_deep_can_be_read() -> None:
    """sendEvent refuses it with a 400 naming `event` (tests/test_service.py); reading it must not fail first."""
    raw = b'{"event": ' + b'{"next": ' * 300 + b"{}" + b"}" * 300 + b"}"
    assert isinstance(parse_json(raw), dict)


def test_a_declared_length_over_the_limit_is_refused_before_reading() -> None:
    check_declared_length(None, 100)
    check_declared_length("100", 100)
    check_declared_length("not-a-number", 100)  # left to the read limit
    with pytest.raises(PayloadTooLarge) as caught:
        check_declared_length("101", 100)
    assert caught.value.field == "body"


def test_the_bytes_read_are_held_to_the_limit() -> None:
    check_length(100, 100)
    with pytest.raises(PayloadTooLarge) as caught:
        check_length(101, 100)
    assert caught.value.field == "body"


@pytest.mark.parametrize(("error", "status"), [
    (InvalidInput, 400),
    (NotAuthenticated, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (Conflict, 409),
    (PayloadTooLarge, 413),
    (Unavailable, 503),
    (DomainError, 400),
])
def test_each_domain_error_has_its_status(error: type[DomainError], status: int) -> None:
    assert status_of(error("refused", "field")) == status


def test_a_problem_body_names_the_field() -> None:
    assert orjson.loads(problem_body(400, "Invalid request", "keepAliveSeconds must be ...", "keepAliveSeconds")) == {
        "type": "about:blank", "title": "Invalid request", "status": 400, "detail": "keepAliveSeconds must be ...",
        "field": "keepAliveSeconds",
    }
    assert "field" not in orjson.loads(problem_body(404, "Not found", "GET /nowhere"))


def test_only_a_401_asks_for_a_bearer_token() -> None:
    assert problem_headers(401)["WWW-Authenticate"].startswith("Bearer")
    assert problem_headers(403) == {} and problem_headers(400) == {}


def test_a_command_that_fails_unexpectedly_answers_500_with_one_logged_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    """Commands may skip Starlette's error middleware (BridgeApp), so they answer their own 500."""
    import asyncio
    from types import SimpleNamespace

    from endpoint_core.principals import JwtVerifier
    from endpoint_core.service import EndpointService
    from endpoint_core.table import EndpointTable, TablePolicy
    from http_bridge.commands import CommandEndpoint
    from tests.support import SECRET, token

    async def broken(*_: object) -> tuple[int, bytes | None]:
        raise RuntimeError("a bug")

    service = EndpointService(EndpointTable(TablePolicy()), JwtVerifier(secret=SECRET))
    app = SimpleNamespace(state=SimpleNamespace(service=service, max_body_bytes=1024))
    scope = {"type": "http", "method": "POST", "path": "/rtc-api/users/endpoints/keepalive", "app": app,
             "headers": [(b"authorization", f"Bearer {token('alice')}".encode())]}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with caplog.at_level("ERROR", logger="endpoint_broker.http"):
        asyncio.run(CommandEndpoint(broken)(scope, receive, send))

    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]
    assert orjson.loads(sent[1]["body"])["status"] == 500
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "POST /rtc-api/users/endpoints/keepalive" in tracebacks[0].getMessage()
