"""The Registration v1.0 read routes, /healthz and /ws, each a thin call into EndpointService."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute

from http_bridge.commands import PREFIX
from http_bridge.problems import problem
from http_bridge.requests import principal_of, service_of
from http_bridge.responses import json_response
from http_bridge.websocket import mqtt_over_websocket


async def list_endpoints(request: Request) -> Response:
    principal = principal_of(request)
    query = request.query_params
    endpoints = service_of(request).list(
        principal, query.get("userId") or None, query.get("organizationId") or None
    )
    return json_response([e.view() for e in endpoints])


async def get_endpoint(request: Request) -> Response:
    principal = principal_of(request)
    endpoint = service_of(request).get(principal, request.path_params["endpoint_id"])
    return json_response(endpoint.view())


async def healthz(request: Request) -> Response:
    """200 once the broker and the bridge accept connections, with a few gauges for operators."""
    mqtt = request.app.state.mqtt
    if mqtt.ready:
        return json_response({
            "status": "ok",
            "mqtt": True,
            "http": True,
            "endpoints": len(service_of(request).table),
            **mqtt.stats(),
        })
    return problem(503, "Not ready", "the MQTT broker is not accepting connections")


routes = [
    # The POST commands are served by http_bridge.commands.CommandRoutes before the router.
    Route(PREFIX, list_endpoints, methods=["GET"]),
    Route(PREFIX + "/{endpoint_id}", get_endpoint, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    WebSocketRoute("/ws", mqtt_over_websocket),
]
