"""The table's journal and restore, and idempotency keys (unit tests, on a fake clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from endpoint_core.endpoint import DisconnectReason, EndpointState, RemovalReason
from endpoint_core.errors import Conflict, InvalidInput, Unavailable, Unprocessable
from endpoint_core.idempotency import IdempotencyKeys, KeyState, body_digest, require_key
from endpoint_core.journal import (
    Change,
    DeleteEndpoint,
    DeleteEvent,
    EndpointRecord,
    PutEndpoint,
    PutEvent,
    PutIdempotency,
    Snapshot,
    StoredEvent,
    StoreStats,
    StoreUnavailable,
)
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable, TablePolicy
from tests.test_table import Clock, FakeLink, advance


@dataclass
class RecordingJournal:
    """Keeps what the table journals, in order (it stands in for the disk, not for our code)."""

    changes: list[Change] = field(default_factory=list)

    def append(self, changes: Sequence[Change]) -> None:
        self.changes.extend(changes)

    def take(self) -> list[Change]:
        taken, self.changes = self.changes, []
        return taken


@pytest.fixture
def clock() -> Clock:
    return Clock()


def snapshot_of(journal: RecordingJournal) -> Snapshot:
    """What a store would hold after applying the journal."""
    endpoints: dict[str, EndpointRecord] = {}
    events: dict[str, dict[int, StoredEvent]] = {}
    for change in journal.changes:
        if isinstance(change, PutEndpoint):
            endpoints[change.record.id] = change.record
        elif isinstance(change, DeleteEndpoint):
            endpoints.pop(change.endpoint_id, None)
            events.pop(change.endpoint_id, None)
        elif isinstance(change, PutEvent):
            events.setdefault(change.event.endpoint_id, {})[change.event.seq] = change.event
        elif isinstance(change, DeleteEvent):
            events.get(change.endpoint_id, {}).pop(change.seq, None)
    return Snapshot(list(endpoints.values()),
                    {key: [byseq[s] for s in sorted(byseq)] for key, byseq in events.items() if byseq})


def test_every_transition_that_a_restart_needs_is_journalled(clock: Clock) -> None:
    journal = RecordingJournal()
    table = EndpointTable(TablePolicy(), clock, journal)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    assert journal.take() == [PutEndpoint(EndpointRecord("e1", "u", "o", 10, False, "rest", 0, False))]
    table.keepalive(endpoint)
    assert journal.take() == []  # keepalives are never written
    advance(table, clock, 10.1)
    assert [c.record.version for c in journal.take() if isinstance(c, PutEndpoint)] == [1]  # SICK
    table.keepalive(endpoint)
    assert [c.record.version for c in journal.take() if isinstance(c, PutEndpoint)] == [2]  # HEALTHY again
    table.deliver([endpoint], b"{}", 1)
    (put,) = journal.take()
    assert isinstance(put, PutEvent) and put.event.endpoint_id == "e1" and put.event.payload == b"{}"
    link = FakeLink()
    table.connect("u", "o", "e1", 10, link, True)
    table.subscribe(endpoint, link, "users/endpoints/e1", 1)
    records = [c.record for c in journal.take() if isinstance(c, PutEndpoint)]
    assert records[-1].persistent_session and records[-1].subscriptions == (("users/endpoints/e1", 1),)
    table.flush(endpoint, link)
    table.acknowledge(endpoint, link, link.sent[0][3])  # type: ignore[arg-type]
    assert journal.take() == [DeleteEvent("e1", put.event.seq)]
    table.remove(endpoint, RemovalReason.UNREGISTERED)
    assert journal.take() == [DeleteEndpoint("e1")]


def test_a_qos0_only_subscription_completes_the_event_and_journals_its_removal(clock: Clock) -> None:
    journal = RecordingJournal()
    table = EndpointTable(TablePolicy(), clock, journal)
    endpoint, _ = table.connect("u", "o", "e1", 10, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1", 0)
    journal.take()
    table.deliver([endpoint], b"{}", 1)
    put, delete = journal.take()
    assert isinstance(put, PutEvent) and delete == DeleteEvent("e1", put.event.seq)


@dataclass
class DiscardingJournal(RecordingJournal):
    """A journal that says it keeps nothing, as the memory store does."""

    discards_changes: bool = True


def test_a_journal_that_discards_changes_gets_no_event_records_but_still_endpoint_ones(clock: Clock) -> None:
    journal = DiscardingJournal()
    table = EndpointTable(TablePolicy(), clock, journal)
    endpoint, _ = table.connect("u", "o", "e1", 10, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1", 1)
    assert any(isinstance(c, PutEndpoint) for c in journal.take())
    assert table.deliver([endpoint], b"{}", 1).delivered == 1
    table.acknowledge(endpoint, link, link.sent[0][3])  # type: ignore[arg-type]
    assert journal.take() == []  # neither the event's put nor its delete was made
    assert table.deliver([endpoint], b"{}", 1).delivered == 1  # delivery itself is unchanged
    assert len(link.sent) == 2


def test_a_journal_given_after_the_table_is_made_gets_event_records(clock: Clock) -> None:
    """A cluster node's store is made after its table (journal_to): its events must be journalled."""
    journal = RecordingJournal()
    table = EndpointTable(TablePolicy(), clock)
    table.journal_to(journal)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    journal.take()
    table.deliver([endpoint], b"{}", 1)
    assert [type(change) for change in journal.take()] == [PutEvent]


