"""The SQLite schema and its migrations: code, applied at open, one function per version step.

The file's schema version sits in `PRAGMA user_version`. `MIGRATIONS[n]` takes a file
from version n to n + 1; a file at version v gets `MIGRATIONS[v:]`, all in one
transaction, so a crash half-way leaves it at v. A file newer than this code is
refused: guessing at a format we do not know could lose data.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

Migration = Callable[[sqlite3.Connection], None]


class StoreFileError(ValueError):
    """The database file cannot be used (not SQLite, or unreadable); the service must not start."""


class StoreVersionError(StoreFileError):
    """The database file has a schema version this code does not know (written by a newer release)."""

    def __init__(self, path: Path, found: int, known: int) -> None:
        super().__init__(
            f"{path}: schema version {found} is newer than this release knows (at most {known}); "
            "run the release that wrote it, or restore a backup"
        )
        self.path = path
        self.found = found
        self.known = known


def create_tables(connection: sqlite3.Connection) -> None:
    """v0 -> v1: endpoints, their queued events, and idempotency keys."""
    connection.execute(
        """CREATE TABLE endpoints (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            organization_id TEXT NOT NULL,
            keep_alive_seconds INTEGER NOT NULL,
            reminder_on INTEGER NOT NULL,
            origin TEXT NOT NULL,
            version INTEGER NOT NULL,
            persistent_session INTEGER NOT NULL,
            subscriptions TEXT NOT NULL  -- JSON: [[topic, qos], ...]
        )"""
    )
    # A rowid table (not WITHOUT ROWID): payloads can be larger than a WITHOUT ROWID row should be.
    connection.execute(
        """CREATE TABLE events (
            endpoint_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            payload BLOB NOT NULL,
            PRIMARY KEY (endpoint_id, seq)
        )"""
    )
    connection.execute(
        """CREATE TABLE idempotency (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            body_digest TEXT NOT NULL,
            status INTEGER NOT NULL,
            count INTEGER NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (scope, key)
        )"""
    )
    # The writer purges expired keys by range.
    connection.execute("CREATE INDEX idempotency_expiry ON idempotency (expires_at)")


def add_webhook_events(connection: sqlite3.Connection) -> None:
    """v1 -> v2: lifecycle events waiting for the webhook, so that they survive a restart."""
    connection.execute(
        """CREATE TABLE webhook_events (
            seq INTEGER PRIMARY KEY,
            body BLOB NOT NULL  -- the JSON POSTed, exactly as signed
        )"""
    )


MIGRATIONS: Sequence[Migration] = (create_tables, add_webhook_events)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def refuse_unknown_version(connection: sqlite3.Connection, path: Path, migrations: Sequence[Migration]) -> int:
    """The file's version, or StoreVersionError if it is newer than `migrations` reach."""
    found = schema_version(connection)
    if found > len(migrations):
        raise StoreVersionError(path, found, len(migrations))
    return found


def migrate(connection: sqlite3.Connection, path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the file to the newest version in one transaction; returns the version it was at.

    `connection` must be in autocommit mode (isolation_level=None), so that the
    transaction here is the only one and DDL is part of it.
    """
    connection.execute("BEGIN IMMEDIATE")  # read the version under the write lock: no other process migrates too
    try:
        found = refuse_unknown_version(connection, path, migrations)
        for migration in migrations[found:]:
            migration(connection)
        if found < len(migrations):
            # user_version is in the file header, written by this transaction.
            connection.execute(f"PRAGMA user_version = {len(migrations):d}")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return found
