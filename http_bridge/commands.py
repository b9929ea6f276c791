"""The POST command routes (register, keepalive, unregister, sendEvent) as plain ASGI.

These are the service's hot paths: every client keeps alive every few seconds
and backends send events in bursts. Served through Starlette's Request and
Response objects and its router, each request cost about 20 microseconds more
(measured; see the commit that introduced this module). Without CORS they are
served ahead of Starlette's whole middleware stack (http_bridge.app.BridgeApp),
inside the request observer; with CORS, `CommandRoutes` serves them as the
innermost middleware, so CORS wraps them. A command answers its own errors,
unexpected ones included (500). Everything else (GET routes, /healthz, /ws,
404 and 405) goes on to Starlette. Body limits, JSON parsing and problem bodies are the same functions
the Starlette routes use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from endpoint_core.errors import DomainError
from endpoint_core.idempotency import HEADERS as IDEMPOTENCY_HEADERS
from endpoint_core.idempotency import require_key
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from http_bridge import websocket
from http_bridge.problems import (
    PROBLEM_JSON,
    UNEXPECTED_DETAIL,
    UNEXPECTED_TITLE,
    log_unexpected,
    problem_body,
    problem_headers,
    status_of,
)
from http_bridge.requests import authorization_of, check_declared_length, check_length, parse_json

PREFIX = "/rtc-api/users/endpoints"
JSON = b"application/json"

# A command: (service, caller, parsed body, the headers a command reads (COMMAND_HEADERS))
# -> (status, JSON body or None for 204).
# Each answers only once what it changed is stored, where the contract promises that.
Command = Callable[[EndpointService, Principal, object, dict[bytes, bytes]], Awaitable[tuple[int, bytes | None]]]


async def register(service: EndpointService, principal: Principal, body: object,
                   headers: dict[bytes, bytes]) -> tuple[int, bytes | None]:
    """RegisterUserEndpointWebCommand: the answer is the id as a JSON string."""
    return 200, orjson.dumps(await service.answer_register(principal, body))


async def register_ios(service: EndpointService, principal: Principal, body: object,
                       headers: dict[bytes, bytes]) -> tuple[int, bytes | None]:
    """The iOS variant: `{"id": ...}`. Its documented query parameters are ignored."""
    return 200, orjson.dumps({"id": await service.answer_register(principal, body)})


async def keepalive(service: EndpointService, principal: Principal, body: object,
                    headers: dict[bytes, bytes]) -> tuple[int, bytes | None]:
    await service.answer_keepalive(principal, body)
    return 204, None


async def unregister(service: EndpointService, principal: Principal, body: object,
                     headers: dict[bytes, bytes]) -> tuple[int, bytes | None]:
    await service.answer_unregister(principal, body)
    return 204, None


async def send_event(service: EndpointService, principal: Principal, body: object,
                     headers: dict[bytes, bytes]) -> tuple[int, bytes | None]:
    return 200, orjson.dumps(await service.send_event_durably(principal, body, idempotency_key_of(headers)))


# In order of precedence: (header as documented, its name as ASGI gives it).
_IDEMPOTENCY_NAMES = tuple((header, header.lower().encode()) for header in IDEMPOTENCY_HEADERS)
CONTENT_LENGTH = b"content-length"
COMMAND_HEADERS = frozenset({CONTENT_LENGTH, *(name for _, name in _IDEMPOTENCY_NAMES)})


def idempotency_key_of(headers: dict[bytes, bytes]) -> str | None:
    for header, name in _IDEMPOTENCY_NAMES:
        value = headers.get(name)
        if value is not None:
            return require_key(value.decode("latin-1"), header)
    return None


COMMANDS: dict[str, Command] = {
    PREFIX: register,
    f"{PREFIX}/register": register_ios,
    f"{PREFIX}/keepalive": keepalive,
    f"{PREFIX}/unregister": unregister,
    f"{PREFIX}/sendEvent": send_event,
}


class CommandEndpoint:
    """One command as a plain ASGI app. It finds the service and the body limit in the app's state."""

    def __init__(self, command: Command) -> None:
        self.command = command

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.answer(scope, receive, send)

    async def answer(self, scope: Scope, receive: Receive, send: Send,
                     request_id_header: tuple[bytes, bytes] | None = None) -> int | None:
        """Serve the command, with `request_id_header` in the answer; the status answered, or
        None if the client went away first (observability.requests.ObservedCommands)."""
        state = scope["app"].state
        service: EndpointService = state.service
        try:
            principal = service.authenticate_bearer(authorization_of(scope["headers"]))
            # The last of a repeated header counts, as dict(headers) would have it.
            headers = {name: value for name, value in scope["headers"] if name in COMMAND_HEADERS}
            body = await _read_body(receive, _text(headers.get(CONTENT_LENGTH)), state.max_body_bytes)
            if body is None:
                return None  # the client went away
            status, payload = await self.command(service, principal, parse_json(body), headers)
        except DomainError as error:
            status = status_of(error)
            await _respond(send, status, problem_body(status, error.title, error.detail, error.field),
                           PROBLEM_JSON.encode(), problem_headers(status, error), request_id_header)
            return status
        except Exception:
            # Answered here, not by Starlette's error middleware, which a command may bypass
            # (http_bridge.app.BridgeApp); one traceback, and the process carries on.
            log_unexpected("POST", scope["path"])
            await _respond(send, 500, problem_body(500, UNEXPECTED_TITLE, UNEXPECTED_DETAIL), PROBLEM_JSON.encode(),
                           None, request_id_header)
            return 500
        await _respond(send, status, payload, JSON, None, request_id_header)
        return status


