"""Idempotent sendEvent: a retry with the same key gets the first answer and delivers nothing again.

A key belongs to one principal (its scope) for `idempotency_window_seconds`. Its life:

    begin() -> None          the first request: deliver, then record() the answer
    record()                 the answer is known; it commits with the events it produced
    settle(committed=True)   on disk: a retry gets the answer at once
    settle(committed=False)  the commit failed: a retry waits for the commit again, and
                             is answered only once it succeeds (a 200 means stored)
    forget()                 the first request failed (4xx, 503): a retry runs again

A retry that arrives while the first is still delivering or committing gets 409; the
same key with another body gets 422. Keys are bounded in number and in size.
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass

import orjson
from cachetools import TLRUCache

from endpoint_core.clock import Clock
from endpoint_core.errors import Conflict, InvalidInput, Unprocessable
from endpoint_core.journal import IdempotencyRecord

MAX_KEY_LENGTH = 128
DEFAULT_WINDOW_SECONDS = 300.0
# Keys kept in memory; past it the least recently used are forgotten first (README "Security limits").
MAX_KEYS = 100_000
# The header the platform's clients already send "for detecting retries of the same request".
HEADERS = ("Idempotency-Key", "X-Auvious-TransactionId")


class KeyState(enum.Enum):
    IN_FLIGHT = 1  # delivering, or committing
    UNCOMMITTED = 2  # answered, but its commit failed: not yet on disk
    DONE = 3


@dataclass(slots=True)
class KeyEntry:
    digest: str
    expires_at: float
    state: KeyState = KeyState.IN_FLIGHT
    status: int = 0
    count: int = 0


def require_key(value: str, header: str) -> str:
    """The key, or 400 naming the header: 1 to 128 printable ASCII characters."""
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not all(" " < c <= "~" for c in value):
        raise InvalidInput(f"{header} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters", header)
    return value


def body_digest(body: object) -> str:
    """The same request in any key order or spacing has the same digest."""
    try:
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    except orjson.JSONEncodeError:
        # orjson reads JSON nested up to 1024 levels but writes at most 254.
        raise InvalidInput("the request body is nested too deeply (at most 254 levels)", "body") from None


def _expiry(_key: tuple[str, str], entry: KeyEntry, _now: float) -> float:
    return entry.expires_at


class IdempotencyKeys:
    def __init__(self, window_seconds: float = DEFAULT_WINDOW_SECONDS, clock: Clock = time.time,
                 max_keys: int = MAX_KEYS) -> None:
        self.window_seconds = window_seconds
        self._clock = clock
        self._entries: TLRUCache[tuple[str, str], KeyEntry] = TLRUCache(maxsize=max_keys, ttu=_expiry, timer=clock)

    def __len__(self) -> int:
        return len(self._entries)

    def restore(self, records: list[IdempotencyRecord]) -> None:
        for record in records:
            if record.expires_at > self._clock():
                self._entries[(record.scope, record.key)] = KeyEntry(
                    record.body_digest, record.expires_at, KeyState.DONE, record.status, record.count)

    def begin(self, scope: str, key: str, digest: str) -> KeyEntry | None:
        """None for a new key, now in flight; else the entry of the first request."""
        entry = self._entries.get((scope, key))
        if entry is None:
            self._entries[(scope, key)] = KeyEntry(digest, self._clock() + self.window_seconds)
            return None
        if entry.digest != digest:
            raise Unprocessable("this idempotency key was used with a different request body", "Idempotency-Key")
        if entry.state is KeyState.IN_FLIGHT:
            raise Conflict("a request with this idempotency key is still in progress; retry later",
                           "Idempotency-Key")
        return entry

    def record(self, scope: str, key: str, status: int, count: int) -> IdempotencyRecord:
        """The first request's answer, to journal in the same commit as its events."""
        entry = self._entries[(scope, key)]
        entry.status, entry.count = status, count
        return IdempotencyRecord(scope, key, entry.digest, status, count, entry.expires_at)

    def settle(self, scope: str, key: str, committed: bool) -> None:
        entry = self._entries.get((scope, key))
        if entry is not None:
            entry.state = KeyState.DONE if committed else KeyState.UNCOMMITTED

    def forget(self, scope: str, key: str) -> None:
        self._entries.pop((scope, key), None)
