"""The lifecycle webhook's rules: its signature, its retry schedule and its bounded queue.

The sender itself (http_bridge.webhook) POSTs from a background task; the table's
observer only appends to `WebhookQueue`, so a webhook that is down never slows a
table operation. Delivery is at least once and in order: the head of the queue is
retried (with `backoff_seconds`) until the receiver answers 2xx, and only then does
the next event go out. When the queue is full the oldest event is dropped, with a
counted warning.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from endpoint_core.journal import DeleteWebhookEvent, PutWebhookEvent
from endpoint_core.lifecycle import LifecycleEvent
from endpoint_core.table import Journal

log = logging.getLogger("endpoint_broker.webhook")

SIGNATURE_HEADER = "X-Endpoint-Broker-Signature"
# A counted warning for the first drop, then one per this many.
DROP_WARNING_EVERY = 100


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    queue_max_events: int = 10_000
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    timeout_seconds: float = 10.0


def signature(body: bytes, secret: str) -> str:
    """The header value: `sha256=` and the hex HMAC-SHA256 of the exact body bytes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff_seconds(failures: int, policy: WebhookPolicy) -> float:
    """The wait after the `failures`-th failed attempt in a row: 1, 2, 4... x initial, capped."""
    return float(min(policy.retry_max_seconds, policy.retry_initial_seconds * 2 ** max(0, failures - 1)))


@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    event_id: str
    body: bytes
    seq: int = 0  # names it in the journal


class WebhookQueue:
    """Events waiting for the webhook, oldest first, at most `max_events`.

    With a journal, each queued event is stored (PutWebhookEvent) and removed once
    delivered or dropped (DeleteWebhookEvent): undelivered events survive a restart.
    """

    def __init__(self, max_events: int, journal: Journal | None = None) -> None:
        self.max_events = max_events
        self._journal = journal
        self._items: deque[QueuedDelivery] = deque()
        self._seq = itertools.count(1)
        self.dropped = 0
        # Called after each offer (the sender wakes up); must not block.
        self.on_offer: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, event: LifecycleEvent) -> None:
        """The table observer: O(1), never blocks (the journal only queues the change)."""
        self.offer(QueuedDelivery(event.id, orjson.dumps(event.to_json()), next(self._seq)))

    def restore(self, stored: Sequence[PutWebhookEvent]) -> None:
        """Load what the store kept, oldest first, before any new event; all of it, even past the bound."""
        for change in stored:
            self._items.append(QueuedDelivery(_event_id(change.body), change.body, change.seq))
        if stored:
            self._seq = itertools.count(stored[-1].seq + 1)
            log.info("%d lifecycle event(s) restored for the webhook", len(stored))

    def offer(self, delivery: QueuedDelivery) -> QueuedDelivery | None:
        """Append; returns the (last) delivery dropped to make room, if any."""
        if self._journal is not None:
            self._journal.append((PutWebhookEvent(delivery.seq, delivery.body),))
        dropped = None
        while len(self._items) >= self.max_events:
            dropped = self._items.popleft()
            self._forget(dropped)
            self.dropped += 1
            if self.dropped % DROP_WARNING_EVERY == 1:
                log.warning("lifecycle webhook queue full (%d events): oldest event dropped (%d dropped so far)",
                            self.max_events, self.dropped)
        self._items.append(delivery)
        if self.on_offer is not None:
            self.on_offer()
        return dropped

    def head(self) -> QueuedDelivery | None:
        return self._items[0] if self._items else None

    def delivered(self, delivery: QueuedDelivery) -> None:
        """The receiver took `delivery`: it leaves, unless it was dropped meanwhile."""
        if self._items and self._items[0] is delivery:
            self._items.popleft()
            self._forget(delivery)

    def _forget(self, delivery: QueuedDelivery) -> None:
        if self._journal is not None:
            self._journal.append((DeleteWebhookEvent(delivery.seq),))


def _event_id(body: bytes) -> str:
    try:
        value = orjson.loads(body).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""
