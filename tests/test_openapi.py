"""The OpenAPI document: in step with the routes, in the spec's names, served without a token."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.routing import Route

from http_bridge.openapi import (
    DASHBOARD_PATH,
    DASHBOARD_SCRIPT_PATH,
    DOCS_PATH,
    METRICS_PATH,
    OPENAPI_PATH,
    openapi_document,
)
from http_bridge.routes import routes
from tests.support import ServiceProcess

DOCUMENT = openapi_document()
OPERATIONS = {(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item}
SPEC_SCHEMAS = {"RegisterUserEndpointWebCommand", "KeepUserEndpointAliveWebCommand", "SendEventToUserWebCommand",
                "UnregisterUserEndpointWebCommand", "UserEndpointView", "RegisterResult"}


def test_every_route_is_documented_and_nothing_else() -> None:
    served = {
        (method, route.path)
        for route in routes if isinstance(route, Route)
        for method in route.methods or () if method != "HEAD"  # Starlette adds HEAD to every GET
    }
    # create_app adds GET /metrics unless metrics_port moves it to a listener of its own, or metrics are off.
    assert served | {("GET", METRICS_PATH)} == OPERATIONS
    assert all(isinstance(route, Route) for route in routes)  # nothing the document could miss
    # /ws is plain ASGI ahead of the router (http_bridge.websocket), not an HTTP operation: the document says so.
    assert "/ws" in DOCUMENT["info"]["description"]


def test_it_is_openapi_3_1_with_the_specs_schema_names() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    assert set(DOCUMENT["components"]["schemas"]) >= SPEC_SCHEMAS
    assert DOCUMENT["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, operation) for path, item in DOCUMENT["paths"].items()
            for method, operation in item.items()]


def test_every_error_is_a_problem_and_every_protected_route_documents_401() -> None:
    for method, path, operation in _operations():
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert set(response["content"]) == {"application/problem+json"}, (method, path, status)
        public = operation.get("security") == []
        assert public == (path in ("/healthz", OPENAPI_PATH, DOCS_PATH, DOCS_PATH + "/{asset}", METRICS_PATH,
                                   DASHBOARD_PATH, DASHBOARD_SCRIPT_PATH)), (method, path)
        if not public:
            assert {"400", "401"} <= set(operation["responses"]), (method, path)


def test_every_reference_resolves() -> None:
    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(DOCUMENT):
        assert ref.removeprefix("#/components/schemas/") in DOCUMENT["components"]["schemas"], ref


def test_it_is_served_without_a_token(service: ServiceProcess) -> None:
    response = httpx.get(service.base_url + OPENAPI_PATH)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT
