"""Per-series progress of retrospective passes and the history of runs (``<storage_dir>/retro/progress.sqlite``).

A series (keyed by its SeriesInstanceUID, whatever the source) moves

    retrieving -> retrieved                   (the archive reported every sub-operation done)
               -> failed -> retrieving ...    (tried again by passes that start retry_after_s later)
               -> gave_up                      (after max_attempts)
    already_received                           (the node had it before any pass asked: sent prospectively)

A ``retrieving`` series whose run is no longer alive (its process died, or the run ended while the
series was in flight) is *interrupted*: the next pass asks the archive for its instances and fetches
only those the node does not hold. A claim is a compare-and-swap in one immediate transaction (read,
liveness check, conditional update), so two passes, in any processes, never fetch one series at the
same time. Runs record who ran (schedule, source, pid), when, what came of it, and the counts shown by
``synthmrf retro list`` and ``synthmrf status``.

A run is *alive* while its process holds an ``flock`` on ``<storage_dir>/retro/locks/run-<id>.lock``
(taken before the run is visible to others, released by ``finish_run``, by closing the store, or by the
OS when the process dies): no PIDs, so PID reuse and other hosts or containers sharing the storage
folder do not fool it. The storage folder must be on a file system with working ``flock`` (local disk).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_node.state_db import SqliteStore

PROGRESS_FILE = "progress.sqlite"


class SeriesState(StrEnum):
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"
    FAILED = "failed"
    GAVE_UP = "gave_up"
    ALREADY_RECEIVED = "already_received"


class RunState(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"  # everything found was handled (or the cap was reached; see message)
    STOPPED = "stopped"  # the window closed or the scheduler stopped: the rest is for the next run
    INTERRUPTED = "interrupted"  # the process died or the run was interrupted mid-series
    FAILED = "failed"  # the archive could not be reached or refused: nothing (more) was fetched
    SKIPPED = "skipped"  # outside the run window


DONE = (SeriesState.RETRIEVED, SeriesState.GAVE_UP, SeriesState.ALREADY_RECEIVED)
HELD = (SeriesState.RETRIEVING, SeriesState.FAILED)  # the node waits for a later pass to fetch the rest

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    expected INTEGER,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    run_id INTEGER,
    next_attempt_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    schedule TEXT,
    source TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    spec TEXT NOT NULL DEFAULT '{}',
    dry_run INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    studies INTEGER NOT NULL DEFAULT 0,
    series_fetched INTEGER NOT NULL DEFAULT 0,
    series_skipped INTEGER NOT NULL DEFAULT 0,
    series_failed INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_schedule ON runs (schedule, started_at);
"""


@dataclass(frozen=True)
class SeriesProgress:
    series_uid: str
    study_uid: str
    source: str
    state: SeriesState
    description: str
    expected: int | None
    completed: int
    failed: int
    attempts: int
    last_error: str
    run_id: int | None
    next_attempt_at: float | None
    created_at: float  # when a pass first claimed (or recorded) it
    updated_at: float


@dataclass(frozen=True)
class Run:
    id: int
    kind: str
    schedule: str | None
    source: str
    pid: int
    state: RunState
    message: str
    dry_run: bool
    studies: int
    series_fetched: int
    series_skipped: int
    series_failed: int
    instances: int
    started_at: float
    finished_at: float | None
    spec: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "schedule": self.schedule, "source": self.source,
                "state": str(self.state), "message": self.message, "dry_run": self.dry_run, "studies": self.studies,
                "series_fetched": self.series_fetched, "series_skipped": self.series_skipped,
                "series_failed": self.series_failed, "instances": self.instances, "started_at": self.started_at,
                "finished_at": self.finished_at}


def _series(row: sqlite3.Row) -> SeriesProgress:
    return SeriesProgress(row["series_uid"], row["study_uid"], row["source"], SeriesState(row["state"]),
                          row["description"], row["expected"], row["completed"], row["failed"], row["attempts"],
                          row["last_error"], row["run_id"], row["next_attempt_at"], row["created_at"],
                          row["updated_at"])


def _run(row: sqlite3.Row) -> Run:
    return Run(row["id"], row["kind"], row["schedule"], row["source"], row["pid"], RunState(row["state"]),
               row["message"], bool(row["dry_run"]), row["studies"], row["series_fetched"], row["series_skipped"],
               row["series_failed"], row["instances"], row["started_at"], row["finished_at"], json.loads(row["spec"]))