def test_restore_brings_endpoints_back_unknown_with_their_version_up_and_events_in_order(clock: Clock) -> None:
    journal = RecordingJournal()
    before = EndpointTable(TablePolicy(), clock, journal)
    rest, _ = before.register("u", "o", "rest", 10, True)
    mqtt, _ = before.connect("u", "o", "mqtt", 20, link := FakeLink(), True)
    before.subscribe(mqtt, link, "users/endpoints/mqtt", 1)
    before.deliver([rest], b'{"n":1}', 1)
    before.deliver([rest], b'{"n":2}', 1)
    snapshot = snapshot_of(journal)

    clock.now += 1000
    restored_journal = RecordingJournal()
    after = EndpointTable(TablePolicy(), clock, restored_journal)
    after.restore(snapshot)
    again = after.get("rest")
    assert again is not None and again.state is EndpointState.UNKNOWN and again.version == rest.version + 1
    assert again.server_keep_alive_reminder_on and again.keep_alive_seconds == 10
    session = after.get("mqtt")
    assert session is not None and session.subscriptions == {"users/endpoints/mqtt": 1}
    # The version bump is journalled, so versions never go backwards over a second restart.
    assert {c.record.id: c.record.version for c in restored_journal.take() if isinstance(c, PutEndpoint)} \
        == {"rest": rest.version + 1, "mqtt": mqtt.version + 1}
    # Its queued events come back in order, with DUP: they may have been sent before.
    after.connect("u", "o", "rest", 10, new := FakeLink(), False)
    after.subscribe(again, new, "users/endpoints/rest", 1)
    after.flush(again, new)
    assert [(payload, dup) for _, payload, _, _, dup in new.sent] == [(b'{"n":1}', True), (b'{"n":2}', True)]
    # Its first keepalive makes it HEALTHY; new events number after the restored ones.
    assert again.state is EndpointState.HEALTHY
    after.deliver([again], b'{"n":3}', 1)
    (put,) = [c for c in restored_journal.take() if isinstance(c, PutEvent)]
    assert put.event.seq > max(e.seq for e in snapshot.events["rest"])


def test_a_restored_endpoint_without_keepalive_turns_sick_then_expires_on_schedule(clock: Clock) -> None:
    record = EndpointRecord("e1", "u", "o", 10, False, "rest", 4, False)
    table = EndpointTable(TablePolicy(), clock)
    table.restore(Snapshot([record]))
    endpoint = table.get("e1")
    assert endpoint is not None
    advance(table, clock, 9.9)
    assert endpoint.state is EndpointState.UNKNOWN
    advance(table, clock, 0.2)
    assert endpoint.state is EndpointState.SICK and endpoint.version == 6
    advance(table, clock, 5.0)
    assert table.get("e1") is None


def test_a_dropped_non_persistent_session_journals_nothing_but_a_stored_session_forgotten_is(clock: Clock) -> None:
    journal = RecordingJournal()
    table = EndpointTable(TablePolicy(), clock, journal)
    endpoint, _ = table.connect("u", "o", "e1", 10, link := FakeLink(), True)
    table.subscribe(endpoint, link, "users/endpoints/e1", 1)
    table.disconnect(endpoint, link, DisconnectReason.DROPPED)
    journal.take()
    table.connect("u", "o", "e1", 10, FakeLink(), False)  # clean_session=1: the stored session ends
    (put,) = [c for c in journal.take() if isinstance(c, PutEndpoint)]
    assert put.record.subscriptions == () and not put.record.persistent_session


