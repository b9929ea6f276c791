"""The Registration v1.0 REST routes, each a thin call into EndpointService."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from http_bridge.problems import problem
from http_bridge.requests import json_body, principal_of, service_of
from http_bridge.websocket import mqtt_over_websocket

PREFIX = "/rtc-api/users/endpoints"


async def register(request: Request) -> Response:
    """RegisterUserEndpointWebCommand: the answer is the id as a JSON string."""
    principal = principal_of(request)
    endpoint = service_of(request).register(principal, await json_body(request))
    return JSONResponse(endpoint.id)


async def register_ios(request: Request) -> Response:
    """The iOS variant: `{"id": ...}`. Its documented query parameters are ignored."""
    principal = principal_of(request)
    endpoint = service_of(request).register(principal, await json_body(request))
    return JSONResponse({"id": endpoint.id})


async def keepalive(request: Request) -> Response:
    principal = principal_of(request)
    service_of(request).keepalive(principal, await json_body(request))
    return Response(status_code=204)


async def unregister(request: Request) -> Response:
    principal = principal_of(request)
    service_of(request).unregister(principal, await json_body(request))
    return Response(status_code=204)


async def send_event(request: Request) -> Response:
    principal = principal_of(request)
    count = service_of(request).send_event(principal, await json_body(request))
    return JSONResponse(count)


async def list_endpoints(request: Request) -> Response:
    principal = principal_of(request)
    query = request.query_params
    endpoints = service_of(request).list(
        principal, query.get("userId") or None, query.get("organizationId") or None
    )
    return JSONResponse([e.view() for e in endpoints])


async def get_endpoint(request: Request) -> Response:
    principal = principal_of(request)
    endpoint = service_of(request).get(principal, request.path_params["endpoint_id"])
    return JSONResponse(endpoint.view())


async def healthz(request: Request) -> Response:
    """200 once the broker and the bridge accept connections, with a few gauges for operators."""
    mqtt = request.app.state.mqtt
    if mqtt.ready:
        return JSONResponse({
            "status": "ok",
            "mqtt": True,
            "http": True,
            "endpoints": len(service_of(request).table),
            **mqtt.stats(),
        })
    return problem(503, "Not ready", "the MQTT broker is not accepting connections")


routes = [
    Route(PREFIX, register, methods=["POST"]),
    Route(PREFIX, list_endpoints, methods=["GET"]),
    Route(f"{PREFIX}/register", register_ios, methods=["POST"]),
    Route(f"{PREFIX}/keepalive", keepalive, methods=["POST"]),
    Route(f"{PREFIX}/unregister", unregister, methods=["POST"]),
    Route(f"{PREFIX}/sendEvent", send_event, methods=["POST"]),
    Route(PREFIX + "/{endpoint_id}", get_endpoint, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    WebSocketRoute("/ws", mqtt_over_websocket),
]
