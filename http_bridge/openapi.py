"""The REST contract as one OpenAPI 3.1 document, served at GET /rtc-api/openapi.json.

Built here, beside the routes, from the same constants the code checks against;
tests/test_openapi.py holds it in step with http_bridge.routes (every route
documented, nothing extra), and the schemathesis fuzzer holds the running
service to it. Schema names are the Registration v1.0 spec's.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from endpoint_core.events import MAX_MASKS
from endpoint_core.idempotency import HEADERS as IDEMPOTENCY_HEADERS
from endpoint_core.ids import MAX_ENDPOINT_ID_LENGTH
from endpoint_core.table import TablePolicy
from http_bridge.commands import PREFIX
from http_bridge.problems import PROBLEM_JSON

OPENAPI_PATH = "/rtc-api/openapi.json"
DOCS_PATH = "/rtc-api/docs"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
DASHBOARD_PATH = "/dashboard"
DASHBOARD_SCRIPT_PATH = "/dashboard/dashboard.js"
DASHBOARD_EVENTS_PATH = "/dashboard/events"

# Why each error status happens, for the response descriptions.
_ERRORS = {
    400: "Invalid request: malformed JSON, a wrong type or value, or more than one Authorization header. "
         "`field` names the culprit.",
    401: "Missing, malformed, expired, not-yet-valid or badly signed token, or unusable identity claims.",
    403: "Another user's endpoint in the caller's organisation, or another organisation or user named.",
    404: "No such endpoint visible to the caller (other organisations' endpoints look the same).",
    409: "The endpoint id is taken, or the user already has the most endpoints allowed; for sendEvent, "
         "the first request with this idempotency key is still in progress.",
    413: "The request body is over max_body_bytes.",
    422: "The idempotency key was used with a different request body.",
    429: "Over a rate limit; retry after Retry-After seconds.",
    503: "Too many HTTP connections (retry after Retry-After seconds); the change could not be stored "
         "(the store is failing); or, for sendEvent, no targeted endpoint could take the event.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status in (*statuses, 503):  # any route may meet the connection cap
        response: dict[str, Any] = {
            "description": _ERRORS[status],
            "content": {PROBLEM_JSON: {"schema": _ref("Problem")}},
        }
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}
        if status == 429:
            response["headers"] = {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"},
                                                   "required": True}}
        responses[str(status)] = response
    return responses


def _command(summary: str, schema: str, success: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": _json(_ref(schema))},
        "responses": {**success, **_errors(400, 401, 413, *errors)},
    }


_NO_CONTENT = {"204": {"description": "Done."}}
_ENDPOINT_ID = {
    "type": "string", "minLength": 1, "maxLength": MAX_ENDPOINT_ID_LENGTH,
    # One MQTT topic level: no '/', '+', '#', NUL, whitespace; no control or format characters.
    "pattern": r"^[^/+#\s\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]+$",
}


def _schemas() -> dict[str, Any]:
    max_keep_alive = TablePolicy().max_keep_alive_seconds
    return {
        "RegisterUserEndpointWebCommand": {
            "type": "object",
            "required": ["keepAliveSeconds"],
            "properties": {
                "keepAliveSeconds": {
                    "type": "integer", "minimum": 1, "maximum": max_keep_alive,
                    "description": "How long before this endpoint expires without a keepalive. Mandatory; "
                                   "the maximum is max_keep_alive_seconds.",
                },
                "serverKeepAliveReminderOn": {"type": "boolean", "default": False},
                "userEndpointId": {**_ENDPOINT_ID, "description": "Optional; the server makes a UUID without "
                                   "one. Ids are global: use a UUID."},
            },
        },
        "KeepUserEndpointAliveWebCommand": {
            "type": "object",
            "required": ["userEndpointId"],
            "properties": {"userEndpointId": _ENDPOINT_ID},
        },
        "UnregisterUserEndpointWebCommand": {
            "type": "object",
            "required": ["userEndpointId"],
            "properties": {"userEndpointId": _ENDPOINT_ID, "reason": {"type": "string"}},
        },
        "SendEventToUserWebCommand": {
            "type": "object",
            "required": ["event", "userId"],
            "properties": {
                "event": {
                    "type": "object",
                    "required": ["type", "timestamp"],
                    "properties": {
                        "type": {"type": "string", "pattern": "^(?:[A-Z][a-z0-9]+){2,}Event$",
                                 "examples": ["CallCreatedEvent"]},
                        "timestamp": {"type": "string", "examples": ["2011-12-03T10:15:30Z"],
                                      "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z$"},
                    },
                },
                "userId": {"type": "string", "minLength": 1},
                "userEndpointId": _ENDPOINT_ID,
                "organizationId": {"type": "string", "minLength": 1,
                                   "description": "Required for SERVICE callers; others may only name their own."},
                "qos": {"type": "integer", "description": "1 = at least once; anything else best effort."},
                "masks": {"type": "array", "maxItems": MAX_MASKS, "items": {"type": "string", "minLength": 1},
                          "description": "JSONPath expressions of strings to hide in logs (no regular expressions)."},
            },
        },
        "RegisterResult": {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "string", "description": "user endpoint id"}},
        },
        "UserEndpointView": {
            "type": "object",
            "required": ["id", "userId", "organizationId", "keepAliveSeconds", "state", "version",
                         "serverKeepAliveReminderOn", "connected"],
            "properties": {
                "id": {"type": "string"},
                "userId": {"type": "string"},
                "organizationId": {"type": "string"},
                "keepAliveSeconds": {"type": "integer"},
                "state": {"type": "string", "enum": ["HEALTHY", "SICK", "UNKNOWN"]},
                "version": {"type": "integer"},
                "serverKeepAliveReminderOn": {"type": "boolean"},
                "connected": {"type": "boolean", "description": "An MQTT connection is attached."},
                "connectedSince": {"type": ["string", "null"], "readOnly": True,
                                   "description": "When the attached MQTT connection connected (ISO-8601); "
                                                  "null without one."},
                "lastKeepaliveAgoSeconds": {"type": "integer", "minimum": 0, "readOnly": True,
                                            "description": "Whole seconds since the last keepalive."},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "mqtt", "http", "store", "endpoints"],
            "properties": {
                "status": {"enum": ["ok", "degraded"], "description": "degraded while the store cannot commit"},
                "mqtt": {"type": "boolean"}, "http": {"type": "boolean"},
                "store": {"enum": ["ok", "failing"]},
                "endpoints": {"type": "integer"},
            },
            # The MQTT side's gauges (connections, pendingConnects...): counts, named by the broker.
            "additionalProperties": {"type": "integer"},
        },
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details.",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "detail": {"type": "string"},
                "field": {"type": "string", "description": "The field, header or body to blame."},
            },
        },
    }


def _paths() -> dict[str, Any]:
    view = _ref("UserEndpointView")
    endpoint_id = {"name": "endpoint_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        PREFIX: {
            "post": _command("Register a user endpoint (or update one's settings); answers its id.",
                             "RegisterUserEndpointWebCommand",
                             {"200": {"description": "The id.", "content": _json({"type": "string"})}},
                             403, 409, 429),
            "get": {
                "summary": "List endpoints: the caller's own; SERVICE callers filter by user and organisation.",
                "parameters": [
                    {"name": "userId", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "organizationId", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "The endpoints.", "content": _json({"type": "array",
                                                                                        "items": view})},
                              **_errors(400, 401, 403)},
            },
        },
        f"{PREFIX}/register": {
            "post": _command("Register a user endpoint, iOS variant: answers {\"id\": ...}.",
                             "RegisterUserEndpointWebCommand",
                             {"200": {"description": "The id.", "content": _json(_ref("RegisterResult"))}},
                             403, 409, 429),
        },
        f"{PREFIX}/keepalive": {
            "post": _command("Keep an endpoint alive.", "KeepUserEndpointAliveWebCommand", _NO_CONTENT, 403, 404),
        },
        f"{PREFIX}/unregister": {
            "post": _command("Unregister an endpoint and close its MQTT connection.",
                             "UnregisterUserEndpointWebCommand", _NO_CONTENT, 403, 404),
        },
        f"{PREFIX}/sendEvent": {
            "post": {
                **_command("Send an event to every endpoint of a user, or to one; answers how many took it.",
                           "SendEventToUserWebCommand",
                           {"200": {"description": "Endpoints that took the event (QoS 1: stored).",
                                    "content": _json({"type": "integer", "minimum": 0})}},
                           403, 404, 409, 422, 429),
                "parameters": [
                    {"name": header, "in": "header", "required": False,
                     "description": "A retry with the same key gets the first answer and delivers nothing again.",
                     "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[!-~]+$"}}
                    for header in IDEMPOTENCY_HEADERS
                ],
            },
        },
        PREFIX + "/{endpoint_id}": {
            "get": {
                "summary": "One endpoint.",
                "parameters": [endpoint_id],
                "responses": {"200": {"description": "The endpoint.", "content": _json(view)},
                              **_errors(400, 401, 403, 404)},
            },
        },
        HEALTH_PATH: {
            "get": {
                "summary": "200 once the broker and the bridge accept connections, with a few gauges.",
                "security": [],
                "responses": {"200": {"description": "Ready.", "content": _json(_ref("Health"))},
                              **_errors()},
            },
        },
        DASHBOARD_PATH: {
            "get": {
                "summary": "The live endpoints page (HTML). It holds no data: it asks for a SERVICE token.",
                "security": [],
                "responses": {"200": {"description": "The page.", "content": {"text/html": {}}}},
            },
        },
        DASHBOARD_SCRIPT_PATH: {
            "get": {
                "summary": "The page's script.",
                "security": [],
                "responses": {"200": {"description": "JavaScript.", "content": {"text/javascript": {}}}},
            },
        },
        DASHBOARD_EVENTS_PATH: {
            "get": {
                "summary": "Server-Sent Events for the page: a snapshot of the endpoints, then lifecycle events. "
                           "SERVICE tokens only; one with an organisation sees only that organisation.",
                "responses": {"200": {"description": "An event stream (snapshot, lifecycle, reset events).",
                                      "content": {"text/event-stream": {}}},
                              **_errors(400, 401, 503)},
            },
        },
        OPENAPI_PATH: {
            "get": {
                "summary": "This document.",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1.", "content": _json({"type": "object"})},
                              **_errors()},
            },
        },
        DOCS_PATH: {
            "get": {
                "summary": "This document, rendered by Swagger UI (served by the service, no CDN).",
                "security": [],
                "responses": {"200": {"description": "The page.", "content": _text("text/html")}, **_errors()},
            },
        },
        DOCS_PATH + "/{asset}": {
            "get": {
                "summary": "The docs page's script and style sheet.",
                "security": [],
                "parameters": [{"name": "asset", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": ["swagger-ui.css", "swagger-ui-bundle.js"]}}],
                "responses": {"200": {"description": "The file.", "content": {**_text("text/css"),
                                                                               **_text("text/javascript")}},
                              **_errors(404)},
            },
        },
        METRICS_PATH: {
            "get": {
                "summary": "Metrics in the Prometheus text format. Here unless metrics_port is set: then they "
                           "are served only on that port, and this answers 404; with metrics_enabled false "
                           "there are none, and this answers 404.",
                "security": [],
                "responses": {"200": {"description": "The metrics.", "content": _text("text/plain")},
                              **_errors(404)},
            },
        },
    }


def _text(media_type: str) -> dict[str, Any]:
    return {media_type: {"schema": {"type": "string"}}}


@cache
def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "endpoint-broker: Registration v1.0",
            "version": "1.0",
            "description": "User endpoints (one browser tab, one phone) and the events pushed to them over MQTT. "
                           "MQTT over WebSocket is served at /ws on the same port (subprotocol mqtt); it is "
                           "not an HTTP operation, so it is not described here.",
        },
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": _schemas(),
        },
    }


@cache
def _encoded() -> bytes:
    return orjson.dumps(openapi_document())


async def openapi_json(request: Request) -> Response:
    return Response(_encoded(), media_type="application/json")
