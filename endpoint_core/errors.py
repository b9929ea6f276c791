"""Domain errors. Each names the offending field, so every adapter can report it.

The HTTP bridge maps each class to one status code; the MQTT side maps the
ones that can occur at CONNECT to CONNACK codes. Nothing here knows about HTTP.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: a request the domain refuses, with the field to blame (if any)."""

    title = "Request refused"

    def __init__(self, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidInput(DomainError):
    """A value is missing, of the wrong type or out of range (HTTP 400)."""

    title = "Invalid request"


class NotAuthenticated(DomainError):
    """No usable credentials: missing, malformed, expired or badly signed token (HTTP 401)."""

    title = "Not authenticated"

    # Why, from a closed set (metrics label it with this): missing, malformed, algorithm,
    # bad_signature, expired, not_yet_valid, missing_claim, invalid_claim.
    def __init__(self, detail: str, field: str | None = None, reason: str = "invalid_claim") -> None:
        super().__init__(detail, field)
        self.reason = reason


class Forbidden(DomainError):
    """The caller is known but may not do this (HTTP 403)."""

    title = "Forbidden"


class NotFound(DomainError):
    """No such thing visible to the caller (HTTP 404). Used for other organisations' data too."""

    title = "Not found"


class Conflict(DomainError):
    """The id is taken by another owner (HTTP 409)."""

    title = "Conflict"


class Unprocessable(DomainError):
    """Well-formed, but in conflict with an earlier request (HTTP 422): an idempotency key reused
    with another body."""

    title = "Unprocessable request"


class Unavailable(DomainError):
    """Nothing could take the request right now, e.g. every target queue is full (HTTP 503)."""

    title = "Service unavailable"


class RateLimited(DomainError):
    """Over a rate limit (HTTP 429 with Retry-After; CONNACK 3 for a CONNECT)."""

    title = "Too many requests"

    def __init__(self, detail: str, field: str | None = None, *, retry_after_seconds: float) -> None:
        super().__init__(detail, field)
        self.retry_after_seconds = retry_after_seconds
