"""Unit tests of the lifecycle feed rules: who may subscribe to $events, and the QoS 1 queue's bounds."""

from __future__ import annotations

import logging
import re
import time
import uuid

import orjson
import pytest

from endpoint_core.feeds import LifecycleFeeds, lifecycle_grant, lifecycle_topic
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType, new_event_id
from endpoint_core.outbox import LIFECYCLE_PACKET_IDS
from endpoint_core.principals import Principal
from endpoint_core.table import EndpointTable
from tests.fakes import FakeClock, FakeLink

EXP = time.time() + 3600


def service(org: str | None) -> Principal:
    return Principal("backend", org, True, EXP)


def user(org: str) -> Principal:
    return Principal("alice", org, False, EXP)


def event(org: str = "acme", endpoint_id: str = "e1", kind: LifecycleType = LifecycleType.REGISTERED) -> LifecycleEvent:
    return LifecycleEvent(kind, 0.0, endpoint_id, "alice", org, "HEALTHY", 0, "REST", 60)


@pytest.mark.parametrize(("principal", "topic_filter", "qos", "granted"), [
    (service("acme"), "$events/organizations/acme/endpoints", 0, 0),
    (service("acme"), "$events/organizations/acme/endpoints", 1, 1),
    (service("acme"), "$events/organizations/acme/endpoints", 2, 1),
    (service("acme"), "$events/organizations/other/endpoints", 1, None),
    (service("acme"), "$events/organizations/+/endpoints", 1, None),
    (service("acme"), "$events/#", 1, None),
    (service("acme"), "$events/organizations/acme/#", 1, None),
    (service("acme"), "$events/organizations/acme/endpoints/x", 1, None),
    (service(None), "$events/organizations/acme/endpoints", 1, None),
    (user("acme"), "$events/organizations/acme/endpoints", 1, None),
])
def test_only_a_service_principal_gets_its_own_organisations_topic(
    principal: Principal, topic_filter: str, qos: int, granted: int | None
) -> None:
    assert lifecycle_grant(principal, topic_filter, qos) == granted


def test_events_reach_only_subscribers_of_their_organisation() -> None:
    feeds = LifecycleFeeds()
    acme, other = FakeLink(), FakeLink()
    assert feeds.subscribe(service("acme"), acme, lifecycle_topic("acme"), 0) == 0
    assert feeds.subscribe(service("other"), other, lifecycle_topic("other"), 0) == 0
    feeds(event("acme"))
    assert [(topic, qos) for topic, _, qos, _, _ in acme.sent] == [("$events/organizations/acme/endpoints", 0)]
    assert orjson.loads(acme.payloads[0])["type"] == "UserEndpointRegisteredEvent"
    assert other.sent == []


def test_a_table_observer_delivers_what_the_table_does() -> None:
    table = EndpointTable(clock=FakeClock())
    feeds = LifecycleFeeds()
    table.observers.append(feeds)
    link = FakeLink()
    feeds.subscribe(service("acme"), link, lifecycle_topic("acme"), 0)
    table.register("alice", "acme", "e1", 60, False)
    table.register("bob", "elsewhere", "e2", 60, False)
    assert [orjson.loads(p)["userEndpointId"] for p in link.payloads] == ["e1"]


def test_unsubscribe_and_the_end_of_the_connection_stop_delivery() -> None:
    feeds = LifecycleFeeds()
    first, second = FakeLink(), FakeLink()
    feeds.subscribe(service("acme"), first, lifecycle_topic("acme"), 0)
    feeds.subscribe(service("acme"), second, lifecycle_topic("acme"), 0)
    feeds.unsubscribe(first, lifecycle_topic("acme"))
    feeds.link_ended(second)
    feeds(event())
    assert first.sent == second.sent == []
    assert feeds.stats.subscribers == 0


def test_qos_1_uses_the_lifecycle_packet_ids_and_a_puback_completes_the_event() -> None:
    feeds = LifecycleFeeds()
    link = FakeLink()
    feeds.subscribe(service("acme"), link, lifecycle_topic("acme"), 1)
    feeds(event())
    (_, _, qos, packet_id, dup), = link.sent
    assert (qos, packet_id, dup) == (1, LIFECYCLE_PACKET_IDS[0], False)
    assert not feeds.acknowledge(link, 1)  # the endpoint's own range: not the feed's
    assert feeds.acknowledge(link, packet_id)
    assert feeds.stats.delivered == 1


def test_an_unacknowledged_event_goes_out_again_with_dup_after_the_ack_timeout() -> None:
    clock = FakeClock()
    feeds = LifecycleFeeds(ack_timeout_seconds=10, clock=clock)
    link = FakeLink()
    feeds.subscribe(service("acme"), link, lifecycle_topic("acme"), 1)
    feeds(event())
    clock.now += 9.9
    feeds.touch(link)
    assert len(link.sent) == 1
    clock.now += 0.1
    feeds.touch(link)
    assert link.sent[1][2:] == (1, link.sent[0][3], True)


def test_a_full_queue_drops_the_oldest_event_with_a_counted_warning(caplog: pytest.LogCaptureFixture) -> None:
    feeds = LifecycleFeeds(max_events=2)
    link = FakeLink()
    feeds.subscribe(service("acme"), link, lifecycle_topic("acme"), 1)
    with caplog.at_level(logging.WARNING, "endpoint_broker.lifecycle"):
        for number in range(4):
            feeds(event(endpoint_id=f"e{number}"))
    assert feeds.stats.dropped == 2
    assert "2 dropped so far" not in caplog.text and "1 dropped so far" in caplog.text  # counted, not flooding
    # The two newest are pending; PUBACKs for the dropped ones change nothing.
    packet_ids = [packet_id for _, _, _, packet_id, _ in link.sent]
    assert packet_ids[:2] == [LIFECYCLE_PACKET_IDS[0], LIFECYCLE_PACKET_IDS[0] + 1]
    assert feeds.acknowledge(link, packet_ids[0]) and feeds.stats.delivered == 0
    assert feeds.acknowledge(link, packet_ids[3]) and feeds.stats.delivered == 1


def test_event_ids_are_distinct_random_uuid4s_across_refills_of_the_pool() -> None:
    ids = [new_event_id() for _ in range(600)]  # more than two pools of 256

    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)


def test_an_events_id_is_drawn_once_and_is_the_same_in_every_copy() -> None:
    made, other = event(), event()
    assert made.drawn_id is None  # not drawn until read: most events are only counted
    assert made.id == made.id == made.to_json()["id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", made.id)
    assert other.id != made.id
