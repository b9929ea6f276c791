"""Identifiers that go into MQTT topics and log lines: endpoint ids, user ids, organisation ids.

An endpoint id must be usable as exactly one MQTT topic level. User and
organisation ids (from token claims) go into topics (`user/{userId}/{id}`) and
log lines too, so they follow the same character rules.
"""

from __future__ import annotations

import re
import unicodedata
import uuid

from endpoint_core.errors import InvalidInput

MAX_ENDPOINT_ID_LENGTH = 128
MAX_IDENTITY_LENGTH = 256

# '/' would split the topic level, '+' and '#' are wildcards, NUL is forbidden by
# MQTT, and whitespace makes ids unsafe to paste into shells and logs.
_FORBIDDEN = re.compile(r"[/+#\x00\s]")
# Cc: C0 and C1 controls, DEL (ESC forges terminal output, newlines forge log lines).
# Cf: format characters, invisible: bidi overrides (RLO), zero-width spaces and joiners.
# Zl, Zp: line and paragraph separators, which break log lines like a newline.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def has_invisible(text: str) -> bool:
    """Whether `text` holds a control, format (bidi, zero-width) or line-separator character."""
    return not text.isprintable() and any(unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


def endpoint_id_problem(candidate: object, pattern: re.Pattern[str] | None = None) -> str | None:
    """Why `candidate` is not a valid endpoint id, or None when it is.

    `pattern`, the operator's `endpoint_id_pattern`, must match the whole id when given.
    """
    if not isinstance(candidate, str):
        return "must be a string"
    if not 1 <= len(candidate) <= MAX_ENDPOINT_ID_LENGTH:
        return f"must be 1 to {MAX_ENDPOINT_ID_LENGTH} characters long"
    if _FORBIDDEN.search(candidate):
        return "must not contain '/', '+', '#', NUL or whitespace"
    if has_invisible(candidate):
        return "must not contain control or format characters (Unicode Cc, Cf)"
    if pattern is not None and not pattern.fullmatch(candidate):
        return "does not match the endpoint id pattern this service requires"
    return None


def require_endpoint_id(
    candidate: object, field: str = "userEndpointId", pattern: re.Pattern[str] | None = None
) -> str:
    """Return `candidate` if it is a valid endpoint id, else raise InvalidInput naming `field`."""
    problem = endpoint_id_problem(candidate, pattern)
    if problem is not None:
        raise InvalidInput(f"{field} {problem}", field)
    assert isinstance(candidate, str)
    return candidate


def identity_problem(candidate: object) -> str | None:
    """Why `candidate` cannot be a user or organisation id, or None when it can.

    Only non-empty strings: a number would make 5 and "5" the same organisation.
    No topic separators or wildcards (a userId `+` would be granted `user/+/{id}`),
    and nothing invisible or line-breaking, which could forge log lines.
    """
    if not isinstance(candidate, str):
        return "must be a string"
    if not 1 <= len(candidate) <= MAX_IDENTITY_LENGTH:
        return f"must be 1 to {MAX_IDENTITY_LENGTH} characters long"
    if any(c in candidate for c in "/+#"):
        return "must not contain '/', '+' or '#'"
    if has_invisible(candidate):
        return "must not contain control, format or line-separator characters"
    return None


def new_endpoint_id() -> str:
    return str(uuid.uuid4())
