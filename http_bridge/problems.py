"""RFC 9457 problem details: every error the bridge returns, and nothing else (no stack traces)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from endpoint_core.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    NotFound,
    Unavailable,
    Unprocessable,
)

log = logging.getLogger("endpoint_broker.http")

PROBLEM_JSON = "application/problem+json"


class PayloadTooLarge(DomainError):
    title = "Payload too large"


STATUS_OF: dict[type[DomainError], int] = {
    InvalidInput: 400,
    NotAuthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    Unprocessable: 422,
    Unavailable: 503,
}


def status_of(error: DomainError) -> int:
    return next((code for kind, code in STATUS_OF.items() if isinstance(error, kind)), 400)


def problem_body(status: int, title: str, detail: str, field: str | None = None) -> bytes:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return orjson.dumps(body)


def problem_headers(status: int) -> dict[str, str]:
    return {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else {}


def problem(
    status: int, title: str, detail: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(problem_body(status, title, detail, field), status_code=status, media_type=PROBLEM_JSON,
                    headers={**problem_headers(status), **(headers or {})})


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    return problem(status_of(exc), exc.title, exc.detail, exc.field)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # exc.headers carries e.g. the Allow header of a 405.
    return problem(exc.status_code, exc.detail or "Error", f"{request.method} {request.url.path}: {exc.detail}",
                   headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "Internal server error", "the request failed; the error was logged")
