"""Untrusted text in log lines: escaped and capped, so that a peer cannot forge lines or flood the log."""

from __future__ import annotations

import re

# Enough to recognise an id or a topic; a client id may be up to 64 KiB on the wire.
DEFAULT_LIMIT = 80


def loggable(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as one printable, quoted line of at most about `limit` characters.

    repr escapes newlines, control characters and invalid text; the cap applies to the
    escaped form, and a cut is marked with the original length.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}...({size} chars)"


def without_password(url: str) -> str:
    """A URL as it may be logged: redis://user:secret@host/0 -> redis://user:***@host/0."""
    return re.sub(r"^(\w+://[^:/@]*:)[^@]*@", r"\1***@", url)
