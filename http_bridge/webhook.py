"""WebhookSender: POSTs queued lifecycle events to `lifecycle_webhook_url`, from a background task.

One event at a time, in order, head of the queue first (endpoint_core.webhook): a 2xx
answer removes it; anything else (an error status, a timeout, a refused connection) is
retried after the backoff, for as long as it takes. The table's observer only appends
to the queue, so nothing here can slow the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import httpx

from endpoint_core.journal import PutWebhookEvent
from endpoint_core.logtext import loggable
from endpoint_core.table import EndpointTable, Journal
from endpoint_core.webhook import SIGNATURE_HEADER, WebhookPolicy, WebhookQueue, backoff_seconds, signature

log = logging.getLogger("endpoint_broker.webhook")

Sleep = Callable[[float], Awaitable[None]]


def webhook_queue(table: EndpointTable, policy: WebhookPolicy, journal: Journal | None = None,
                  stored: Sequence[PutWebhookEvent] = ()) -> WebhookQueue:
    """The bounded queue, with what the store kept, observing the table's lifecycle events."""
    queue = WebhookQueue(policy.queue_max_events, journal)
    queue.restore(stored)
    table.observers.append(queue)
    return queue


class WebhookSender:
    def __init__(self, url: str, secret: str | None, queue: WebhookQueue, policy: WebhookPolicy,
                 *, client: httpx.AsyncClient | None = None, sleep: Sleep = asyncio.sleep) -> None:
        self.url = url
        self._secret = secret
        self.queue = queue
        self.policy = policy
        self._client = client
        self._sleep = sleep
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.delivered = 0
        self.failures = 0  # attempts that failed, in all
        queue.on_offer = self._wake.set

    def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.policy.timeout_seconds, follow_redirects=False)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lifecycle-webhook")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()
        if len(self.queue):
            log.warning("stopping with %d lifecycle event(s) not yet delivered to the webhook", len(self.queue))

    def headers(self, body: bytes) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(body, self._secret)
        return headers

    async def _run(self) -> None:
        failures_in_a_row = 0
        while True:
            delivery = self.queue.head()
            if delivery is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if await self.attempt(delivery.body):
                self.queue.delivered(delivery)
                self.delivered += 1
                failures_in_a_row = 0
                continue
            failures_in_a_row += 1
            await self._sleep(backoff_seconds(failures_in_a_row, self.policy))

    async def attempt(self, body: bytes) -> bool:
        """One POST; True on a 2xx answer."""
        assert self._client is not None
        try:
            response = await self._client.post(self.url, content=body, headers=self.headers(body))
        except httpx.HTTPError as exc:
            self._failed(f"{type(exc).__name__}: {loggable(str(exc), 200)}")
            return False
        if 200 <= response.status_code < 300:
            return True
        self._failed(f"HTTP {response.status_code}")
        return False

    def _failed(self, why: str) -> None:
        self.failures += 1
        # The URL may carry a credential in its query: the log names only the failure.
        log.warning("lifecycle webhook delivery failed (%s); %d event(s) queued, retrying with backoff",
                    why, len(self.queue))
