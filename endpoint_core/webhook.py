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
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from endpoint_core.lifecycle import LifecycleEvent

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


class WebhookQueue:
    """Events waiting for the webhook, oldest first, at most `max_events`."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._items: deque[QueuedDelivery] = deque()
        self.dropped = 0
        # Called after each offer (the sender wakes up); must not block.
        self.on_offer: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, event: LifecycleEvent) -> None:
        """The table observer: O(1), never blocks."""
        self.offer(QueuedDelivery(event.id, orjson.dumps(event.to_json())))

    def offer(self, delivery: QueuedDelivery) -> QueuedDelivery | None:
        """Append; returns the delivery dropped to make room, if any."""
        dropped = None
        if len(self._items) >= self.max_events:
            dropped = self._items.popleft()
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
