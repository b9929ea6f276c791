"""Stores of the journal (endpoint_core.journal.Store): where the table's changes survive a restart.

- `MemoryStore`: nothing survives (today's behaviour; `--store memory`).
- `SqliteStore`: an embedded SQLite file in WAL mode, written in group commits by a thread of its own.
"""

from store.memory import MemoryStore
from store.schema import SCHEMA_VERSION, StoreFileError, StoreVersionError
from store.sqlite import DATABASE_FILE, SqliteStore, Synchronous

__all__ = [
    "DATABASE_FILE",
    "SCHEMA_VERSION",
    "MemoryStore",
    "SqliteStore",
    "StoreFileError",
    "StoreVersionError",
    "Synchronous",
]