# ------------------------------------------------------------------ idempotency


def test_idempotency_keys_follow_their_life_cycle(clock: Clock) -> None:
    keys = IdempotencyKeys(300, clock)
    digest = body_digest({"a": 1, "b": 2})
    assert digest == body_digest({"b": 2, "a": 1})
    assert keys.begin("s", "k", digest) is None
    with pytest.raises(Conflict):  # still in flight
        keys.begin("s", "k", digest)
    record = keys.record("s", "k", 200, 3)
    assert (record.status, record.count, record.expires_at) == (200, 3, clock.now + 300)
    keys.settle("s", "k", committed=False)
    prior = keys.begin("s", "k", digest)
    assert prior is not None and prior.state is KeyState.UNCOMMITTED and prior.count == 3
    keys.settle("s", "k", committed=True)
    with pytest.raises(Unprocessable):
        keys.begin("s", "k", body_digest({"a": 2}))
    assert keys.begin("other scope", "k", digest) is None  # keys belong to one principal
    clock.now += 300.1
    assert keys.begin("s", "k", digest) is None  # expired
    keys.forget("s", "k")
    assert keys.begin("s", "k", digest) is None


def test_restored_keys_keep_their_own_expiry(clock: Clock) -> None:
    keys, digest = IdempotencyKeys(300, clock), body_digest({})
    assert keys.begin("s", "k", digest) is None
    record = keys.record("s", "k", 200, 1)
    clock.now += 200  # the restart
    restored = IdempotencyKeys(300, clock)
    restored.restore([record])
    prior = restored.begin("s", "k", digest)
    assert prior is not None and prior.state is KeyState.DONE and prior.count == 1
    clock.now += 100.1
    assert restored.begin("s", "k", digest) is None


