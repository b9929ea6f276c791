"""The journal: every change the table makes that must survive a restart, and the store interface.

The table stays synchronous. Each state transition appends one `Change` to the
journal in memory, in order; a `Store` writes them (SQLite embedded, or Redis for a
cluster) from a thread of its own, in group commits, and says when everything
journalled up to a point is on disk. Adapters wait for that point before they
answer where the contract promises durability (a 200 for a QoS 1 sendEvent, a REST
register or unregister, a CONNACK 0 that registered an endpoint, a SUBACK of a
clean_session=0 session).

What is journalled, and what is not:
- an endpoint's record, on every change that the view or a restart needs
  (registration, re-registration, version, a persistent session's subscriptions);
- its removal, which also removes its queued events;
- each queued QoS 1 event, and its removal once acknowledged (or dropped);
- idempotency keys of sendEvent, in the same commit as their events;
- each lifecycle event waiting for the webhook, and its removal once delivered (or dropped).
Keepalives are never journalled: a restart gives every endpoint a fresh deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """What survives a restart of one endpoint."""

    id: str
    user_id: str
    organization_id: str
    keep_alive_seconds: int
    reminder_on: bool
    origin: str  # "rest" or "mqtt" (endpoint_core.endpoint.Origin values)
    version: int
    persistent_session: bool
    # Topic -> granted QoS; kept only for clean_session=0 sessions.
    subscriptions: tuple[tuple[str, int], ...] = ()


# StoredEvent, PutEvent and DeleteEvent are made for every QoS 1 event and its acknowledgement:
# not frozen, since a frozen dataclass sets each field through object.__setattr__ (about 3 us of
# a QoS 1 sendEvent for these three). Like every change, they are never modified once journalled.
@dataclass(slots=True)
class StoredEvent:
    """One queued QoS 1 event of an endpoint. `seq` orders an endpoint's events and names them."""

    endpoint_id: str
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first answer to a sendEvent with an idempotency key, kept until `expires_at` (Unix time)."""

    scope: str  # the principal the key belongs to
    key: str
    body_digest: str  # hex digest of the request body: the same key with another body is a 422
    status: int
    count: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class PutEndpoint:
    record: EndpointRecord


@dataclass(frozen=True, slots=True)
class DeleteEndpoint:
    """The endpoint is gone, and every event still queued for it."""

    endpoint_id: str


@dataclass(slots=True)
class PutEvent:
    event: StoredEvent


@dataclass(slots=True)
class DeleteEvent:
    endpoint_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class PutIdempotency:
    record: IdempotencyRecord


@dataclass(frozen=True, slots=True)
class PutWebhookEvent:
    """A lifecycle event queued for the webhook; `seq` orders the queue and names the event."""

    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class DeleteWebhookEvent:
    seq: int


Change = PutEndpoint | DeleteEndpoint | PutEvent | DeleteEvent | PutIdempotency | PutWebhookEvent | DeleteWebhookEvent


@dataclass(slots=True)
class Snapshot:
    """Everything a store holds, as loaded at start."""

    endpoints: list[EndpointRecord] = field(default_factory=list)
    # Per endpoint id, its events in `seq` order.
    events: dict[str, list[StoredEvent]] = field(default_factory=dict)
    idempotency: list[IdempotencyRecord] = field(default_factory=list)
    # Lifecycle events not yet delivered to the webhook, in `seq` order.
    webhook_events: list[PutWebhookEvent] = field(default_factory=list)


@dataclass(slots=True)
class StoreStats:
    """Plain counters, read at scrape time by the metrics collector."""

    commits: int = 0
    failed_commits: int = 0
    rows_committed: int = 0
    last_batch_rows: int = 0
    commit_seconds_total: float = 0.0
    pending_rows: int = 0


class StoreUnavailable(Exception):
    """A commit failed (disk full, I/O error, the store's server is down). The message says why."""


class Store(Protocol):
    """Where the journal goes. Implementations: store.sqlite.SqliteStore, store.memory.MemoryStore."""

    def load(self) -> Snapshot:
        """Everything stored, read once before the service starts (blocking is fine here)."""
        ...

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start writing; commit results are reported on `loop`."""
        ...

    def append(self, changes: Sequence[Change]) -> None:
        """Queue changes, in order, for the next group commit. Never blocks, never raises."""
        ...

    def committed(self) -> asyncio.Future[None]:
        """A future done once every change appended so far is committed.

        It fails with StoreUnavailable if the commit that carries them fails; those
        changes stay queued and are retried with the next commit.
        """
        ...

    @property
    def healthy(self) -> bool:
        """False while the last commit failed (for /healthz)."""
        ...

    @property
    def stats(self) -> StoreStats: ...

    async def close(self) -> None:
        """Commit what is queued, then stop the writer (on shutdown)."""
        ...
