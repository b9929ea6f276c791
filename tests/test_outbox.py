"""The per-endpoint QoS 1 outbox: bounds, order, packet ids, acknowledgement, lost links (unit tests of the core)."""

from __future__ import annotations

from endpoint_core.outbox import ENDPOINT_PACKET_IDS, LIFECYCLE_PACKET_IDS, MAX_PACKET_ID, Outbox, PendingEvent

LAST_ENDPOINT_ID = ENDPOINT_PACKET_IDS[1]


def send(outbox: Outbox, now: float = 0.0, topics: tuple[str, ...] = ("t",)) -> tuple[PendingEvent, list[int]]:
    """Send the oldest unsent event once per topic at QoS 1, as the table does; return it and its packet ids."""
    event = outbox.next_unsent()
    assert event is not None
    packet_ids = []
    for topic in topics:
        packet_id = outbox.allocate_packet_id()
        outbox.record_send(event, packet_id, topic)
        packet_ids.append(packet_id)
    outbox.mark_sent(event, now)
    return event, packet_ids


# ------------------------------------------------------------------ bounds


def test_bounded_by_count() -> None:
    outbox = Outbox(max_count=2, max_bytes=1000)
    assert outbox.offer(b"1") is not None
    assert outbox.offer(b"2") is not None
    assert outbox.offer(b"3") is None
    assert len(outbox) == 2


def test_bounded_by_payload_bytes_and_an_exact_fit_is_taken() -> None:
    outbox = Outbox(max_count=100, max_bytes=10)
    assert outbox.offer(b"x" * 8) is not None
    assert outbox.offer(b"x" * 3) is None
    assert outbox.offer(b"x" * 2) is not None  # 10 of 10 bytes
    assert outbox.offer(b"") is not None  # an empty payload takes no room
    assert len(outbox) == 3


def test_an_acknowledged_event_gives_back_its_count_and_bytes() -> None:
    outbox = Outbox(max_count=1, max_bytes=5)
    outbox.offer(b"12345")
    _, (packet_id,) = send(outbox)
    assert outbox.offer(b"6") is None
    assert outbox.acknowledge(packet_id)
    assert len(outbox) == 0
    assert outbox.offer(b"abcde") is not None


def test_a_refused_offer_leaves_the_queue_as_it_was() -> None:
    outbox = Outbox(max_count=10, max_bytes=4)
    first = outbox.offer(b"abc")
    assert outbox.offer(b"de") is None
    assert outbox.next_unsent() is first
    assert outbox.offer(b"d") is not None  # the refused 2 bytes were not counted


# ------------------------------------------------------------------ order


def test_events_are_sent_oldest_first() -> None:
    outbox = Outbox(10, 1000)
    events = [outbox.offer(str(n).encode()) for n in range(3)]
    sent = [send(outbox)[0] for _ in range(3)]
    assert sent == events
    assert outbox.next_unsent() is None
    assert len(outbox) == 3  # sent, not yet acknowledged


def test_an_event_sent_only_at_qos0_leaves_at_once() -> None:
    outbox = Outbox(10, 1000)
    event = outbox.offer(b"e")
    assert event is not None
    outbox.mark_sent(event, 1.0)  # no record_send: every copy went out at QoS 0
    assert len(outbox) == 0 and outbox.next_unsent() is None
    assert outbox.next_retry_at(5.0) is None


def test_sends_are_counted_for_the_dup_flag() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"e")
    event, _ = send(outbox, now=1.0)
    assert event.sends == 1
    outbox.mark_resent(event, 6.0)
    assert (event.sends, event.sent_at) == (2, 6.0)


# ------------------------------------------------------------- packet ids


def test_packet_ids_count_up_from_1() -> None:
    outbox = Outbox(10, 1000)
    assert [outbox.allocate_packet_id() for _ in range(3)] == [1, 2, 3]


def test_packet_ids_wrap_after_65535_and_skip_ids_in_use() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"e")
    _, (held,) = send(outbox)  # id 1 stays unacknowledged
    assert held == 1
    allocated = [outbox.allocate_packet_id() for _ in range(LAST_ENDPOINT_ID - 1)]
    assert allocated[0] == 2 and allocated[-1] == LAST_ENDPOINT_ID
    assert outbox.allocate_packet_id() == 2  # wrapped past 0 (not a valid packet id), and 1 is still in use


def test_an_acknowledged_packet_id_can_be_used_again() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"e")
    _, (packet_id,) = send(outbox)
    outbox.acknowledge(packet_id)
    for _ in range(LAST_ENDPOINT_ID - 1):
        outbox.allocate_packet_id()
    assert outbox.allocate_packet_id() == packet_id


