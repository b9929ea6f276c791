"""The `sqlite` store: the journal in an embedded SQLite file, written in group commits by one thread.

Why it is built this way (measured for the durability issue):
- One writer thread, never the event loop: committing on the loop stalled every connection.
- Group commit: the writer takes everything queued since its last commit finished and commits
  it as one transaction. Under load the batches grow by themselves; a fixed batching window
  was 4-5x slower.
- A commit starts when someone waits for it, once per loop iteration: `committed()` wakes the
  writer from a `call_soon` callback, so every request handled in one iteration shares a commit.
  Changes nobody waits for (a PUBACK's delete, an expiry) ride along with the next commit, or
  go on their own after UNAWAITED_COMMIT_SECONDS. Waking the writer on every append made small
  commits as fast as the disk allowed, and on one core their fixed cost (about 150 us of CPU
  each, the fsync included) took a third of QoS 1 throughput; with the wake-up here the
  durable store costs about 11% of it (bench/RESULTS.md, round three).
- WAL mode, with automatic checkpoints off on the writer's connection: they made some commits
  take 10-36 ms. A second thread checkpoints on its own connection instead.
- A failing commit (disk full, I/O error) fails only the futures waiting on that batch; its
  changes stay queued and go with the next commit, after a short backoff.

`committed()` works on sequence numbers: every appended change gets the next number, a commit
reports the newest number it carried, and a waiter is done once that reaches the number that
was current when it asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

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
    Snapshot,
    StoredEvent,
    StoreStats,
    StoreUnavailable,
)
from store.schema import MIGRATIONS, StoreFileError, migrate, refuse_unknown_version

log = logging.getLogger("endpoint_broker.store")

DATABASE_FILE = "endpoints.sqlite3"  # the file's name inside the data directory

Synchronous = Literal["full", "normal"]
SYNCHRONOUS_MODES: tuple[Synchronous, ...] = ("full", "normal")

CHECKPOINT_INTERVAL_SECONDS = 1.0
# Above this WAL size a checkpoint also truncates the WAL: under steady commits a passive
# checkpoint never catches up with the end of the log, so the log would only grow.
WAL_TRUNCATE_BYTES = 64 * 1024 * 1024
PURGE_INTERVAL_SECONDS = 60.0
BUSY_TIMEOUT_MS = 5000
CLOSE_TIMEOUT_SECONDS = 5.0
# The longest a change nobody waits for stays queued: a crash in that window can redeliver an
# event whose PUBACK was not yet committed (at least once, as QoS 1 allows).
UNAWAITED_COMMIT_SECONDS = 0.05
RETRY_BACKOFF_SECONDS = (0.05, 1.0)  # first and longest wait before retrying a failed commit
SQLITE_IOERR = 10  # primary result code; extended I/O errors keep it in their low byte

Params = tuple[object, ...]


# ------------------------------------------------------------------ opening the file

def create_private_file(path: Path) -> None:
    """Create the database file with mode 0600 (SQLite gives its -wal and -shm files the same mode)."""
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(descriptor, 0o600)  # whatever the umask
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable: SQLite syncs the directory of its WAL, not of the main file."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def configure_writer(connection: sqlite3.Connection, path: Path, synchronous: Synchronous, max_bytes: int) -> None:
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreFileError(f"{path}: SQLite cannot use WAL mode here (journal_mode is {mode})")
    connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
    # Once a checkpoint has emptied the WAL, the next writer cuts the file back to this size.
    connection.execute(f"PRAGMA journal_size_limit={WAL_TRUNCATE_BYTES:d}")
    if max_bytes:
        page_size = int(connection.execute("PRAGMA page_size").fetchone()[0])
        connection.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size):d}")


def open_database(path: Path, synchronous: Synchronous, max_bytes: int, create: bool = True) -> sqlite3.Connection:
    """The writer's connection, configured and migrated. StoreFileError if the file cannot be used.

    `create=False` (reopening after an I/O error) never makes a new file: if ours is gone, an
    empty store in its place would hide the loss behind successful commits.
    """
    try:
        if create:
            create_private_file(path)
        # Autocommit mode: the writer issues BEGIN and COMMIT itself. The connection moves to
        # the writer thread after load(), and is only ever used under a lock.
        connection = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=rw", uri=True,
                                     isolation_level=None, check_same_thread=False)
    except (OSError, sqlite3.Error) as error:
        raise StoreFileError(f"{path}: cannot open the store: {error}") from error
    try:
        refuse_unknown_version(connection, path, MIGRATIONS)  # before changing anything in a file we do not know
        configure_writer(connection, path, synchronous, max_bytes)
        migrate(connection, path)
    except sqlite3.Error as error:
        connection.close()
        raise StoreFileError(f"{path}: cannot use the store: {error}") from error
    except BaseException:
        connection.close()
        raise
    return connection


# ------------------------------------------------------------------ changes as rows

def endpoint_params(change: PutEndpoint) -> Params:
    r = change.record
    subscriptions = json.dumps([list(item) for item in r.subscriptions], separators=(",", ":"))
    return (r.id, r.user_id, r.organization_id, r.keep_alive_seconds, int(r.reminder_on), r.origin, r.version,
            int(r.persistent_session), subscriptions)


def endpoint_from_row(row: Sequence[Any]) -> EndpointRecord:
    subscriptions = tuple((str(topic), int(qos)) for topic, qos in json.loads(row[8]))
    return EndpointRecord(id=row[0], user_id=row[1], organization_id=row[2], keep_alive_seconds=row[3],
                          reminder_on=bool(row[4]), origin=row[5], version=row[6],
                          persistent_session=bool(row[7]), subscriptions=subscriptions)


def idempotency_params(change: PutIdempotency) -> Params:
    r = change.record
    return (r.scope, r.key, r.body_digest, r.status, r.count, r.expires_at)


# Spelled out, column lists included: no SQL is built from strings at run time.
# An upsert that keeps the row (and its rowid): endpoints load in the order they first registered.
PUT_ENDPOINT = ("INSERT INTO endpoints (id, user_id, organization_id, keep_alive_seconds, reminder_on, origin, "
                "version, persistent_session, subscriptions) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, "
                "organization_id = excluded.organization_id, keep_alive_seconds = excluded.keep_alive_seconds, "
                "reminder_on = excluded.reminder_on, origin = excluded.origin, version = excluded.version, "
                "persistent_session = excluded.persistent_session, subscriptions = excluded.subscriptions")
SELECT_ENDPOINTS = ("SELECT id, user_id, organization_id, keep_alive_seconds, reminder_on, origin, version, "
                    "persistent_session, subscriptions FROM endpoints ORDER BY rowid")
PUT_IDEMPOTENCY = ("INSERT OR REPLACE INTO idempotency (scope, key, body_digest, status, count, expires_at) "
                   "VALUES (?,?,?,?,?,?)")
SELECT_IDEMPOTENCY = ("SELECT scope, key, body_digest, status, count, expires_at FROM idempotency "
                      "WHERE expires_at > ?")

# Per kind of change, its statements in order, each with the function that makes its parameters.
# Puts overwrite: a change applied twice (it cannot be today, a failed batch is rolled back
# whole) must not wedge the writer on a constraint error.
STATEMENTS: dict[type, tuple[tuple[str, Callable[[Any], Params]], ...]] = {
    PutEndpoint: ((PUT_ENDPOINT, endpoint_params),),
    DeleteEndpoint: (("DELETE FROM events WHERE endpoint_id = ?", lambda c: (c.endpoint_id,)),
                     ("DELETE FROM endpoints WHERE id = ?", lambda c: (c.endpoint_id,))),
    # PutEvent and DeleteEvent: MULTI_ROW below.
    PutIdempotency: ((PUT_IDEMPOTENCY, idempotency_params),),
    PutWebhookEvent: (("INSERT OR REPLACE INTO webhook_events (seq, body) VALUES (?,?)",
                       lambda c: (c.seq, c.body)),),
    DeleteWebhookEvent: (("DELETE FROM webhook_events WHERE seq = ?", lambda c: (c.seq,)),),
}


def net_changes(changes: Sequence[Change]) -> Sequence[Change]:
    """The same end state in fewer statements.

    An event acknowledged before its PutEvent was committed (it is published before the commit)
    is never written: its Put and Delete cancel out. The remaining DeleteEvents go last, so that
    a steady stream of puts and acknowledgements makes two runs, not one run per change. That is
    safe because an event's seq is never reused, and any order of deletes ends the same.
    """
    puts = {(c.event.endpoint_id, c.event.seq) for c in changes if isinstance(c, PutEvent)}
    deletes = [c for c in changes if isinstance(c, DeleteEvent)]
    if not deletes:
        return changes
    gone = {(c.endpoint_id, c.seq) for c in deletes} & puts
    kept = [c for c in changes if not isinstance(c, DeleteEvent)
            and not (isinstance(c, PutEvent) and (c.event.endpoint_id, c.event.seq) in gone)]
    return kept + [c for c in deletes if (c.endpoint_id, c.seq) not in gone]


# Runs of events, the bulk of every batch, are written with one statement per chunk of rows,
# not one executemany step per row (each step gives the GIL up and takes it back): QoS 1
# sendEvent measured 5-14% more events/s and 3-11% less CPU. Chunk sizes are powers of two, so
# that few distinct statements are prepared and cached.
MAX_ROWS_PER_STATEMENT = 256
MULTI_ROW: dict[type, tuple[str, str, str, Callable[[Any], Params]]] = {
    # kind: (statement head, one row's placeholders, statement tail, the row's parameters)
    PutEvent: ("INSERT OR REPLACE INTO events (endpoint_id, seq, payload) VALUES ", "(?,?,?)", "",
               lambda c: (c.event.endpoint_id, c.event.seq, c.event.payload)),
    DeleteEvent: ("DELETE FROM events WHERE (endpoint_id, seq) IN (VALUES ", "(?,?)", ")",
                  lambda c: (c.endpoint_id, c.seq)),
}


@functools.cache  # at most 9 sizes per kind
def _multi_row_sql(kind: type, rows: int) -> str:
    head, row, tail, _ = MULTI_ROW[kind]
    return head + ",".join([row] * rows) + tail


def _apply_multi_row(connection: sqlite3.Connection, kind: type, batch: Sequence[Change]) -> None:
    params = MULTI_ROW[kind][3]
    start = 0
    while start < len(batch):
        rows = min(MAX_ROWS_PER_STATEMENT, 1 << (len(batch) - start).bit_length() - 1)
        values = [value for change in batch[start:start + rows] for value in params(change)]
        connection.execute(_multi_row_sql(kind, rows), values)
        start += rows


def apply_changes(connection: sqlite3.Connection, changes: Sequence[Change]) -> None:
    """Apply in order; runs of one kind share their statements (see MULTI_ROW)."""
    for kind, run in itertools.groupby(net_changes(changes), key=type):
        batch = list(run)
        if kind in MULTI_ROW:
            _apply_multi_row(connection, kind, batch)
            continue
        for sql, params in STATEMENTS[kind]:
            connection.executemany(sql, map(params, batch))


def purge_expired_keys(connection: sqlite3.Connection, now: float) -> None:
    connection.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))


def load_snapshot(connection: sqlite3.Connection, now: float) -> Snapshot:
    snapshot = Snapshot()
    connection.execute("BEGIN")  # one read transaction: the tables as of one commit
    try:
        rows = connection.execute(SELECT_ENDPOINTS)
        snapshot.endpoints = [endpoint_from_row(row) for row in rows]
        for endpoint_id, seq, payload in connection.execute(
                "SELECT endpoint_id, seq, payload FROM events ORDER BY endpoint_id, seq"):
            snapshot.events.setdefault(endpoint_id, []).append(StoredEvent(endpoint_id, seq, bytes(payload)))
        rows = connection.execute(SELECT_IDEMPOTENCY, (now,))
        snapshot.idempotency = [IdempotencyRecord(*row) for row in rows]
        snapshot.webhook_events = [PutWebhookEvent(seq, bytes(body)) for seq, body in
                                   connection.execute("SELECT seq, body FROM webhook_events ORDER BY seq")]
    finally:
        connection.execute("COMMIT")
    return snapshot


def is_io_error(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == SQLITE_IOERR


# ------------------------------------------------------------------ the store

class SqliteStore:
    """The journal in `path` (a SQLite file, created with mode 0600), committed by a writer thread.

    Opening migrates the file; a file from a newer release raises StoreVersionError, one
    that is not usable raises StoreFileError (both ValueErrors: the service exits with 2).
    """

    def __init__(self, path: Path, synchronous: Synchronous = "full", max_bytes: int = 0, *,
                 checkpoint_interval: float = CHECKPOINT_INTERVAL_SECONDS,
                 wal_truncate_bytes: int = WAL_TRUNCATE_BYTES,
                 purge_interval: float = PURGE_INTERVAL_SECONDS,
                 unawaited_commit_seconds: float = UNAWAITED_COMMIT_SECONDS,
                 close_timeout: float = CLOSE_TIMEOUT_SECONDS,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 (unlimited) or positive, not {max_bytes}")
        self.path = Path(path)
        self._synchronous: Synchronous = synchronous
        self._max_bytes = max_bytes
        self._checkpoint_interval = checkpoint_interval
        self._wal_truncate_bytes = wal_truncate_bytes
        self._purge_interval = purge_interval
        self._unawaited_commit_seconds = unawaited_commit_seconds
        self._close_timeout = close_timeout
        self._wall_clock = wall_clock
        self._stats = StoreStats()
        self._healthy = True
        self.checkpoints = 0  # checkpoints run by the checkpoint thread
        self.last_checkpoint: tuple[int, int, int] | None = None  # (busy, WAL frames, frames checkpointed)

        # The writer's connection: used by load() before start(), then by the writer thread.
        self._connection: sqlite3.Connection | None = open_database(self.path, synchronous, max_bytes)
        self._connection_lock = threading.Lock()

        # Shared with append() callers; never held during a commit.
        self._queue_lock = threading.Condition()
        self._queue: list[Change] = []
        self._appended = 0  # sequence number of the newest appended change
        self._stopping = False
        self._close_deadline = 0.0
        self._awaited = False  # someone waits for what is queued: commit it now
        self._queued_since = 0.0  # when the oldest change in _queue was appended

        # Loop side: only touched on the loop thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_scheduled = False
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()  # (sequence number, future), in order
        self._committed = 0  # the newest sequence number a commit reported
        self._closing: asyncio.Future[None] | None = None
        self._closed = False

        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self._failing_since = 0.0
        self._failures_in_burst = 0

    # -------------------------------------------------------------- the Store interface

    def load(self) -> Snapshot:
        with self._connection_lock:
            return load_snapshot(self._writer_connection(), self._wall_clock())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            raise RuntimeError("the store is already started")
        self._loop = loop
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="store-checkpoint", daemon=True)
        self._writer.start()
        self._checkpointer.start()

    def append(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        with self._queue_lock:
            if not self._queue:
                self._queued_since = time.monotonic()
                self._queue_lock.notify()  # the writer arms its UNAWAITED_COMMIT_SECONDS wait
            self._queue.extend(changes)
            self._appended += len(changes)
            self._stats.pending_rows += len(changes)

    def committed(self) -> asyncio.Future[None]:
        if self._loop is None:
            raise RuntimeError("committed() before start()")
        future: asyncio.Future[None] = self._loop.create_future()
        with self._queue_lock:
            target = self._appended
        if target <= self._committed:
            future.set_result(None)
        elif self._closed:
            future.set_exception(StoreUnavailable("the store is closed; the changes were not committed"))
        else:
            self._waiters.append((target, future))
            if not self._wake_scheduled:
                self._wake_scheduled = True
                self._loop.call_soon(self._wake_writer)
        return future

    def _wake_writer(self) -> None:
        """At the end of a loop iteration: commit what this iteration's waiters wait for."""
        self._wake_scheduled = False
        with self._queue_lock:
            self._awaited = True
            self._queue_lock.notify()

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def stats(self) -> StoreStats:
        return self._stats

    async def close(self) -> None:
        """Commit what is queued (retrying for at most `close_timeout` seconds if commits fail), then stop.

        Waiters keep working while it drains; a second call waits for the first.
        """
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await asyncio.to_thread(self._shut_down, self._close_timeout)
        self._closed = True
        # The writer's last reports ran before this (call_soon_threadsafe is FIFO); whoever still
        # waits, waits for changes that never committed.
        self._fail_waiters(None, "the store closed before these changes were committed")

    # -------------------------------------------------------------- diagnostics

    def pragmas(self) -> dict[str, object]:
        """The writer connection's settings, as SQLite reports them (blocks for at most one commit)."""
        names = ("journal_mode", "synchronous", "wal_autocheckpoint", "page_size", "max_page_count", "user_version")
        with self._connection_lock:
            connection = self._writer_connection()
            return {name: connection.execute(f"PRAGMA {name}").fetchone()[0] for name in names}

    # -------------------------------------------------------------- the writer thread

    def _write_loop(self) -> None:
        carried: list[Change] = []  # a batch whose commit failed: it goes first in the next one
        backoff = 0.0
        next_purge = 0.0
        while (taken := self._take(carried, backoff)) is not None:
            changes, newest = taken
            purge = time.monotonic() >= next_purge
            started = time.perf_counter()
            try:
                self._commit(changes, purge)
            except Exception as error:  # whatever it is, a failing commit must never kill the writer
                carried = changes
                backoff = min(max(backoff * 2, RETRY_BACKOFF_SECONDS[0]), RETRY_BACKOFF_SECONDS[1])
                self._commit_failed(error, newest)
                continue
            carried, backoff = [], 0.0
            if purge:
                next_purge = time.monotonic() + self._purge_interval
            self._commit_succeeded(newest, len(changes), time.perf_counter() - started)
        if self._stats.pending_rows:
            log.error("store: closing %s with %d changes not committed", self.path, self._stats.pending_rows)

    def _take(self, carried: list[Change], backoff: float) -> tuple[list[Change], int] | None:
        """Everything to commit next and the newest sequence number in it; None once it should stop."""
        with self._queue_lock:
            if backoff:
                # A failing disk: wait out the backoff whatever is appended meanwhile, so it does not spin a core.
                self._queue_lock.wait_for(lambda: False, timeout=backoff)
            while not (carried or self._stopping):
                if not self._queue:
                    self._queue_lock.wait()
                    continue
                if self._awaited:
                    break
                unawaited_for = time.monotonic() - self._queued_since
                if unawaited_for >= self._unawaited_commit_seconds:
                    break
                self._queue_lock.wait(self._unawaited_commit_seconds - unawaited_for)
            self._awaited = False
            if self._stopping and (not (self._queue or carried) or time.monotonic() > self._close_deadline):
                return None
            taken, self._queue = self._queue, []
            return carried + taken, self._appended

    def _commit(self, changes: list[Change], purge: bool) -> None:
        with self._connection_lock:
            connection = self._writer_connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                apply_changes(connection, changes)
                if purge:
                    purge_expired_keys(connection, self._wall_clock())
                connection.execute("COMMIT")
            except BaseException as error:
                self._roll_back(connection, reopen=is_io_error(error))
                raise

    def _roll_back(self, connection: sqlite3.Connection, reopen: bool) -> None:
        """Undo a failed batch; after an I/O error, or if that fails too, start on a fresh connection."""
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error:
            reopen = True
        if reopen:
            connection.close()
            self._connection = None

    def _writer_connection(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = open_database(self.path, self._synchronous, self._max_bytes, create=False)
        return self._connection

    def _commit_succeeded(self, newest: int, rows: int, seconds: float) -> None:
        stats = self._stats
        stats.commits += 1
        stats.rows_committed += rows
        stats.last_batch_rows = rows
        stats.commit_seconds_total += seconds
        with self._queue_lock:
            stats.pending_rows -= rows
        if not self._healthy:
            log.warning("store: commits to %s succeed again, after %d failed in %.1f s",
                        self.path, self._failures_in_burst, time.monotonic() - self._failing_since)
            self._healthy = True
        self._report(self._resolve_waiters, newest)

    def _commit_failed(self, error: Exception, newest: int) -> None:
        self._stats.failed_commits += 1
        reason = f"the store cannot commit: {error}"
        if self._healthy:
            # One line per burst: a full disk fails every retry, and the log must stay readable.
            log.error("store: commits to %s are failing (%s: %s); %d changes stay queued and are retried, "
                      "requests that must be durable fail until it recovers",
                      self.path, type(error).__name__, error, self._stats.pending_rows,
                      exc_info=not isinstance(error, sqlite3.Error))
            self._healthy = False
            self._failing_since = time.monotonic()
            self._failures_in_burst = 0
        self._failures_in_burst += 1
        self._report(self._fail_waiters, newest, reason)

    def _report(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(callback, *args)

    # -------------------------------------------------------------- results, on the loop thread

    def _resolve_waiters(self, newest: int) -> None:
        self._committed = max(self._committed, newest)
        while self._waiters and self._waiters[0][0] <= newest:
            future = self._waiters.popleft()[1]
            if not future.done():  # the waiter may have been cancelled
                future.set_result(None)

    def _fail_waiters(self, newest: int | None, reason: str) -> None:
        """Fail the waiters whose changes were in the failed batch (all of them, if `newest` is None)."""
        while self._waiters and (newest is None or self._waiters[0][0] <= newest):
            future = self._waiters.popleft()[1]
            if not future.done():
                future.set_exception(StoreUnavailable(reason))

    # -------------------------------------------------------------- the checkpoint thread

    def _checkpoint_loop(self) -> None:
        connection: sqlite3.Connection | None = None
        seen_commits = 0
        failing = False
        while not self._checkpoint_stop.wait(self._checkpoint_interval):
            if self._stats.commits == seen_commits:
                continue  # nothing new in the WAL
            seen_commits = self._stats.commits
            try:
                if connection is None:
                    connection = sqlite3.connect(self.path, isolation_level=None)
                    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS:d}")
                self.last_checkpoint = self._checkpoint(connection)
                self.checkpoints += 1
                failing = False
            except sqlite3.Error as error:
                if not failing:
                    log.warning("store: WAL checkpoint of %s failed: %s (retried)", self.path, error)
                failing = True
        if connection is not None:
            connection.close()

    def _checkpoint(self, connection: sqlite3.Connection) -> tuple[int, int, int]:
        # PASSIVE never blocks the writer; TRUNCATE waits for it briefly but resets a WAL that
        # passive checkpoints could not keep from growing.
        mode = "TRUNCATE" if self._wal_bytes() >= self._wal_truncate_bytes else "PASSIVE"
        busy, frames, done = connection.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(busy), int(frames), int(done)

    def _wal_bytes(self) -> int:
        try:
            return os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return 0

    # -------------------------------------------------------------- shutdown (in a worker thread)

    def _shut_down(self, timeout: float) -> None:
        with self._queue_lock:
            self._stopping = True
            self._close_deadline = time.monotonic() + timeout
            self._queue_lock.notify_all()
        self._checkpoint_stop.set()
        for thread in (self._writer, self._checkpointer):
            if thread is not None:
                thread.join(timeout + RETRY_BACKOFF_SECONDS[1] + BUSY_TIMEOUT_MS / 1000)
        if self._writer is not None and self._writer.is_alive():
            log.error("store: the writer of %s did not stop; leaving its connection open", self.path)
            return
        with self._connection_lock:
            if self._connection is not None:
                self._final_checkpoint(self._connection)
                self._connection.close()
                self._connection = None

    def _final_checkpoint(self, connection: sqlite3.Connection) -> None:
        """Leave everything in the main file and an empty WAL: a stopped service's file copies as is."""
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            log.warning("store: final checkpoint of %s failed: %s", self.path, error)
