"""The journal's stores: SqliteStore on a real file in tmp_path, and MemoryStore.

No timing is asserted: group commit is checked through the stats, background work by
polling with generous bounds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from endpoint_core.journal import (
    Change,
    DeleteEndpoint,
    DeleteEvent,
    DeleteWebhookEvent,
    EndpointRecord,
    IdempotencyRecord,
    PutEndpoint,
    PutEvent,
    PutIdempotency,
    PutWebhookEvent,
    StoredEvent,
    StoreStats,
    StoreUnavailable,
)
from store import DATABASE_FILE, SCHEMA_VERSION, MemoryStore, SqliteStore, StoreFileError, StoreVersionError
from store.schema import MIGRATIONS, migrate, schema_version
from store.sqlite import create_private_file, net_changes, open_database

POLL_TIMEOUT = 20.0  # generous: the machine is shared


async def eventually(predicate: Callable[[], Any], within: float = POLL_TIMEOUT) -> None:
    """Poll `predicate` on the loop (so that the store's reports keep arriving) until it holds."""
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


def endpoint(endpoint_id: str, version: int = 1, **changes: Any) -> EndpointRecord:
    fields: dict[str, Any] = {
        "id": endpoint_id, "user_id": "user-1", "organization_id": "org-1", "keep_alive_seconds": 60,
        "reminder_on": True, "origin": "rest", "version": version, "persistent_session": False,
    }
    return EndpointRecord(**(fields | changes))


def event(endpoint_id: str, seq: int, payload: bytes | None = None) -> PutEvent:
    return PutEvent(StoredEvent(endpoint_id, seq, payload if payload is not None else f"{endpoint_id}#{seq}".encode()))


def wal_bytes(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


def raw_rows(path: Path, sql: str) -> list[Any]:
    """What is in the file, read on a connection of the test's own."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / DATABASE_FILE


@pytest.fixture
async def open_store() -> AsyncIterator[Callable[..., SqliteStore]]:
    """Open (and start) SqliteStores; each is closed at the end of the test."""
    opened: list[SqliteStore] = []

    def factory(path: Path, *args: Any, start: bool = True, **options: Any) -> SqliteStore:
        store = SqliteStore(path, *args, **options)
        opened.append(store)
        if start:
            store.start(asyncio.get_running_loop())
        return store

    yield factory
    for store in opened:
        await store.close()


async def commit(store: SqliteStore, changes: list[Change]) -> None:
    store.append(changes)
    await store.committed()


async def reopened(path: Path, store: SqliteStore, **options: Any) -> Any:
    """Close `store`, open the file again, and load it."""
    await store.close()
    again = SqliteStore(path, **options)
    try:
        return again.load()
    finally:
        await again.close()


# ------------------------------------------------------------------ round trips

async def test_every_change_type_survives_a_reopen(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    mqtt = endpoint("mqtt-1", origin="mqtt", persistent_session=True, reminder_on=False,
                    subscriptions=(("a/b", 1), ("c/#", 0)), organization_id="org-2", keep_alive_seconds=300)
    key = IdempotencyRecord("user-1", "key-1", "ab" * 32, 200, 3, expires_at=4_000_000_000.0)
    await commit(store, [
        PutEndpoint(endpoint("rest-1")), PutEndpoint(mqtt),
        event("mqtt-1", 1, b"\x00\xffbinary"), event("mqtt-1", 2), event("mqtt-1", 3),
        PutIdempotency(key),
    ])
    await commit(store, [
        PutEndpoint(endpoint("rest-1", version=2, keep_alive_seconds=30)),  # an upsert, not a second row
        DeleteEvent("mqtt-1", 2),
    ])

    snapshot = await reopened(path, store)

    assert snapshot.endpoints == [endpoint("rest-1", version=2, keep_alive_seconds=30), mqtt]
    assert snapshot.events == {"mqtt-1": [StoredEvent("mqtt-1", 1, b"\x00\xffbinary"),
                                          StoredEvent("mqtt-1", 3, b"mqtt-1#3")]}
    assert snapshot.idempotency == [key]


async def test_a_new_store_loads_empty(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    snapshot = open_store(path, start=False).load()
    assert (snapshot.endpoints, snapshot.events, snapshot.idempotency) == ([], {}, [])


async def test_events_load_in_seq_order_per_endpoint(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    await commit(store, [event("b", 10), event("a", 3), event("b", 2), event("a", 1)])
    await commit(store, [event("a", 2), event("b", 7)])

    snapshot = await reopened(path, store)

    assert {k: [e.seq for e in v] for k, v in snapshot.events.items()} == {"a": [1, 2, 3], "b": [2, 7, 10]}


async def test_deleting_an_endpoint_deletes_its_events_only(path: Path,
                                                            open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    await commit(store, [PutEndpoint(endpoint("gone")), PutEndpoint(endpoint("kept")),
                         event("gone", 1), event("gone", 2), event("kept", 1)])
    await commit(store, [DeleteEndpoint("gone")])

    snapshot = await reopened(path, store)

    assert [e.id for e in snapshot.endpoints] == ["kept"]
    assert list(snapshot.events) == ["kept"]
    assert raw_rows(path, "SELECT count(*) FROM events WHERE endpoint_id = 'gone'") == [(0,)]


async def test_changes_in_one_batch_apply_in_order(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    # Removed, then registered again with a fresh queue: the order inside a commit decides.
    await commit(store, [PutEndpoint(endpoint("e")), event("e", 1), DeleteEndpoint("e"),
                         PutEndpoint(endpoint("e", version=2)), event("e", 2)])

    snapshot = await reopened(path, store)

    assert snapshot.endpoints == [endpoint("e", version=2)]
    assert [e.seq for e in snapshot.events["e"]] == [2]


async def test_expired_idempotency_keys_are_not_loaded_and_get_purged(path: Path,
                                                                      open_store: Callable[..., SqliteStore]) -> None:
    now = [1000.0]
    store = open_store(path, wall_clock=lambda: now[0])
    soon = IdempotencyRecord("user-1", "soon", "00", 200, 1, expires_at=1500.0)
    later = IdempotencyRecord("user-1", "later", "00", 200, 1, expires_at=3000.0)
    await commit(store, [PutIdempotency(soon), PutIdempotency(later)])
    await store.close()

    now[0] = 2000.0
    store = open_store(path, wall_clock=lambda: now[0])
    assert store.load().idempotency == [later]
    assert raw_rows(path, "SELECT count(*) FROM idempotency") == [(2,)]  # loading does not write

    await commit(store, [PutEndpoint(endpoint("e"))])  # the first commit purges

    assert raw_rows(path, "SELECT key FROM idempotency") == [("later",)]


# ------------------------------------------------------------------ committed() and group commit

async def test_many_appends_share_few_commits(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path, unawaited_commit_seconds=60.0)  # only the waiters' wake-up commits
    waiters = []
    for seq in range(500):
        store.append([event("e", seq)])
        waiters.append(store.committed())
        if seq % 50 == 0:
            # Work in the same loop iteration that lets the writer thread run (it releases the GIL):
            # the writer must still wait for the iteration to end.
            time.sleep(0.002)  # noqa: ASYNC251 - blocking on purpose: one long iteration

    await asyncio.gather(*waiters)

    assert store.stats.rows_committed == 500
    assert store.stats.commits == 1  # one loop iteration's waiters share one commit
    assert store.stats.pending_rows == 0


async def test_changes_nobody_waits_for_are_committed_soon(path: Path,
                                                           open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    store.append([event("e", 1)])

    await eventually(lambda: store.stats.pending_rows == 0)

    assert raw_rows(path, "SELECT seq FROM events") == [(1,)]


async def test_concurrent_waiters_share_one_commit(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    store.append([event("e", seq) for seq in range(10)])

    await asyncio.gather(*(store.committed() for _ in range(64)))

    assert (store.stats.commits, store.stats.rows_committed, store.stats.last_batch_rows) == (1, 10, 10)


async def test_committed_is_done_at_once_when_nothing_is_pending(path: Path,
                                                                  open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    assert store.committed().done()
    await commit(store, [event("e", 1)])
    assert store.committed().done()
    assert store.stats.commits == 1


async def test_a_cancelled_waiter_does_not_disturb_the_others(path: Path,
                                                              open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    store.append([event("e", 1)])
    cancelled, kept = store.committed(), store.committed()
    cancelled.cancel()

    await kept

    assert raw_rows(path, "SELECT seq FROM events") == [(1,)]


async def test_close_commits_what_is_queued(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    store.append([PutEndpoint(endpoint("e")), event("e", 1)])

    snapshot = await reopened(path, store)

    assert [e.id for e in snapshot.endpoints] == ["e"]
    assert store.stats.pending_rows == 0


async def test_a_waiter_during_close_gets_its_commit(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    # The drain commits the journal while the last requests still wait: they must see the commit, not a failure.
    store = open_store(path)
    store.append([PutEndpoint(endpoint("e"))])
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() has begun

    await store.committed()
    await closing

    assert raw_rows(path, "SELECT id FROM endpoints") == [("e",)]


async def test_a_second_close_waits_for_the_first(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    store.append([PutEndpoint(endpoint("e"))])
    first = asyncio.create_task(store.close())
    await asyncio.sleep(0)

    await store.close()

    assert first.done()
    assert store.stats.pending_rows == 0


async def test_changes_appended_before_start_commit_once_started(path: Path,
                                                                 open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path, start=False)
    store.load()
    store.append([PutEndpoint(endpoint("early"))])
    store.start(asyncio.get_running_loop())

    await store.committed()

    assert raw_rows(path, "SELECT id FROM endpoints") == [("early",)]


# ------------------------------------------------------------------ a full store

async def fill_until_a_commit_fails(store: SqliteStore) -> int:
    """Append 2 KB events one commit at a time; the seq whose commit failed."""
    for seq in range(1000):
        store.append([event("e", seq, bytes(2000))])
        try:
            await store.committed()
        except StoreUnavailable:
            return seq
    raise AssertionError("the store never filled up")


async def test_a_full_store_fails_waiters_then_recovers_with_nothing_lost(
        path: Path, open_store: Callable[..., SqliteStore], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="endpoint_broker.store")
    store = open_store(path, max_bytes=128 * 1024)

    failed = await fill_until_a_commit_fails(store)

    assert failed > 0
    assert not store.healthy
    assert store.stats.pending_rows == 1
    # Everything answered before is on disk.
    assert raw_rows(path, "SELECT count(*), max(seq) FROM events") == [(failed, failed - 1)]
    # The failed change is retried by itself, and keeps failing: one error line for the whole burst.
    await eventually(lambda: store.stats.failed_commits >= 3)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "database or disk is full" in errors[0].getMessage()
    # A later waiter fails too, while the disk stays full.
    store.append([event("e", failed + 1)])
    with pytest.raises(StoreUnavailable, match="full"):
        await store.committed()

    # Room again: the queued changes commit without anyone appending them again.
    with sqlite3.connect(path) as connection:
        connection.execute("DELETE FROM events WHERE seq < 10")
    await eventually(lambda: store.healthy)
    await store.committed()
    assert store.stats.pending_rows == 0
    assert any("succeed again" in r.getMessage() for r in caplog.records)

    snapshot = await reopened(path, store)
    assert [e.seq for e in snapshot.events["e"]] == [*range(10, failed + 2)]


# ------------------------------------------------------------------ the file: schema, settings, mode

@pytest.fixture
def empty_file(path: Path) -> Path:
    path.touch()
    return path


async def test_an_empty_file_is_migrated_to_the_current_version(empty_file: Path,
                                                                 open_store: Callable[..., SqliteStore]) -> None:
    path = empty_file
    assert path.stat().st_size == 0
    store = open_store(path, start=False)
    assert store.pragmas()["user_version"] == SCHEMA_VERSION
    tables = {name for (name,) in raw_rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"endpoints", "events", "idempotency", "webhook_events"}


async def test_a_v1_file_migrates_to_v2_keeping_its_rows_and_then_stores_webhook_events(
    path: Path, open_store: Callable[..., SqliteStore]
) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(connection, path, MIGRATIONS[:1]) == 0  # the file as release v1 left it
        connection.execute("INSERT INTO endpoints VALUES ('e1', 'u', 'o', 60, 0, 'rest', 3, 0, '[]')")
        assert schema_version(connection) == 1
    finally:
        connection.close()

    store = open_store(path)
    assert store.pragmas()["user_version"] == SCHEMA_VERSION == 2
    await commit(store, [PutWebhookEvent(1, b'{"id":"a"}'), PutWebhookEvent(2, b'{"id":"b"}'),
                         PutWebhookEvent(3, b'{"id":"c"}')])
    await commit(store, [DeleteWebhookEvent(1)])

    snapshot = await reopened(path, store)
    assert [(e.id, e.version) for e in snapshot.endpoints] == [("e1", 3)]
    assert snapshot.webhook_events == [PutWebhookEvent(2, b'{"id":"b"}'), PutWebhookEvent(3, b'{"id":"c"}')]


def test_migrations_run_from_the_files_version_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    ran: list[str] = []

    def first(connection: sqlite3.Connection) -> None:
        ran.append("first")
        connection.execute("CREATE TABLE one (x)")

    def second(connection: sqlite3.Connection) -> None:
        ran.append("second")
        connection.execute("CREATE TABLE two (x)")

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("CREATE TABLE three (x)")
        raise RuntimeError("migration bug")

    connection = sqlite3.connect(path, isolation_level=None)
    try:
        assert migrate(connection, path, [first]) == 0
        assert migrate(connection, path, [first, second]) == 1
        assert ran == ["first", "second"]  # `first` did not run again
        assert schema_version(connection) == 2
        with pytest.raises(RuntimeError, match="migration bug"):
            migrate(connection, path, [first, second, broken])
        # Nothing of the failed step stays: neither its table nor a new version.
        assert schema_version(connection) == 2
        assert connection.execute("SELECT count(*) FROM sqlite_master WHERE name = 'three'").fetchone() == (0,)
    finally:
        connection.close()


def test_a_file_from_a_newer_release_is_refused_untouched(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()

    with pytest.raises(StoreVersionError) as refused:
        SqliteStore(path)

    assert isinstance(refused.value, ValueError)
    message = str(refused.value)
    assert str(path) in message
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert raw_rows(path, "PRAGMA journal_mode") == [("delete",)]  # not even switched to WAL


def test_a_file_that_is_not_sqlite_is_refused(path: Path) -> None:
    path.write_bytes(b"certainly not a database" * 100)
    with pytest.raises(StoreFileError, match=str(path)):
        SqliteStore(path)


def test_reopening_never_creates_a_new_empty_file(path: Path) -> None:
    # After an I/O error the writer reopens its file; if the file is gone, that must fail, not start over.
    with pytest.raises(StoreFileError, match=str(path)):
        open_database(path, "full", 0, create=False)
    assert not path.exists()


async def test_a_path_with_uri_characters_works(tmp_path: Path, open_store: Callable[..., SqliteStore]) -> None:
    path = tmp_path / "data dir?x=1#y%20" / DATABASE_FILE
    path.parent.mkdir()
    store = open_store(path)
    await commit(store, [PutEndpoint(endpoint("e"))])
    assert raw_rows(path, "SELECT id FROM endpoints") == [("e",)]


@pytest.mark.parametrize(("synchronous", "level"), [("full", 2), ("normal", 1)])
async def test_the_writer_connection_is_configured(path: Path, open_store: Callable[..., SqliteStore],
                                                   synchronous: str, level: int) -> None:
    store = open_store(path, synchronous, max_bytes=1024 * 1024)
    pragmas = store.pragmas()
    assert pragmas["synchronous"] == level
    assert pragmas["journal_mode"] == "wal"
    assert pragmas["wal_autocheckpoint"] == 0
    assert pragmas["max_page_count"] == 1024 * 1024 // int(pragmas["page_size"])  # type: ignore[call-overload]


def test_bad_arguments_are_refused(path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteStore(path, "off")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        SqliteStore(path, max_bytes=-1)


async def test_the_file_is_private(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    old_umask = os.umask(0o022)
    try:
        store = open_store(path)
        await commit(store, [PutEndpoint(endpoint("e"))])
    finally:
        os.umask(old_umask)
    for name in (path, Path(f"{path}-wal")):
        assert name.stat().st_mode & 0o777 == 0o600, name


def test_creating_the_file_syncs_its_directory(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without it a crash soon after the first start could lose the whole file's directory entry.
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    create_private_file(path)

    assert synced == [str(path), str(path.parent)]


async def test_the_checkpoint_thread_empties_the_wal(path: Path, open_store: Callable[..., SqliteStore]) -> None:
    # Every checkpoint truncates (threshold 1 byte), so the WAL file shrinks to nothing.
    store = open_store(path, checkpoint_interval=0.05, wal_truncate_bytes=1)
    await commit(store, [event("e", seq, bytes(1000)) for seq in range(200)])
    assert wal_bytes(path) > 200 * 1000  # autocheckpoint is off: the commit left it all in the WAL

    await eventually(lambda: store.checkpoints >= 1 and wal_bytes(path) == 0)

    assert store.last_checkpoint is not None
    busy, frames, done = store.last_checkpoint
    assert busy == 0
    assert frames == done  # every frame went into the main file


async def test_passive_checkpoints_run_while_there_are_commits(path: Path,
                                                              open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path, checkpoint_interval=0.05)
    await commit(store, [event("e", 1)])

    await eventually(lambda: store.checkpoints >= 1)

    assert store.last_checkpoint is not None and store.last_checkpoint[1] > 0
    seen = store.checkpoints
    await commit(store, [event("e", 2)])
    await eventually(lambda: store.checkpoints > seen)


# ------------------------------------------------------------------ MemoryStore

async def test_the_memory_store_keeps_nothing_and_is_always_done() -> None:
    store = MemoryStore()
    store.start(asyncio.get_running_loop())
    store.append([PutEndpoint(endpoint("e")), event("e", 1)])

    waiter = store.committed()

    assert waiter.done()
    await waiter
    snapshot = store.load()
    assert (snapshot.endpoints, snapshot.events, snapshot.idempotency) == ([], {}, [])
    assert store.healthy
    assert store.stats == StoreStats()
    await store.close()


def test_an_event_acknowledged_before_its_commit_is_never_written_and_deletes_go_last() -> None:
    record = EndpointRecord("e1", "u", "o", 60, False, "rest", 0, False)
    changes: list[Change] = [
        PutEndpoint(record),
        PutEvent(StoredEvent("e1", 1, b"a")),
        DeleteEvent("e1", 7),  # an event committed earlier
        PutEvent(StoredEvent("e1", 2, b"b")),
        DeleteEvent("e1", 1),  # acknowledged before its put was committed
        DeleteEndpoint("e2"),
    ]
    assert net_changes(changes) == [PutEndpoint(record), PutEvent(StoredEvent("e1", 2, b"b")),
                                     DeleteEndpoint("e2"), DeleteEvent("e1", 7)]


async def test_runs_longer_than_one_statement_are_written_whole(path: Path,
                                                                open_store: Callable[..., SqliteStore]) -> None:
    store = open_store(path)
    puts = [event(f"e{seq % 7}", seq) for seq in range(700)]  # chunks of 256, 256, 128, 32, 16, 8, 4
    await commit(store, puts)
    await commit(store, [DeleteEvent(f"e{seq % 7}", seq) for seq in range(0, 700, 2)])  # 350 deletes

    rows = raw_rows(path, "SELECT endpoint_id, seq, payload FROM events ORDER BY seq")
    assert rows == [(f"e{seq % 7}", seq, f"e{seq % 7}#{seq}".encode()) for seq in range(1, 700, 2)]
