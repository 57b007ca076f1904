"""State databases: SQLite (embedded, one machine) or PostgreSQL (several machines), versioned schemas.

Stores write their SQL once, with ``?`` placeholders, in the subset both engines run the same way
(``INSERT ... ON CONFLICT``, ``RETURNING``, ``CASE``); :attr:`StateDatabase.skip_locked` is the one
dialect switch (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, nothing on SQLite, whose ``BEGIN IMMEDIATE``
already serialises writers). A schema is a list of migration steps; the version reached is kept in
``PRAGMA user_version`` (SQLite) or the ``schema_versions`` table (PostgreSQL, one row per store), and
:meth:`StateDatabase.migrate` applies the missing steps in one transaction at open.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol

Row = Mapping[str, Any]


class Cursor(Protocol):
    """What a statement returns: its rows (``RETURNING`` or ``SELECT``) and the rows it changed."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor: ...


Step = str | Callable[[Tx], None]  # SQL statements separated by ';', or a function run in the transaction


class DatabaseUnavailableError(RuntimeError):
    """The database server cannot be reached or refuses the connection (the message says why)."""


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer synthmrf (its schema version is above this code's)."""


class StateDatabase(ABC):
    """One connection per process, shared by its threads (a lock serialises them)."""

    dialect: str
    skip_locked: str

    def __init__(self) -> None:
        self._lock = threading.RLock()

    @abstractmethod
    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """One write transaction; rolled back on any error, which is re-raised as it was."""

    def read(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        with self.tx() as db:
            return list(db.execute(sql, args).fetchall())

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _get_version(self, tx: Tx, name: str) -> int: ...

    @abstractmethod
    def _set_version(self, tx: Tx, name: str, version: int) -> None: ...

    def migrate(self, name: str, steps: Sequence[Step]) -> int:
        """Bring store ``name`` to ``len(steps)``; return the version it had. Refuses a newer schema."""
        with self.tx() as db:
            self._lock_schema(db)
            have = self._get_version(db, name)
            if have > len(steps):
                raise SchemaTooNewError(f"{self}: the {name} schema is version {have}, this synthmrf knows up to "
                                        f"{len(steps)}; upgrade synthmrf")
            for step in steps[have:]:
                if callable(step):
                    step(db)
                else:
                    for statement in (s.strip() for s in step.split(";")):
                        if statement:
                            db.execute(statement)
            if have < len(steps):
                self._set_version(db, name, len(steps))
        return have

    @abstractmethod
    def _lock_schema(self, tx: Tx) -> None:
        """Serialise migrations of several processes."""


class SqliteDatabase(StateDatabase):
    """A SQLite file in WAL mode with full fsync; several processes of one machine may share it."""

    dialect = "sqlite"
    skip_locked = ""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")

    def __str__(self) -> str:
        return str(self.path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``. SQLite rolls back by itself on some errors (``database or disk
        is full``) and a failed COMMIT can leave the transaction open: ROLLBACK only while one is active, so
        the shared connection is never left inside a transaction and the original error is reported."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise

    def read(self, sql: str, args: Sequence[object] = ()) -> list[Row]:
        """One statement in autocommit (a consistent snapshot without taking the write lock)."""
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _lock_schema(self, tx: Tx) -> None:
        """Nothing to do: BEGIN IMMEDIATE already serialises writers."""

    def _get_version(self, tx: Tx, name: str) -> int:
        return int(tx.execute("PRAGMA user_version").fetchone()[0])

    def _set_version(self, tx: Tx, name: str, version: int) -> None:
        tx.execute(f"PRAGMA user_version = {int(version)}")


class _PgTx:
    """``?`` placeholders on a psycopg cursor (``%`` in the SQL text is escaped)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        self._cursor.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(args))
        return self._cursor  # type: ignore[no-any-return]


class PostgresDatabase(StateDatabase):
    """A PostgreSQL database (psycopg 3); the connection is re-opened after it broke."""

    dialect = "postgres"
    skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, url: str, connect_timeout_s: float = 10.0) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise RuntimeError("the postgres backend needs psycopg (pip install 'psycopg[binary]')") from exc
        self.url = url
        self._psycopg = psycopg
        self._connect_timeout = max(1, int(connect_timeout_s))
        self._conn: Any = None
        self._connect()

    def __str__(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.url)
        return f"postgresql://{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"

    def _connect(self) -> None:
        from psycopg.rows import dict_row

        try:
            self._conn = self._psycopg.connect(self.url, autocommit=False, row_factory=dict_row,
                                               connect_timeout=self._connect_timeout)
        except self._psycopg.OperationalError as exc:
            raise DatabaseUnavailableError(f"cannot connect to the job store at {self}: {exc}".strip()) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._connect()
            conn = self._conn
            try:
                with conn.cursor() as cur:
                    yield _PgTx(cur)
                conn.commit()
            except BaseException:
                with suppress(Exception):
                    conn.rollback()
                raise

    def _lock_schema(self, tx: Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(7226091)")  # any fixed key: "synthmrf schema"
        tx.execute("CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")

    def _get_version(self, tx: Tx, name: str) -> int:
        row = tx.execute("SELECT version FROM schema_versions WHERE name = ?", (name,)).fetchone()
        return 0 if row is None else int(row["version"])

    def _set_version(self, tx: Tx, name: str, version: int) -> None:
        tx.execute("INSERT INTO schema_versions (name, version) VALUES (?, ?) "
                   "ON CONFLICT (name) DO UPDATE SET version = excluded.version", (name, version))


class SqliteStore:
    """Base of a store kept in its own SQLite file (the retrospective progress): ``_tx()`` for one write
    transaction, ``_db`` and ``_lock`` for reads, the schema migrated at open."""

    def __init__(self, path: Path, name: str, steps: Sequence[Step]) -> None:
        self.database = SqliteDatabase(path)
        self.path = self.database.path
        self._db = self.database._db
        self._lock = self.database._lock
        self.database.migrate(name, steps)

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self.database.tx()  # type: ignore[return-value]  # SQLite's Tx is its connection

    def close(self) -> None:
        self.database.close()
