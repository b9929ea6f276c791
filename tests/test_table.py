"""The endpoint table's invariants, on a controlled clock (unit tests of the core)."""

from __future__ import annotations

import json

import pytest

from endpoint_core.endpoint import DisconnectReason, EndpointState, Origin, RemovalReason
from endpoint_core.errors import Conflict, Forbidden, InvalidInput
from endpoint_core.table import EndpointTable, TablePolicy
from tests.fakes import FakeClock as Clock
from tests.fakes import FakeLink


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_table(clock: Clock, **policy: object) -> EndpointTable:
    return EndpointTable(TablePolicy(**policy), clock=clock)  # type: ignore[arg-type]


def advance(table: EndpointTable, clock: Clock, seconds: float) -> None:
    """Move time forward in small steps, running timers as a real loop would."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(end, clock.now + 0.05)
        table.advance()


def test_healthy_then_sick_then_gone(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, created = table.register("u", "o", "e1", 10, False)
    assert created and endpoint.state is EndpointState.HEALTHY
    advance(table, clock, 9.9)
    assert endpoint.state is EndpointState.HEALTHY
    advance(table, clock, 0.2)
    assert endpoint.state is EndpointState.SICK and endpoint.version == 1
    advance(table, clock, 4.8)
    assert table.get("e1") is endpoint
    advance(table, clock, 0.3)
    assert table.get("e1") is None and endpoint.removed


def test_grace_is_at_least_the_minimum(clock: Clock) -> None:
    table = make_table(clock, min_expiry_grace_seconds=1.0)
    table.register("u", "o", "e1", 1, False)
    advance(table, clock, 1.9)
    assert table.get("e1") is not None
    advance(table, clock, 0.2)
    assert table.get("e1") is None


def test_a_keepalive_revives_a_sick_endpoint_and_moves_the_deadline(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    advance(table, clock, 12)
    assert endpoint.state is EndpointState.SICK
    table.keepalive(endpoint)
    assert endpoint.state is EndpointState.HEALTHY and endpoint.version == 2
    advance(table, clock, 9.9)
    assert endpoint.state is EndpointState.HEALTHY
    advance(table, clock, 15.2)
    assert endpoint.removed


def test_keepalives_do_not_touch_the_timer_heap(clock: Clock) -> None:
    table = make_table(clock)
    endpoints = [table.register("u", "o", f"e{i}", 30, False)[0] for i in range(100)]
    heap_size = len(table._heap)
    for _ in range(50):
        clock.now += 0.1
        for endpoint in endpoints:
            table.keepalive(endpoint)
    assert len(table._heap) == heap_size
    advance(table, clock, 60)
    assert len(table) == 0 and table.next_deadline() is None


def test_reregistering_with_a_shorter_keepalive_expires_sooner(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 3600, False)
    _, created = table.register("u", "o", "e1", 2, True)
    assert not created and endpoint.version == 1 and endpoint.keep_alive_seconds == 2
    advance(table, clock, 3.1)
    assert endpoint.removed


def test_ownership(clock: Clock) -> None:
    table = make_table(clock)
    table.register("u", "o", "e1", 30, False)
    with pytest.raises(Conflict):
        table.register("v", "o", "e1", 30, False)
    with pytest.raises(Conflict):
        table.register("u", "other", "e1", 30, False)
    with pytest.raises(Conflict):
        table.connect("v", "o", "e1", 30, FakeLink(), False)
    with pytest.raises(Forbidden):
        table.register("u", None, "e2", 30, False)
    with pytest.raises(InvalidInput):
        table.register("u", "o", "e3", 0, False)


def test_connect_registers_with_the_mqtt_keep_alive_or_the_default(clock: Clock) -> None:
    table = make_table(clock, default_mqtt_keep_alive_seconds=45, max_keep_alive_seconds=100)
    assert table.connect("u", "o", "a", 20, FakeLink(), False)[0].keep_alive_seconds == 20
    assert table.connect("u", "o", "b", 0, FakeLink(), False)[0].keep_alive_seconds == 45
    assert table.connect("u", "o", "c", 500, FakeLink(), False)[0].keep_alive_seconds == 100
    assert table.get("a").origin is Origin.MQTT  # type: ignore[union-attr]


def test_attaching_keeps_rest_settings(clock: Clock) -> None:
    table = make_table(clock)
    table.register("u", "o", "e1", 300, True)
    endpoint, _ = table.connect("u", "o", "e1", 20, FakeLink(), False)
    assert (endpoint.keep_alive_seconds, endpoint.server_keep_alive_reminder_on, endpoint.origin) == (
        300, True, Origin.REST)


def test_take_over_closes_the_old_link_and_the_old_link_cannot_detach_the_new(clock: Clock) -> None:
    table = make_table(clock)
    old, new = FakeLink(), FakeLink()
    endpoint, _ = table.connect("u", "o", "e1", 30, old, False)
    table.connect("u", "o", "e1", 30, new, False)
    assert old.closed and not new.closed and endpoint.link is new
    table.disconnect(endpoint, old, DisconnectReason.CLEAN)  # the old socket's late disconnect
    assert endpoint.link is new and not endpoint.removed
    assert not table.subscribe(endpoint, old, "users/endpoints/e1")
    assert table.subscribe(endpoint, new, "users/endpoints/e1")


def test_disconnect_rules(clock: Clock) -> None:
    table = make_table(clock)
    mqtt_made, _ = table.connect("u", "o", "m", 30, link := FakeLink(), False)
    table.disconnect(mqtt_made, link, DisconnectReason.CLEAN)
    assert mqtt_made.removed
    dropped, _ = table.connect("u", "o", "d", 30, link := FakeLink(), False)
    table.disconnect(dropped, link, DisconnectReason.DROPPED)
    assert not dropped.removed and dropped.link is None
    rest_made, _ = table.register("u", "o", "r", 30, False)
    table.connect("u", "o", "r", 30, link := FakeLink(), False)
    table.disconnect(rest_made, link, DisconnectReason.CLEAN)
    assert not rest_made.removed


def test_subscriptions_only_to_own_topics(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.connect("u", "o", "e1", 30, link := FakeLink(), False)
    assert table.subscribe(endpoint, link, "users/endpoints/e1")
    assert table.subscribe(endpoint, link, "user/u/e1")
    for refused in ("users/endpoints/e2", "users/endpoints/+", "#", "user/v/e1", "$SYS/#", "users/endpoints/e1/#"):
        assert not table.subscribe(endpoint, link, refused)


def test_qos1_outbox_is_bounded_ordered_and_acknowledged(clock: Clock) -> None:
    table = make_table(clock, queue_max_events=2, queue_max_bytes=1000)
    endpoint, _ = table.register("u", "o", "e1", 300, False)
    report = table.deliver([endpoint], b"1", 1)
    assert report.delivered == 1
    table.deliver([endpoint], b"2", 1)
    full = table.deliver([endpoint], b"3", 1)
    assert full.delivered == 0 and full.full == ["e1"]
    table.connect("u", "o", "e1", 30, link := FakeLink(), False)
    assert link.sent == []  # nothing until it subscribes
    table.subscribe(endpoint, link, "users/endpoints/e1")
    table.flush(endpoint, link)
    assert [(payload, qos, dup) for _, payload, qos, _, dup in link.sent] == [(b"1", 1, False), (b"2", 1, False)]
    table.acknowledge(endpoint, link, link.sent[0][3])  # type: ignore[arg-type]
    assert endpoint.outbox is not None and len(endpoint.outbox) == 1
    assert table.deliver([endpoint], b"3", 1).delivered == 1


def test_queue_byte_bound(clock: Clock) -> None:
    table = make_table(clock, queue_max_bytes=10)
    endpoint, _ = table.register("u", "o", "e1", 300, False)
    assert table.deliver([endpoint], b"x" * 8, 1).delivered == 1
    assert table.deliver([endpoint], b"x" * 3, 1).full == ["e1"]


def test_unacknowledged_events_are_resent_with_dup_after_the_timeout_and_on_reconnect(clock: Clock) -> None:
    table = make_table(clock, ack_timeout_seconds=5)
    endpoint, _ = table.connect("u", "o", "e1", 300, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1")
    table.deliver([endpoint], b"event", 1)
    first_id = link.sent[0][3]
    advance(table, clock, 5.2)
    sent = [(p, dup, pid) for _, p, _, pid, dup in link.sent]
    assert sent == [(b"event", False, first_id), (b"event", True, first_id)]
    table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    table.connect("u", "o", "e1", 300, again := FakeLink(), False)
    table.subscribe(endpoint, again, "users/endpoints/e1")
    table.flush(endpoint, again)
    assert [(p, dup) for _, p, _, _, dup in again.sent] == [(b"event", True)]
    table.acknowledge(endpoint, again, again.sent[0][3])  # type: ignore[arg-type]
    advance(table, clock, 10)
    assert len(again.sent) == 1


def test_qos0_counts_only_live_subscriptions(clock: Clock) -> None:
    table = make_table(clock)
    offline, _ = table.register("u", "o", "off", 300, False)
    unsubscribed, _ = table.connect("u", "o", "unsub", 300, FakeLink(), False)
    live, _ = table.connect("u", "o", "live", 300, link := FakeLink(), False)
    table.subscribe(live, link, "user/u/live")
    report = table.deliver([offline, unsubscribed, live], b"e", 0)
    assert report.delivered == 1 and link.sent == [("user/u/live", b"e", 0, None, False)]


def test_reminder_once_per_period_at_two_thirds(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 30, True)
    table.connect("u", "o", "e1", 30, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1")
    advance(table, clock, 19.9)
    assert link.sent == []
    advance(table, clock, 0.2)
    assert len(link.sent) == 1
    topic, payload, qos, _, _ = link.sent[0]
    reminder = json.loads(payload)
    assert (topic, qos, reminder["type"], reminder["userEndpointId"], reminder["userId"]) == (
        "users/endpoints/e1", 0, "UserEndpointKeepAliveRequestedEvent", "e1", "u")
    assert reminder["timestamp"].endswith("Z") and reminder["expiresAt"].endswith("Z") and reminder["id"]
    advance(table, clock, 9)
    assert len(link.sent) == 1
    table.keepalive(endpoint)
    advance(table, clock, 20.1)
    assert len(link.sent) == 2


def test_removal_closes_the_link_and_drops_the_queue(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.connect("u", "o", "e1", 30, link := FakeLink(), False)
    table.deliver([endpoint], b"pending", 1)
    table.remove(endpoint, RemovalReason.UNREGISTERED)
    assert link.closed == [DisconnectReason.UNREGISTERED] and endpoint.outbox is None and table.get("e1") is None
    assert table.endpoints_of("o", "u") == []
    assert table.deliver([endpoint], b"late", 1).delivered == 0


def test_a_new_event_for_a_slow_consumer_sends_only_itself(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.connect("u", "o", "e1", 300, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1")
    for n in range(500):
        table.deliver([endpoint], str(n).encode(), 1)
    assert len(link.sent) == 500  # all in flight, none acknowledged
    table.acknowledge(endpoint, link, link.sent[100][3])  # type: ignore[arg-type]
    table.deliver([endpoint], b"late", 1)
    assert [payload for _, payload, _, _, _ in link.sent[500:]] == [b"late"]
    table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    table.connect("u", "o", "e1", 300, again := FakeLink(), False)
    table.subscribe(endpoint, again, "users/endpoints/e1")
    table.flush(endpoint, again)
    resent = [payload for _, payload, _, _, _ in again.sent]
    assert resent == [str(n).encode() for n in range(500) if n != 100] + [b"late"]
    assert all(dup for *_, dup in again.sent)


def test_the_timer_heap_stays_bounded_with_long_keepalives_and_redelivery_timers(clock: Clock) -> None:
    table = make_table(clock, ack_timeout_seconds=1)
    endpoints = []
    for i in range(100):
        endpoint, _ = table.connect("u", "o", f"e{i}", 86_400, link := FakeLink(), False)
        table.subscribe(endpoint, link, f"users/endpoints/e{i}")
        endpoints.append(endpoint)
    for _ in range(50):  # each round: an event for everyone, then its redelivery timer fires
        table.deliver(endpoints, b"event", 1)
        for endpoint in endpoints:
            for packet_id in list(endpoint.outbox._by_packet):  # type: ignore[union-attr]
                table.acknowledge(endpoint, endpoint.link, packet_id)  # type: ignore[arg-type]
        advance(table, clock, 1.1)
        assert len(table._heap) <= 2 * len(table) + 64
    assert all(not e.removed and e.state is EndpointState.HEALTHY for e in endpoints)


def test_a_qos0_subscription_gets_qos1_events_at_qos0_and_nothing_waits_for_it(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.connect("u", "o", "e1", 300, link := FakeLink(), False)
    assert table.subscribe(endpoint, link, "users/endpoints/e1", 0) == 0
    assert table.deliver([endpoint], b"event", 1).delivered == 1
    assert link.sent == [("users/endpoints/e1", b"event", 0, None, False)]
    assert endpoint.outbox is not None and len(endpoint.outbox) == 0
    # Subscribing again replaces the subscription and its QoS; both forms then get their own QoS.
    assert table.subscribe(endpoint, link, "users/endpoints/e1", 2) == 1
    assert table.subscribe(endpoint, link, "user/u/e1", 0) == 0
    table.deliver([endpoint], b"next", 1)
    assert [(topic, qos) for topic, _, qos, _, _ in link.sent[1:]] == [("users/endpoints/e1", 1), ("user/u/e1", 0)]
    assert len(endpoint.outbox) == 1  # waiting for the one QoS 1 copy


# ------------------------------------------------ links never re-enter the table


def test_a_link_detaches_after_close_returns_and_a_late_detach_changes_nothing(clock: Clock) -> None:
    table = make_table(clock)
    old, new = FakeLink(), FakeLink()
    endpoint, _ = table.connect("u", "o", "e1", 30, old, True)
    table.subscribe(endpoint, old, "users/endpoints/e1")
    table.connect("u", "o", "e1", 30, new, True)
    assert old.closed == [DisconnectReason.TAKEN_OVER] and endpoint.link is new
    # The old link's connection_lost comes later, and must not touch the new link's state.
    table.disconnect(endpoint, old, DisconnectReason.TAKEN_OVER)
    assert endpoint.link is new and endpoint.link_keep_alive == 30
    table.remove(endpoint, RemovalReason.UNREGISTERED)
    assert new.closed == [DisconnectReason.UNREGISTERED]
    table.disconnect(endpoint, new, DisconnectReason.UNREGISTERED)  # late detach of a removed endpoint
    assert table.get("e1") is None and endpoint.link is None and len(table) == 0


def test_expiry_closes_the_link_with_the_expired_reason(clock: Clock) -> None:
    table = make_table(clock)
    table.connect("u", "o", "e1", 2, link := FakeLink(), False)
    advance(table, clock, 3.1)
    assert table.get("e1") is None and link.closed == [DisconnectReason.EXPIRED]


# ------------------------------------------------ keep-alive at the edges


def test_an_attached_connection_with_a_longer_keep_alive_stretches_the_period(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 2, False)
    table.connect("u", "o", "e1", 10, link := FakeLink(), False)
    advance(table, clock, 9.9)
    assert endpoint.state is EndpointState.HEALTHY and endpoint.keep_alive_seconds == 2  # the view keeps REST's
    advance(table, clock, 0.2)
    assert endpoint.state is EndpointState.SICK
    advance(table, clock, 5.0)  # 1.5 x 10 s: MQTT's own limit
    assert table.get("e1") is None and link.closed == [DisconnectReason.EXPIRED]


def test_a_detached_endpoint_falls_back_to_its_own_period(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 2, False)
    table.connect("u", "o", "e1", 10, link := FakeLink(), False)
    table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    advance(table, clock, 2.1)
    assert endpoint.state is EndpointState.SICK
    advance(table, clock, 1.0)
    assert table.get("e1") is None


def test_keep_alive_zero_never_expires_while_connected_and_counts_from_the_drop(clock: Clock) -> None:
    table = make_table(clock, default_mqtt_keep_alive_seconds=5)
    endpoint, _ = table.connect("u", "o", "e1", 0, link := FakeLink(), False)
    assert endpoint.keep_alive_seconds == 5
    advance(table, clock, 100.0)
    assert endpoint.state is EndpointState.HEALTHY and not link.closed and table.next_deadline() is None
    table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    advance(table, clock, 4.9)
    assert endpoint.state is EndpointState.HEALTHY  # the drop was its last sign of life
    advance(table, clock, 0.2)
    assert endpoint.state is EndpointState.SICK
    advance(table, clock, 2.6)
    assert table.get("e1") is None


def test_a_blocking_unregister_refuses_connects_until_it_lapses_or_rest_registers(clock: Clock) -> None:
    table = make_table(clock, unregister_block_seconds=30)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    table.remove(endpoint, RemovalReason.UNREGISTERED, block=True)
    with pytest.raises(Forbidden):
        table.connect("u", "o", "e1", 10, FakeLink(), False)
    clock.now += 30.1
    table.connect("u", "o", "e1", 10, link := FakeLink(), False)  # the block lapsed
    table.remove(table.get("e1"), RemovalReason.UNREGISTERED, block=True)  # type: ignore[arg-type]
    assert link.closed == [DisconnectReason.UNREGISTERED]
    table.register("u", "o", "e1", 10, False)  # the app itself registers again: the block is lifted
    table.connect("u", "o", "e1", 10, FakeLink(), False)


def test_an_unblocked_unregister_lets_the_client_reconnect(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    table.remove(endpoint, RemovalReason.UNREGISTERED)
    table.connect("u", "o", "e1", 10, FakeLink(), False)


# ------------------------------------------------------------------------------------------------
# Timing rules. The process tests only check that these happen, never how soon (no timed assertions).


def test_client_packets_keep_an_mqtt_endpoint_alive_and_silence_expires_it_and_closes_it(clock: Clock) -> None:
    table = make_table(clock, min_expiry_grace_seconds=1.0)
    pinging, _ = table.connect("u", "o", "ping", 1, ping_link := FakeLink(), False)
    silent, _ = table.connect("u", "o", "silent", 1, silent_link := FakeLink(), False)
    for _ in range(6):  # a PINGREQ every 0.3 s
        advance(table, clock, 0.3)
        table.touch(pinging, ping_link)
    assert silent.state is EndpointState.SICK and not silent.removed  # 1.8 s: past its deadline, within the grace
    advance(table, clock, 0.25)  # 2.05 s: 1 s of keep-alive, then at least 1 s of grace
    assert silent.removed and silent_link.closed == [DisconnectReason.EXPIRED]
    assert pinging.state is EndpointState.HEALTHY and not pinging.removed and ping_link.closed == []


def test_rest_keepalives_keep_an_attached_endpoint_alive_and_their_end_expires_it(clock: Clock) -> None:
    table = make_table(clock)
    endpoint, _ = table.register("u", "o", "e1", 1, False)
    table.connect("u", "o", "e1", 1, link := FakeLink(), False)
    for _ in range(10):  # REST keepalives every 0.3 s, and not a packet from the client
        advance(table, clock, 0.3)
        table.keepalive(endpoint)
    assert endpoint.state is EndpointState.HEALTHY and link.closed == []
    advance(table, clock, 1.9)
    assert not endpoint.removed
    advance(table, clock, 0.15)  # 1 s of keep-alive, then at least 1 s of grace
    assert endpoint.removed and link.closed == [DisconnectReason.EXPIRED]


def test_an_unacknowledged_event_is_resent_once_its_ack_timeout_has_passed_and_not_before(clock: Clock) -> None:
    table = make_table(clock, ack_timeout_seconds=1)
    endpoint, _ = table.connect("u", "o", "e1", 300, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1")
    table.deliver([endpoint], b"first", 1)
    advance(table, clock, 0.4)
    table.deliver([endpoint], b"second", 1)
    advance(table, clock, 0.55)  # 0.95 s after the first
    assert [(payload, dup) for _, payload, _, _, dup in link.sent] == [(b"first", False), (b"second", False)]
    advance(table, clock, 0.1)  # 1.05 s after the first, 0.65 s after the second
    assert [(payload, dup) for _, payload, _, _, dup in link.sent[2:]] == [(b"first", True)]
    advance(table, clock, 0.4)  # 1.05 s after the second
    assert [(payload, dup) for _, payload, _, _, dup in link.sent[3:]] == [(b"second", True)]
    assert [packet_id for *_, packet_id, _ in link.sent[2:]] == [packet_id for *_, packet_id, _ in link.sent[:2]]
    for *_, packet_id, _ in link.sent[2:]:
        assert packet_id is not None
        table.acknowledge(endpoint, link, packet_id)
    advance(table, clock, 10)
    assert len(link.sent) == 4