ENDPOINTS = {path: CommandEndpoint(command) for path, command in COMMANDS.items()}


def is_command(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in ENDPOINTS


async def serve_command(scope: Scope, receive: Receive, send: Send) -> None:
    """A request for which `is_command` holds."""
    await ENDPOINTS[scope["path"]](scope, receive, send)


async def answer_command(scope: Scope, receive: Receive, send: Send,
                         request_id_header: tuple[bytes, bytes]) -> int | None:
    """serve_command, for observability.requests.ObservedCommands."""
    return await ENDPOINTS[scope["path"]].answer(scope, receive, send, request_id_header)


class CommandRoutes:
    """Middleware: a POST to a command path goes straight to its CommandEndpoint, /ws to MQTT.

    The same endpoints are also in Starlette's router (http_bridge.routes), so that
    405 answers list POST in their Allow header; this only skips the router.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_command(scope):
            await serve_command(scope, receive, send)
        elif scope["type"] == "websocket" and scope["path"] == websocket.PATH:
            await websocket.mqtt_over_websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _read_body(receive: Receive, content_length: str | None, limit: int) -> bytes | None:
    check_declared_length(content_length, limit)
    message = await receive()
    body = message.get("body", b"")
    check_length(len(body), limit)  # a chunked body declares no length
    if not message.get("more_body", False):
        return body if message["type"] == "http.request" else None
    chunks = bytearray(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks += message.get("body", b"")
        check_length(len(chunks), limit)
    return bytes(chunks)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


async def _respond(send: Send, status: int, body: bytes | None, content_type: bytes,
                   extra_headers: dict[str, str] | None = None,
                   request_id_header: tuple[bytes, bytes] | None = None) -> None:
    headers = []
    if body is not None:  # a 204 carries neither a body nor a Content-Length (RFC 9110, 8.6)
        headers += [(b"content-length", str(len(body)).encode()), (b"content-type", content_type)]
    for name, value in (extra_headers or {}).items():
        headers.append((name.lower().encode(), value.encode()))
    if request_id_header is not None:
        headers.append(request_id_header)
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body or b""})
