"""Durable job and delivery state (SQLite, WAL, fsync on commit): the truth every stage hands over through.

A job is one claimed version of one series (id ``<SeriesInstanceUID>-v<N>``). Its state moves

    queued -> processing -> processed -> delivered        (results sent to every destination)
                         -> rejected                      (the pipeline says: not an MPRAGE volume)
                         -> queued (retry) ... -> failed  (processing errors, max_attempts runs)
    ignored                                              (the series rules said no; never processed)

Each job with results has one delivery per destination: ``pending -> sending -> sent``, or back to
``pending`` with a later ``next_attempt_at`` after a failed attempt, and ``dead`` after the last
allowed attempt. Transitions are single conditional UPDATEs, so a stage that finds the row in an
unexpected state does nothing: a task delivered twice by the queue runs once. After a crash,
``recover_interrupted`` puts ``processing`` jobs back to ``queued`` (``failed`` once the process has
ended during their run ``jobs.max_attempts`` times) and ``sending`` deliveries back to ``pending``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from dicom_node.sqlite_state import SqliteState


class JobState(StrEnum):
    IGNORED = "ignored"
    QUEUED = "queued"
    PROCESSING = "processing"
    PROCESSED = "processed"
    DELIVERED = "delivered"
    REJECTED = "rejected"
    FAILED = "failed"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


TERMINAL = (JobState.IGNORED, JobState.DELIVERED, JobState.REJECTED, JobState.FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    study_uid TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    results TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    purged_at REAL,
    UNIQUE (series_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL,
    sent_at REAL,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
"""


def job_id_for(series_uid: str, version: int) -> str:
    return f"{series_uid}-v{version}"


@dataclass(frozen=True)
class Delivery:
    job_id: str
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str
    updated_at: float
    sent_at: float | None


@dataclass(frozen=True)
class Job:
    id: str
    series_uid: str
    version: int
    study_uid: str
    state: JobState
    reason: str
    instances: int
    attempts: int
    results: tuple[str, ...]
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    purged_at: float | None
    deliveries: tuple[Delivery, ...] = field(default=())


def _job(row: sqlite3.Row, deliveries: Sequence[Delivery] = ()) -> Job:
    return Job(row["id"], row["series_uid"], row["version"], row["study_uid"], JobState(row["state"]),
               row["reason"], row["instances"], row["attempts"], tuple(json.loads(row["results"])),
               row["created_at"], row["updated_at"], row["started_at"], row["finished_at"], row["purged_at"],
               tuple(deliveries))


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(row["job_id"], row["destination"], DeliveryState(row["state"]), row["attempts"],
                    row["next_attempt_at"], row["last_error"], row["updated_at"], row["sent_at"])


