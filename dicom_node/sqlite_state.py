"""A small durable state database: SQLite in WAL mode with full fsync, one connection shared by threads."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


class SqliteState:
    """Base of the node's state stores: schema applied on open, ``_tx()`` for one immediate transaction.

    Several processes may open the same file (the CLI beside a running node): SQLite's locking and a
    30 s busy timeout serialise them.
    """

    def __init__(self, path: Path, schema: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error, which is re-raised as it was.

        SQLite rolls back by itself on some errors (``database or disk is full``), and a failed COMMIT can
        leave the transaction open: ROLLBACK only while one is active, so the shared connection is never
        left inside a transaction and the original error is the one reported.
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):  # the original error matters more
                        db.execute("ROLLBACK")
                raise
