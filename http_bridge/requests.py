"""Reading requests: a size-limited JSON body and the caller's principal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from starlette.requests import Request

from endpoint_core.errors import InvalidInput
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from http_bridge.problems import PayloadTooLarge


def service_of(request: Request) -> EndpointService:
    service: EndpointService = request.app.state.service
    return service


def principal_of(request: Request) -> Principal:
    return service_of(request).authenticate_bearer(authorization_of(request.scope["headers"]))


def authorization_of(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The one Authorization header, or None. Two are refused: which one counts would
    depend on the code reading them (a first-wins reader and a last-wins reader disagree)."""
    found = None
    for name, value in headers:
        if name == b"authorization":
            if found is not None:
                raise InvalidInput("more than one Authorization header", "Authorization")
            found = value
    return None if found is None else found.decode("latin-1")


def check_declared_length(content_length: str | None, limit: int) -> None:
    """413 before reading, when the client announces a body over the limit."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", "body")


def check_length(received: int, limit: int) -> None:
    if received > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", "body")


def parse_json(raw: bytes | bytearray) -> Any:
    """The body as JSON; 400 when it is empty or not JSON (orjson: strict RFC 8259, 64-bit integers)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not raw.strip():
            raise InvalidInput("the request body must be a JSON object", "body") from None
        raise InvalidInput(f"the request body is not valid JSON: {exc}", "body") from None
