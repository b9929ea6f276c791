"""RFC 9457 problem details: every error the bridge returns, and nothing else (no stack traces)."""

from __future__ import annotations

import logging
import math
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
    RateLimited,
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
    RateLimited: 429,
    Unavailable: 503,
}


def status_of(error: DomainError) -> int:
    return next((code for kind, code in STATUS_OF.items() if isinstance(error, kind)), 400)


def problem_body(status: int, title: str, detail: str, field: str | None = None) -> bytes:
    body: dict[str, object] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if field is not None:
        body["field"] = field
    return orjson.dumps(body)


def problem_headers(status: int, error: DomainError | None = None) -> dict[str, str]:
    if status == 401:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}
    if isinstance(error, RateLimited):
        # Whole seconds (RFC 9110, 10.2.3), rounded up so that a retry at once finds a token.
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_seconds)))}
    return {}


def problem(
    status: int, title: str, detail: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(problem_body(status, title, detail, field), status_code=status, media_type=PROBLEM_JSON,
                    headers={**problem_headers(status), **(headers or {})})


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    status = status_of(exc)
    return problem(status, exc.title, exc.detail, exc.field, headers=problem_headers(status, exc))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # exc.headers carries e.g. the Allow header of a 405.
    return problem(exc.status_code, exc.detail or "Error", f"{request.method} {request.url.path}: {exc.detail}",
                   headers=exc.headers)


UNEXPECTED_TITLE, UNEXPECTED_DETAIL = "Internal server error", "the request failed; the error was logged"


def log_unexpected(method: str, path: str) -> None:
    """One traceback per failed request, from inside its `except` block."""
    log.exception("unhandled error on %s %s", method, path)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log_unexpected(request.method, request.url.path)
    return problem(500, UNEXPECTED_TITLE, UNEXPECTED_DETAIL)
