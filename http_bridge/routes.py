"""The Registration v1.0 read routes and /healthz, each a thin call into EndpointService.

MQTT over WebSocket at /ws is plain ASGI ahead of the router (http_bridge.websocket).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from http_bridge.commands import ENDPOINTS, PREFIX
from http_bridge.dashboard import dashboard_events, dashboard_page, dashboard_script
from http_bridge.docs_page import docs_asset, docs_page
from http_bridge.openapi import (
    DASHBOARD_EVENTS_PATH,
    DASHBOARD_PATH,
    DASHBOARD_SCRIPT_PATH,
    DOCS_PATH,
    HEALTH_PATH,
    OPENAPI_PATH,
    openapi_json,
)
from http_bridge.problems import problem
from http_bridge.requests import principal_of, service_of
from http_bridge.responses import json_response


class ByMethod:
    """One path, one ASGI app per method (the router has already checked the method)."""

    def __init__(self, **apps: ASGIApp) -> None:
        self.apps = apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.apps[scope["method"] if scope["method"] != "HEAD" else "GET"](scope, receive, send)


async def list_endpoints(request: Request) -> Response:
    principal = principal_of(request)
    query = request.query_params
    return json_response(await service_of(request).answer_list(
        principal, query.get("userId") or None, query.get("organizationId") or None
    ))


async def get_endpoint(request: Request) -> Response:
    principal = principal_of(request)
    return json_response(await service_of(request).answer_get(principal, request.path_params["endpoint_id"]))


async def healthz(request: Request) -> Response:
    """200 once the broker and the bridge accept connections, with the store's health and a few gauges."""
    mqtt, store = request.app.state.mqtt, request.app.state.store
    if mqtt.ready:
        # A failing store degrades the service (QoS 1, registrations answer 503) but does not
        # stop it: QoS 0 events and keepalives go on, so this stays a 200 that says so.
        return json_response({
            "status": "ok" if store.healthy else "degraded",
            "mqtt": True,
            "http": True,
            "store": "ok" if store.healthy else "failing",
            "endpoints": len(service_of(request).table),
            **mqtt.stats(),
            # A cluster node's store (cluster.node) says which node this is and whether Redis answers.
            **({"cluster": store.health()} if hasattr(store, "health") else {}),
        })
    return problem(503, "Not ready", "the MQTT broker is not accepting connections")


routes = [
    # POSTs to the command paths are taken by the CommandRoutes middleware before the
    # router; listing them here keeps 405 answers (and their Allow header) right.
    Route(PREFIX, ByMethod(GET=request_response(list_endpoints), POST=ENDPOINTS[PREFIX]), methods=["GET", "POST"]),
    *(Route(path, endpoint, methods=["POST"]) for path, endpoint in ENDPOINTS.items() if path != PREFIX),
    Route(PREFIX + "/{endpoint_id}", get_endpoint, methods=["GET"]),
    Route(HEALTH_PATH, healthz, methods=["GET"]),
    Route(OPENAPI_PATH, openapi_json, methods=["GET"]),  # no token: the contract is public
    Route(DOCS_PATH, docs_page, methods=["GET"]),
    Route(DOCS_PATH + "/{asset}", docs_asset, methods=["GET"]),
    # The page and its script hold no data (no token); the stream needs a SERVICE token.
    Route(DASHBOARD_PATH, dashboard_page, methods=["GET"]),
    Route(DASHBOARD_SCRIPT_PATH, dashboard_script, methods=["GET"]),
    Route(DASHBOARD_EVENTS_PATH, dashboard_events, methods=["GET"]),
]