@pytest.mark.parametrize("key", ["", "x" * 129, "has space", "tab\t", "é"])
def test_keys_are_bounded_and_printable(key: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        require_key(key, "Idempotency-Key")
    assert refused.value.field == "Idempotency-Key"


class FailingStore:
    """A store whose commits fail until `healthy` (it stands in for a full disk)."""

    def __init__(self) -> None:
        self.appended: list[Change] = []
        self.healthy = False
        self.stats = StoreStats()

    def append(self, changes: Sequence[Change]) -> None:
        self.appended.extend(changes)

    def committed(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.healthy:
            future.set_result(None)
        else:
            future.set_exception(StoreUnavailable("disk full"))
        return future


async def test_a_retry_after_a_failed_commit_delivers_nothing_again_and_answers_once_stored(clock: Clock) -> None:
    store = FailingStore()
    table = EndpointTable(TablePolicy(), clock, store)
    service = EndpointService(table, verifier=None, store=store)  # type: ignore[arg-type]
    principal = Principal("u", "o", False, 2e9)
    endpoint, _ = table.connect("u", "o", "e1", 60, link := FakeLink(), False)
    table.subscribe(endpoint, link, "users/endpoints/e1", 1)
    body = {"userId": "u", "qos": 1, "event": {"type": "CallCreatedEvent", "timestamp": "2026-01-01T00:00:00Z"}}
    with pytest.raises(Unavailable):
        await service.send_event_durably(principal, body, "key-1")
    assert len(link.sent) == 1 and any(isinstance(c, PutIdempotency) for c in store.appended)
    with pytest.raises(Unavailable):  # still not stored: still no answer
        await service.send_event_durably(principal, body, "key-1")
    store.healthy = True
    assert await service.send_event_durably(principal, body, "key-1") == 1
    assert len(link.sent) == 1  # delivered once


# ------------------------------------------------------------------ lifecycle events


def test_every_transition_produces_its_lifecycle_event_in_order(clock: Clock) -> None:
    table = EndpointTable(TablePolicy(), clock)
    seen: list[LifecycleEvent] = []
    table.observers.append(seen.append)
    endpoint, _ = table.register("u", "o", "e1", 2, False)
    table.register("u", "o", "e1", 2, False)  # nothing changed: no event
    table.register("u", "o", "e1", 3, False)
    old, new = FakeLink(), FakeLink(transport_name="websocket")
    table.connect("u", "o", "e1", 3, old, False)
    table.connect("u", "o", "e1", 3, new, False)
    table.disconnect(endpoint, old, DisconnectReason.DROPPED)  # late: the old link is no longer attached
    table.disconnect(endpoint, new, DisconnectReason.DROPPED)
    advance(table, clock, 3.1)
    table.keepalive(endpoint)
    advance(table, clock, 5.0)
    assert [(e.type, e.previous_state, e.reason, e.transport, e.state) for e in seen] == [
        (LifecycleType.REGISTERED, None, None, None, "HEALTHY"),
        (LifecycleType.REGISTERED, None, None, None, "HEALTHY"),
        (LifecycleType.CONNECTED, None, None, "tcp", "HEALTHY"),
        (LifecycleType.DISCONNECTED, None, "taken over", None, "HEALTHY"),
        (LifecycleType.CONNECTED, None, None, "websocket", "HEALTHY"),
        (LifecycleType.DISCONNECTED, None, "dropped", None, "HEALTHY"),
        (LifecycleType.STATE_CHANGED, "HEALTHY", None, None, "SICK"),
        (LifecycleType.STATE_CHANGED, "SICK", None, None, "HEALTHY"),
        (LifecycleType.STATE_CHANGED, "HEALTHY", None, None, "SICK"),
        (LifecycleType.UNREGISTERED, None, "expired", None, "SICK"),
    ]
    body = seen[0].to_json()
    assert body["type"] == "UserEndpointRegisteredEvent" and body["origin"] == "REST"
    assert (body["userId"], body["userEndpointId"], body["organizationId"]) == ("u", "e1", "o")
    assert body["timestamp"].endswith("Z") and len(body["id"]) == 36 and body["keepAliveSeconds"] == 2
    assert len({e.id for e in seen}) == len(seen)


def test_an_unregister_of_a_connected_endpoint_says_disconnected_then_unregistered(clock: Clock) -> None:
    table = EndpointTable(TablePolicy(), clock)
    seen: list[LifecycleEvent] = []
    table.observers.append(seen.append)
    endpoint, _ = table.connect("u", "o", "e1", 30, FakeLink(), False)
    table.remove(endpoint, RemovalReason.UNREGISTERED)
    assert [(e.type, e.reason) for e in seen] == [
        (LifecycleType.REGISTERED, None), (LifecycleType.CONNECTED, None),
        (LifecycleType.DISCONNECTED, "unregistered"), (LifecycleType.UNREGISTERED, "unregistered"),
    ]
    assert seen[0].origin == "MQTT"


def test_a_failing_observer_does_not_stop_the_transition(clock: Clock) -> None:
    table = EndpointTable(TablePolicy(), clock)

    def broken(event: LifecycleEvent) -> None:
        raise RuntimeError("observer bug")

    table.observers.append(broken)
    endpoint, _ = table.register("u", "o", "e1", 10, False)
    assert table.get("e1") is endpoint


@dataclass
class AppendRecorder:
    """Keeps each append call apart: one call reaches the store whole, so it commits whole."""

    calls: list[list[Change]] = field(default_factory=list)

    def append(self, changes: Sequence[Change]) -> None:
        self.calls.append(list(changes))


async def test_the_events_and_their_idempotency_key_reach_the_store_in_one_append(clock: Clock) -> None:
    journal = AppendRecorder()
    table = EndpointTable(TablePolicy(), clock, journal)
    service = EndpointService(table, verifier=None)  # type: ignore[arg-type]
    for endpoint_id in ("e1", "e2"):
        table.register("u", "o", endpoint_id, 60, False)
    journal.calls.clear()
    body = {"userId": "u", "qos": 1, "event": {"type": "CallCreatedEvent", "timestamp": "2026-01-01T00:00:00Z"}}
    assert await service.send_event_durably(Principal("u", "o", False, 2e9), body, "key-1") == 2
    (call,) = journal.calls
    assert [type(change) for change in call] == [PutEvent, PutEvent, PutIdempotency]


async def test_a_keyed_body_nested_too_deeply_to_digest_is_a_400(clock: Clock) -> None:
    service = EndpointService(EndpointTable(TablePolicy(), clock), verifier=None)  # type: ignore[arg-type]
    nested: object = "x"
    for _ in range(300):
        nested = [nested]
    body = {"userId": "u", "event": {"type": "CallCreatedEvent", "timestamp": "2026-01-01T00:00:00Z", "n": nested}}
    with pytest.raises(InvalidInput) as refused:
        await service.send_event_durably(Principal("u", "o", False, 2e9), body, "key-1")
    assert refused.value.field == "body"
