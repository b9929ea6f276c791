"""Reading requests: a size-limited JSON body and the caller's principal."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from endpoint_core.errors import InvalidInput
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from http_bridge.problems import PayloadTooLarge


def service_of(request: Request) -> EndpointService:
    service: EndpointService = request.app.state.service
    return service


def principal_of(request: Request) -> Principal:
    return service_of(request).authenticate_bearer(request.headers.get("authorization"))


async def json_body(request: Request) -> Any:
    """The parsed JSON body; 413 past the configured limit, 400 when it is not JSON."""
    limit: int = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body exceeds {limit} bytes", "body")
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > limit:
            raise PayloadTooLarge(f"the request body exceeds {limit} bytes", "body")
    if not chunks.strip():
        raise InvalidInput("the request body must be a JSON object", "body")
    try:
        return json.loads(chunks)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}", "body") from None
