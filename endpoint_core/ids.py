"""User endpoint ids: each must be usable as exactly one MQTT topic level."""

from __future__ import annotations

import re
import uuid

from endpoint_core.errors import InvalidInput

MAX_ENDPOINT_ID_LENGTH = 128

# '/' would split the topic level, '+' and '#' are wildcards, NUL is forbidden by
# MQTT, and whitespace makes ids unsafe to paste into shells and logs.
_FORBIDDEN = re.compile(r"[/+#\x00\s]")


def endpoint_id_problem(candidate: object) -> str | None:
    """Why `candidate` is not a valid endpoint id, or None when it is."""
    if not isinstance(candidate, str):
        return "must be a string"
    if not 1 <= len(candidate) <= MAX_ENDPOINT_ID_LENGTH:
        return f"must be 1 to {MAX_ENDPOINT_ID_LENGTH} characters long"
    if _FORBIDDEN.search(candidate):
        return "must not contain '/', '+', '#', NUL or whitespace"
    return None


def require_endpoint_id(candidate: object, field: str = "userEndpointId") -> str:
    """Return `candidate` if it is a valid endpoint id, else raise InvalidInput naming `field`."""
    problem = endpoint_id_problem(candidate)
    if problem is not None:
        raise InvalidInput(f"{field} {problem}", field)
    assert isinstance(candidate, str)
    return candidate


def new_endpoint_id() -> str:
    return str(uuid.uuid4())