def _lock_held(path: Path) -> bool:
    """Does some process (this one included, through another descriptor) hold an flock on ``path``?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the probe's own shared lock
    return False


def _held(state: SeriesState, updated_at: float, max_hold_s: float, now: float) -> bool:
    """The one rule of :meth:`ProgressStore.incomplete_retrieval`: an unfinished retrieval, recently active."""
    return state in HELD and now - updated_at < max_hold_s


class ProgressStore(SqliteStore):
    """The progress database; thread-safe, shared by the node's scheduler and command-line passes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "progress", (_SCHEMA,))
        self._host = socket.gethostname()
        self._lock_dir = self.path.parent / "locks"
        self._run_locks: dict[int, int] = {}  # run id -> descriptor holding its liveness lock

    def close(self) -> None:
        """Close the database; runs still held by this store are no longer alive (they count as interrupted)."""
        with self._lock:
            for run_id in list(self._run_locks):
                self._release(run_id)
        super().close()

    def _run_lock(self, run_id: int) -> Path:
        return self._lock_dir / f"run-{run_id}.lock"

    def _release(self, run_id: int) -> None:
        fd = self._run_locks.pop(run_id, None)
        if fd is not None:
            self._run_lock(run_id).unlink(missing_ok=True)
            os.close(fd)  # releases the flock

    @classmethod
    def open(cls, storage_dir: Path) -> ProgressStore:
        return cls(Path(storage_dir) / "retro" / PROGRESS_FILE)

    # -- runs ---------------------------------------------------------------------------------------------------

    def start_run(self, kind: str, source: str, spec: Mapping[str, Any], *, schedule: str | None = None,
                  dry_run: bool = False) -> int:
        now = time.time()
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        fd = -1
        try:
            with self._tx() as db:
                cur = db.execute("INSERT INTO runs (kind, schedule, source, pid, host, spec, dry_run, state, "
                                 "started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (kind, schedule, source, os.getpid(), self._host,
                                  json.dumps(dict(spec), default=str), int(dry_run), str(RunState.RUNNING), now))
                run_id = int(cur.lastrowid or 0)
                # locked before the commit: no other process sees the run without its lock held
                fd = os.open(self._run_lock(run_id), os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        with self._lock:
            self._run_locks[run_id] = fd
        return run_id

    def update_run(self, run_id: int, **counts: int) -> None:
        allowed = {"studies", "series_fetched", "series_skipped", "series_failed", "instances"}
        if not set(counts) <= allowed:
            raise ValueError(f"counts: unknown keys {sorted(set(counts) - allowed)}")
        if not counts:
            return
        sets = ", ".join(f"{k} = ?" for k in counts)
        with self._tx() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*counts.values(), run_id))

    def finish_run(self, run_id: int, state: RunState, message: str = "") -> None:
        with self._tx() as db:
            db.execute("UPDATE runs SET state = ?, message = ?, finished_at = ? WHERE id = ? AND state = ?",
                       (str(state), message[:2000], time.time(), run_id, str(RunState.RUNNING)))
        with self._lock:
            self._release(run_id)

    def run(self, run_id: int) -> Run | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else _run(row)

    def runs(self, schedule: str | None = None, limit: int = 20) -> list[Run]:
        sql, args = "SELECT * FROM runs", []
        if schedule is not None:
            sql += " WHERE schedule = ?"
            args.append(schedule)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [_run(r) for r in rows]

    def last_runs(self) -> dict[str, Run]:
        """The latest run of each schedule."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM runs WHERE id IN (SELECT MAX(id) FROM runs "
                                    "WHERE schedule IS NOT NULL GROUP BY schedule)").fetchall()
        return {r["schedule"]: _run(r) for r in rows}

    def _alive(self, run_id: int | None) -> bool:
        """Is run ``run_id`` still running somewhere (its liveness lock is held)?"""
        return run_id is not None and (run_id in self._run_locks or _lock_held(self._run_lock(run_id)))

    def reap_dead_runs(self) -> int:
        """Runs left 'running' whose lock nobody holds (their process died, or closed its store) -> interrupted."""
        now = time.time()
        with self._tx() as db:
            running = [r["id"] for r in db.execute("SELECT id FROM runs WHERE state = ?", (str(RunState.RUNNING),))]
            dead = [run_id for run_id in running if not self._alive(run_id)]
            for run_id in dead:
                db.execute("UPDATE runs SET state = ?, message = ?, finished_at = ? WHERE id = ?",
                           (str(RunState.INTERRUPTED), "the process running it ended", now, run_id))
                self._run_lock(run_id).unlink(missing_ok=True)
        return len(dead)

    # -- series -------------------------------------------------------------------------------------------------

    def series(self, series_uid: str) -> SeriesProgress | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return None if row is None else _series(row)

    def all_series(self, states: tuple[SeriesState, ...] = ()) -> list[SeriesProgress]:
        sql, args = "SELECT * FROM series", [str(s) for s in states]
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY updated_at", args).fetchall()
        return [_series(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r["state"]: r["n"] for r in self._db.execute(
                "SELECT state, COUNT(*) AS n FROM series GROUP BY state")}

    def interrupted(self) -> list[SeriesProgress]:
        """Series left 'retrieving' by a run that is no longer alive."""
        return [s for s in self.all_series((SeriesState.RETRIEVING,)) if not self._alive(s.run_id)]

    def claim(self, series_uid: str, study_uid: str, source: str, run_id: int, *, description: str = "",
              expected: int | None = None, now: float | None = None) -> SeriesProgress | None:
        """Take a series for retrieval by ``run_id``: new, failed and due, or interrupted. None if not available.

        A compare-and-swap in one immediate transaction (no other writer in between, in any process): the
        update only applies to the state observed, and an interrupted series only to the dead run observed.
        """
        now = time.time() if now is None else now
        with self._tx() as db:
            current = db.execute("SELECT state, run_id, next_attempt_at FROM series WHERE series_uid = ?",
                                 (series_uid,)).fetchone()
            if current is None:
                db.execute("INSERT INTO series (series_uid, study_uid, source, state, description, expected, "
                           "attempts, run_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
                           (series_uid, study_uid, source, str(SeriesState.RETRIEVING), description[:200],
                            expected, run_id, now, now))
            else:
                state, held_by, due_at = current["state"], current["run_id"], current["next_attempt_at"]
                if state == SeriesState.RETRIEVING and not self._alive(held_by):
                    condition, args = "state = ? AND run_id IS ?", (state, held_by)
                elif state == SeriesState.FAILED and (due_at is None or due_at <= now):
                    condition, args = "state = ? AND next_attempt_at IS ?", (state, due_at)
                else:
                    return None
                n = db.execute("UPDATE series SET state = ?, source = ?, run_id = ?, attempts = attempts + 1, "
                               f"expected = COALESCE(?, expected), updated_at = ? WHERE series_uid = ? AND {condition}",
                               (str(SeriesState.RETRIEVING), source, run_id, expected, now, series_uid, *args)).rowcount
                if n != 1:
                    return None
            row = db.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return _series(row)

    def record_progress(self, series_uid: str, completed: int, failed: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET completed = ?, failed = ?, updated_at = ? WHERE series_uid = ?",
                       (completed, failed, time.time(), series_uid))

    def retrieved(self, series_uid: str, completed: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE series SET state = ?, completed = ?, failed = 0, last_error = '', "
                       "next_attempt_at = NULL, updated_at = ? WHERE series_uid = ?",
                       (str(SeriesState.RETRIEVED), completed, time.time(), series_uid))

    def failed(self, series_uid: str, error: str, *, retry_after_s: float, max_attempts: int) -> SeriesState:
        """retrieving -> failed (due again after ``retry_after_s``) or gave_up after ``max_attempts``."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
            attempts = row["attempts"] if row is not None else max_attempts
            state = SeriesState.GAVE_UP if attempts >= max_attempts else SeriesState.FAILED
            db.execute("UPDATE series SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ? "
                       "WHERE series_uid = ?",
                       (str(state), error[:500], now + retry_after_s, now, series_uid))
        return state

    def already_received(self, series_uid: str, study_uid: str, source: str, description: str = "") -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO series (series_uid, study_uid, source, state, description, created_at, "
                       "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (series_uid, study_uid, source, str(SeriesState.ALREADY_RECEIVED), description[:200], now, now))

    def retry(self, series_uid: str) -> bool:
        """Make a failed or given-up series due now (attempts reset)."""
        with self._tx() as db:
            return db.execute("UPDATE series SET state = ?, attempts = 0, next_attempt_at = NULL, updated_at = ? "
                              "WHERE series_uid = ? AND state IN (?, ?)",
                              (str(SeriesState.FAILED), time.time(), series_uid, str(SeriesState.FAILED),
                               str(SeriesState.GAVE_UP))).rowcount == 1

    def incomplete_retrieval(self, series_uid: str, max_hold_s: float, now: float | None = None) -> str | None:
        """Why the node should not process ``series_uid`` yet, or None.

        A series still being retrieved, interrupted mid-retrieval, or failed part-way with a retry to come
        is incomplete in the node's spool: a later pass fetches the missing instances. Held for at most
        ``max_hold_s`` after the last retrieval activity (then the node processes what it has).
        """
        record = self.series(series_uid)
        now = time.time() if now is None else now
        if record is None or not _held(record.state, record.updated_at, max_hold_s, now):
            return None
        of = f" of {record.expected}" if record.expected else ""
        if record.state is SeriesState.FAILED:
            return (f"its retrieval from {record.source} failed after {record.completed}{of} instances "
                    f"({record.last_error}); a later pass fetches the rest")
        return f"its retrieval from {record.source} is under way or was interrupted ({record.completed}{of} instances)"

    def held_series(self, max_hold_s: float, now: float | None = None) -> set[str]:
        """The series :meth:`incomplete_retrieval` holds back from processing now."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(f"SELECT series_uid, state, updated_at FROM series WHERE state IN "
                                    f"({','.join('?' * len(HELD))})", tuple(map(str, HELD))).fetchall()
        return {r["series_uid"] for r in rows if _held(SeriesState(r["state"]), r["updated_at"], max_hold_s, now)}

    def last_study_started_at(self, source: str) -> float | None:
        """The latest retrieval activity for ``source`` (so the rate limit also spans passes)."""
        with self._lock:
            row = self._db.execute("SELECT MAX(updated_at) AS t FROM series WHERE source = ? AND attempts > 0",
                                   (source,)).fetchone()
        return None if row["t"] is None else float(row["t"])
