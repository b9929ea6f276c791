"""Unit tests of the lifecycle webhook: its signature, backoff schedule, bounded queue and sender."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import httpx
import orjson
import pytest

from endpoint_core.journal import PutWebhookEvent
from endpoint_core.table import EndpointTable
from endpoint_core.webhook import QueuedDelivery, WebhookPolicy, WebhookQueue, backoff_seconds, signature
from http_bridge.webhook import WebhookSender, webhook_queue
from tests.fakes import FakeClock


def test_the_signature_is_the_hex_hmac_sha256_of_the_body() -> None:
    # RFC 4231-style known answer (Wikipedia's HMAC example).
    assert signature(b"The quick brown fox jumps over the lazy dog", "key") == \
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"


def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum() -> None:
    policy = WebhookPolicy(retry_initial_seconds=0.5, retry_max_seconds=5)
    assert [backoff_seconds(n, policy) for n in range(1, 7)] == [0.5, 1, 2, 4, 5, 5]


def test_the_queue_drops_the_oldest_when_full_with_a_counted_warning(caplog: pytest.LogCaptureFixture) -> None:
    queue = WebhookQueue(2)
    deliveries = [QueuedDelivery(str(n), b"{}") for n in range(3)]
    with caplog.at_level(logging.WARNING, "endpoint_broker.webhook"):
        assert [queue.offer(d) for d in deliveries] == [None, None, deliveries[0]]
    assert (len(queue), queue.dropped, queue.head()) == (2, 1, deliveries[1])
    assert "1 dropped so far" in caplog.text
    queue.delivered(deliveries[0])  # dropped meanwhile: nothing changes
    assert queue.head() is deliveries[1]


class RecordingJournal:
    def __init__(self) -> None:
        self.changes: list[object] = []

    def append(self, changes: object) -> None:
        self.changes.extend(changes)  # type: ignore[call-overload]


def test_a_journalled_queue_stores_each_event_until_delivered_or_dropped() -> None:
    journal = RecordingJournal()
    queue = WebhookQueue(2, journal)  # type: ignore[arg-type]
    queue.restore([PutWebhookEvent(7, b'{"id":"restored"}')])
    assert queue.head() == QueuedDelivery("restored", b'{"id":"restored"}', 7)
    assert journal.changes == []  # already stored
    table = EndpointTable(clock=FakeClock())
    table.observers.append(queue)
    table.register("alice", "acme", "e1", 60, False)  # seq 8
    table.register("alice", "acme", "e2", 60, False)  # seq 9: the restored one (7) is dropped
    head = queue.head()
    assert head is not None and head.seq == 8
    queue.delivered(head)
    assert [type(c).__name__ + str(c.seq) for c in journal.changes] == [  # type: ignore[attr-defined]
        "PutWebhookEvent8", "PutWebhookEvent9", "DeleteWebhookEvent7", "DeleteWebhookEvent8"]


def test_the_observer_only_enqueues_the_platform_shaped_event() -> None:
    table = EndpointTable(clock=FakeClock())
    queue = webhook_queue(table, WebhookPolicy(queue_max_events=10))
    table.register("alice", "acme", "e1", 60, False)
    head = queue.head()
    assert head is not None
    body = orjson.loads(head.body)
    assert (body["type"], body["userEndpointId"], body["id"]) == ("UserEndpointRegisteredEvent", "e1", head.event_id)


async def test_the_sender_retries_with_backoff_until_a_2xx_then_sends_the_next_in_order() -> None:
    answers = iter([500, 503, 200, 200])
    seen: list[tuple[bytes, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.content, request.headers["X-Endpoint-Broker-Signature"]))
        return httpx.Response(next(answers))

    sleeps: list[float] = []
    all_sent = asyncio.Event()

    async def fake_sleep(seconds: float) -> None:  # the fake clock: record, do not wait
        sleeps.append(seconds)

    policy = WebhookPolicy(retry_initial_seconds=1, retry_max_seconds=60)
    queue = WebhookQueue(10)
    sender = WebhookSender("http://receiver.invalid/hook", "s3cret", queue, policy,
                           client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), sleep=fake_sleep)
    sender.start()
    queue.offer(QueuedDelivery("1", b'{"n":1}'))
    queue.offer(QueuedDelivery("2", b'{"n":2}'))
    for _ in range(100):
        if sender.delivered == 2:
            all_sent.set()
            break
        await asyncio.sleep(0)
    await sender.stop()
    assert all_sent.is_set()
    assert [body for body, _ in seen] == [b'{"n":1}'] * 3 + [b'{"n":2}']
    assert sleeps == [1, 2]  # after the first and the second failure in a row
    expected = "sha256=" + hmac.new(b"s3cret", b'{"n":1}', hashlib.sha256).hexdigest()
    assert seen[0][1] == expected
    assert len(queue) == 0 and sender.failures == 2


async def test_an_unreachable_webhook_keeps_the_event_queued() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        await asyncio.sleep(0)

    queue = WebhookQueue(10)
    sender = WebhookSender("http://receiver.invalid/hook", None, queue, WebhookPolicy(retry_initial_seconds=1),
                           client=httpx.AsyncClient(transport=httpx.MockTransport(handler)), sleep=fake_sleep)
    sender.start()
    queue.offer(QueuedDelivery("1", b"{}"))
    for _ in range(200):
        if len(sleeps) >= 3:
            break
        await asyncio.sleep(0)
    await sender.stop()
    assert sleeps[:3] == [1, 2, 4] and len(queue) == 1