def test_a_lifecycle_outbox_uses_the_other_packet_ids_so_pubacks_never_mix() -> None:
    outbox = Outbox(10, 1000, LIFECYCLE_PACKET_IDS)
    assert outbox.allocate_packet_id() == LIFECYCLE_PACKET_IDS[0] == LAST_ENDPOINT_ID + 1
    for _ in range(MAX_PACKET_ID - LIFECYCLE_PACKET_IDS[0]):
        last = outbox.allocate_packet_id()
    assert last == MAX_PACKET_ID
    assert outbox.allocate_packet_id() == LIFECYCLE_PACKET_IDS[0]
    assert outbox.owns_packet_id(MAX_PACKET_ID) and not outbox.owns_packet_id(LAST_ENDPOINT_ID)


def test_drop_oldest_removes_a_sent_event_and_forgets_its_packet_ids() -> None:
    outbox = Outbox(2, 1000)
    outbox.offer(b"first")
    outbox.offer(b"second")
    first, (packet_id,) = send(outbox)
    dropped = outbox.drop_oldest()
    assert dropped is first and len(outbox) == 1
    assert outbox.acknowledge(packet_id) is None  # a late PUBACK for it changes nothing
    assert outbox.offer(b"third") is not None
    assert [outbox.next_unsent().payload for _ in range(1)] == [b"second"]  # type: ignore[union-attr]


def test_drop_oldest_of_an_unsent_event_keeps_the_send_order() -> None:
    outbox = Outbox(2, 1000)
    outbox.offer(b"first")
    outbox.offer(b"second")
    assert outbox.drop_oldest().payload == b"first"  # type: ignore[union-attr]
    assert outbox.next_unsent().payload == b"second"  # type: ignore[union-attr]
    outbox.drop_oldest()
    assert outbox.drop_oldest() is None and outbox.next_unsent() is None


# --------------------------------------------------------- acknowledgement


def test_an_event_leaves_when_every_copy_is_acknowledged() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"e")
    event, (first, second) = send(outbox, topics=("users/endpoints/e1", "user/u/e1"))
    assert event.unacked == {first: "users/endpoints/e1", second: "user/u/e1"}
    assert not outbox.acknowledge(first)  # one copy still awaits its PUBACK
    assert len(outbox) == 1
    assert outbox.acknowledge(second)
    assert len(outbox) == 0


def test_unknown_and_repeated_acknowledgements_change_nothing() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"a")
    outbox.offer(b"b")
    _, (packet_id,) = send(outbox)
    assert not outbox.acknowledge(999)
    assert outbox.acknowledge(packet_id)
    assert not outbox.acknowledge(packet_id)
    assert len(outbox) == 1


# -------------------------------------------------------------- lost links


def test_a_lost_link_makes_everything_unsent_again_in_order_with_new_packet_ids() -> None:
    outbox = Outbox(10, 1000)
    events = [outbox.offer(str(n).encode()) for n in range(3)]
    _, (old_id,) = send(outbox, now=1.0)
    send(outbox, now=1.0)  # the third is never sent
    outbox.link_lost()
    assert all(e is not None and e.sent_at is None and not e.unacked for e in events)
    assert outbox.next_retry_at(5.0) is None
    assert list(outbox.overdue(100.0, 5.0)) == []
    assert not outbox.acknowledge(old_id)  # a PUBACK for the old link's packet id means nothing now
    assert [send(outbox)[0] for _ in range(3)] == events
    assert events[0] is not None and events[0].sends == 2  # sent before: the next PUBLISH carries DUP


def test_a_lost_link_of_a_persistent_session_keeps_the_packet_ids() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"e")
    event, (packet_id,) = send(outbox, now=1.0)
    outbox.link_lost(keep_packet_ids=True)
    assert event.unacked == {packet_id: "t"} and event.sent_at is None
    assert outbox.next_unsent() is event
    assert outbox.allocate_packet_id() != packet_id  # still reserved for the resend
    assert outbox.acknowledge(packet_id)  # the PUBACK under the original id completes it
    assert len(outbox) == 0


# ------------------------------------------------------------ redelivery


def test_overdue_and_next_retry_at() -> None:
    outbox = Outbox(10, 1000)
    outbox.offer(b"a")
    outbox.offer(b"b")
    outbox.offer(b"c")  # never sent: never overdue
    first, (first_id,) = send(outbox, now=100.0)
    second, _ = send(outbox, now=102.0)
    assert outbox.next_retry_at(5.0) == 105.0
    assert list(outbox.overdue(104.9, 5.0)) == []
    assert list(outbox.overdue(105.0, 5.0)) == [first]
    assert list(outbox.overdue(107.0, 5.0)) == [first, second]
    outbox.mark_resent(first, 105.0)
    assert outbox.next_retry_at(5.0) == 107.0
    outbox.acknowledge(first_id)
    assert list(outbox.overdue(200.0, 5.0)) == [second]


def test_nothing_in_flight_means_no_retry() -> None:
    outbox = Outbox(10, 1000)
    assert outbox.next_retry_at(5.0) is None
    outbox.offer(b"queued")  # queued for an offline endpoint, not sent
    assert outbox.next_retry_at(5.0) is None
    assert list(outbox.overdue(1e9, 5.0)) == []