class JobStore(SqliteState):
    """The state database of one node (``<storage_dir>/jobs.sqlite``); thread-safe, shareable by processes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    # -- reading -------------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            deliveries = [_delivery(r) for r in self._db.execute(
                "SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination", (job_id,))]
        return _job(row, deliveries)

    def find(self, text: str) -> list[Job]:
        """Jobs whose id is ``text`` or starts with it, or whose series UID is ``text``."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM jobs WHERE id = ? OR series_uid = ? OR id LIKE ? ESCAPE '\\' "
                                    "ORDER BY created_at",
                                    (text, text, text.replace("%", r"\%").replace("_", r"\_") + "%")).fetchall()
        jobs = [self.job(r["id"]) for r in rows]
        return [j for j in jobs if j is not None]

    def jobs(self, states: Sequence[JobState] = (), limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally only in ``states``."""
        sql = "SELECT * FROM jobs"
        args: list[object] = []
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            args += [str(s) for s in states]
        sql += " ORDER BY created_at DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
            ids = [r["id"] for r in rows]
            dels: dict[str, list[Delivery]] = {i: [] for i in ids}
            if ids:
                for r in self._db.execute(f"SELECT * FROM deliveries WHERE job_id IN ({','.join('?' * len(ids))}) "
                                          "ORDER BY destination", ids):
                    dels[r["job_id"]].append(_delivery(r))
        return [_job(r, dels[r["id"]]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state and deliveries per state (keys ``job:<state>``, ``delivery:<state>``)."""
        out: dict[str, int] = {}
        with self._lock:
            for r in self._db.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                out[f"job:{r['state']}"] = r["n"]
            for r in self._db.execute("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state"):
                out[f"delivery:{r['state']}"] = r["n"]
        return out

    def next_version(self, series_uid: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(version) AS v FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone()
        return int(row["v"] or 0) + 1

    def has_job(self, series_uid: str, version: int) -> bool:
        return self.job(job_id_for(series_uid, version)) is not None

    # -- jobs ---------------------------------------------------------------------------------------------------------

    def create_job(self, series_uid: str, version: int, study_uid: str, instances: int, state: JobState,
                   reason: str) -> Job:
        """Insert the job of a claimed version (no-op if it exists) and return it."""
        now = time.time()
        job_id = job_id_for(series_uid, version)
        finished = now if state in TERMINAL else None
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO jobs (id, series_uid, version, study_uid, state, reason, instances, "
                       "created_at, updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, series_uid, version, study_uid, str(state), reason, instances, now, now, finished))
        job = self.job(job_id)
        assert job is not None
        return job

    def queued(self, series_uid: str | None = None) -> list[str]:
        """Ids of the queued jobs, oldest first; of every series or of ``series_uid``."""
        sql = "SELECT id FROM jobs WHERE state = ?"
        args = [str(JobState.QUEUED)]
        if series_uid is not None:
            sql += " AND series_uid = ?"
            args.append(series_uid)
        with self._lock:
            return [r["id"] for r in self._db.execute(sql + " ORDER BY created_at", args)]

    def start_job(self, job_id: str) -> Job | None:
        """queued -> processing (one more attempt); None if the job is not queued (already taken or done)."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?, updated_at = ? "
                           "WHERE id = ? AND state = ?",
                           (str(JobState.PROCESSING), now, now, job_id, str(JobState.QUEUED))).rowcount
        return self.job(job_id) if n == 1 else None

    def finish_job(self, job_id: str, results: Sequence[Path], destinations: Sequence[str]) -> None:
        """processing -> processed, with the result files and one pending delivery per destination."""
        now = time.time()
        paths = json.dumps([str(p) for p in results])
        state = JobState.PROCESSED if destinations and results else JobState.DELIVERED
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET state = ?, results = ?, reason = '', updated_at = ?, finished_at = ? "
                           "WHERE id = ? AND state = ?",
                           (str(state), paths, now, now, job_id, str(JobState.PROCESSING))).rowcount
            if n != 1:
                raise ValueError(f"job {job_id}: cannot finish, it is not processing")
            if state is JobState.PROCESSED:
                db.executemany("INSERT OR REPLACE INTO deliveries (job_id, destination, state, attempts, "
                               "next_attempt_at, updated_at) VALUES (?, ?, ?, 0, ?, ?)",
                               [(job_id, d, str(DeliveryState.PENDING), now, now) for d in destinations])

    def end_job(self, job_id: str, state: JobState, reason: str) -> None:
        """processing -> rejected, failed, or queued again (a retry), with the reason."""
        if state not in (JobState.REJECTED, JobState.FAILED, JobState.QUEUED):
            raise ValueError(f"state: expected rejected, failed or queued, got {state}")
        now = time.time()
        finished = None if state is JobState.QUEUED else now
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = ? "
                       "WHERE id = ? AND state = ?",
                       (str(state), reason, now, finished, job_id, str(JobState.PROCESSING)))

    def recover_interrupted(self, max_interruptions: int) -> tuple[int, list[str], int]:
        """At start: jobs left ``processing`` (the process ended during their run: a crash, kill -9, or a stop
        whose drain time ran out) go back to ``queued``, their unfinished run not counted as an attempt; a
        job the process ended in ``max_interruptions`` times is ``failed`` instead (a series that kills the
        process must not be run at every restart). Sending deliveries go back to pending.

        Returns (jobs queued again, ids of the jobs failed, deliveries pending again).
        """
        now = time.time()
        processing = str(JobState.PROCESSING)
        with self._tx() as db:
            db.execute("UPDATE jobs SET interruptions = interruptions + 1, attempts = MAX(attempts - 1, 0) "
                       "WHERE state = ?", (processing,))
            failed = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE state = ? AND interruptions >= ? "
                                                  "ORDER BY id", (processing, max_interruptions))]
            db.execute("UPDATE jobs SET state = :failed, reason = 'the process ended while processing it, ' "
                       "|| interruptions || ' times', updated_at = :now, finished_at = :now "
                       "WHERE state = :processing AND interruptions >= :max",
                       {"failed": str(JobState.FAILED), "max": max_interruptions, "now": now,
                        "processing": processing})
            jobs = db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                              (str(JobState.QUEUED), now, processing)).rowcount
            dels = db.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE state = ?",
                              (str(DeliveryState.PENDING), now, str(DeliveryState.SENDING))).rowcount
        return jobs, failed, dels

    def retry(self, job_id: str) -> list[str]:
        """Make a failed/rejected job or its dead/pending deliveries go again now; say what was changed."""
        now = time.time()
        done = []
        with self._tx() as db:
            n = db.execute("UPDATE jobs SET state = ?, attempts = 0, interruptions = 0, reason = '', updated_at = ?, "
                           "finished_at = NULL "
                           "WHERE id = ? AND state IN (?, ?)",
                           (str(JobState.QUEUED), now, job_id, str(JobState.FAILED), str(JobState.REJECTED))).rowcount
            if n:
                done.append("processing queued")
            rows = db.execute("SELECT destination FROM deliveries WHERE job_id = ? AND state IN (?, ?)",
                              (job_id, str(DeliveryState.DEAD), str(DeliveryState.PENDING))).fetchall()
            db.execute("UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                       "WHERE job_id = ? AND state IN (?, ?)",
                       (str(DeliveryState.PENDING), now, now, job_id, str(DeliveryState.DEAD),
                        str(DeliveryState.PENDING)))
            if rows:
                db.execute("UPDATE jobs SET state = ?, updated_at = ?, finished_at = NULL WHERE id = ? AND state = ?",
                           (str(JobState.PROCESSED), now, job_id, str(JobState.DELIVERED)))
                done += [f"delivery to {r['destination']} pending" for r in rows]
        return done

    # -- deliveries --------------------------------------------------------------------------------------------------

    def due_deliveries(self, now: float, busy: Sequence[str] = ()) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deliveries WHERE state = ? AND next_attempt_at <= ? "
                                    "ORDER BY next_attempt_at", (str(DeliveryState.PENDING), now)).fetchall()
        return [_delivery(r) for r in rows if r["destination"] not in busy]

    def next_delivery_at(self) -> float | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE state = ?",
                                   (str(DeliveryState.PENDING),)).fetchone()
        return None if row["t"] is None else float(row["t"])

    def start_delivery(self, job_id: str, destination: str) -> Delivery | None:
        """pending -> sending (one more attempt); None if it is not pending."""
        now = time.time()
        with self._tx() as db:
            n = db.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, updated_at = ? "
                           "WHERE job_id = ? AND destination = ? AND state = ?",
                           (str(DeliveryState.SENDING), now, job_id, destination,
                            str(DeliveryState.PENDING))).rowcount
            row = db.execute("SELECT * FROM deliveries WHERE job_id = ? AND destination = ?",
                             (job_id, destination)).fetchone()
        return _delivery(row) if n == 1 else None

    def delivery_sent(self, job_id: str, destination: str) -> bool:
        """sending -> sent; the job becomes delivered when every delivery is sent. True if it did."""
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = ?, last_error = '', updated_at = ?, sent_at = ? "
                       "WHERE job_id = ? AND destination = ? AND state = ?",
                       (str(DeliveryState.SENT), now, now, job_id, destination, str(DeliveryState.SENDING)))
            left = db.execute("SELECT COUNT(*) AS n FROM deliveries WHERE job_id = ? AND state != ?",
                              (job_id, str(DeliveryState.SENT))).fetchone()["n"]
            if left == 0:
                db.execute("UPDATE jobs SET state = ?, updated_at = ?, finished_at = ? WHERE id = ? AND state = ?",
                           (str(JobState.DELIVERED), now, now, job_id, str(JobState.PROCESSED)))
        return left == 0

    def delivery_failed(self, job_id: str, destination: str, error: str, retry_at: float | None) -> None:
        """sending -> pending again at ``retry_at``, or -> dead when ``retry_at`` is None."""
        now = time.time()
        state = DeliveryState.DEAD if retry_at is None else DeliveryState.PENDING
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = ?, last_error = ?, next_attempt_at = ?, updated_at = ? "
                       "WHERE job_id = ? AND destination = ? AND state = ?",
                       (str(state), error[:500], retry_at if retry_at is not None else now, now, job_id, destination,
                        str(DeliveryState.SENDING)))
            if state is DeliveryState.DEAD:
                db.execute("UPDATE jobs SET finished_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))

    # -- retention ---------------------------------------------------------------------------------------------------

    def purgeable(self, cutoffs: dict[str, float]) -> list[Job]:
        """Unpurged jobs whose folders may go: state (or 'dead' for a job with a dead delivery) -> cutoff time."""
        out = []
        for job in self.jobs():
            if job.purged_at is not None or job.finished_at is None:
                continue
            key = "dead" if any(d.state is DeliveryState.DEAD for d in job.deliveries) else str(job.state)
            if key in cutoffs and job.finished_at <= cutoffs[key]:
                out.append(job)
        return out

    def mark_purged(self, job_id: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE jobs SET purged_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))
