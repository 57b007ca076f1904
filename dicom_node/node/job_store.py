"""Durable job and delivery state, and the queue itself: the truth every stage hands over through.

A job is one claimed version of one series (id ``<SeriesInstanceUID>-v<N>``). Its state moves

    queued -> processing -> processed -> delivered        (results sent to every destination)
                         -> rejected                      (the pipeline says: not an MPRAGE volume)
                         -> queued (retry, after a back-off) ... -> failed  (errors, ``jobs.max_attempts`` runs)
    ignored                                              (the series rules said no; never processed)

The ``jobs`` table is the queue: a worker claims the oldest due ``queued`` row with one conditional
UPDATE (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), which records the worker (``owner``) and a fresh
``run_token``. Finishing, failing or releasing a run is conditional on that token, so a run whose job
was taken over can never complete it a second time. Every process (node, worker) is a *member* with a
heartbeat; a processing job (or a sending delivery) whose owner's heartbeat is older than
``jobs.takeover_s`` is taken over: queued again, counted as an interruption, and ``failed`` once
workers died in it ``jobs.max_attempts`` times (a series that kills workers must not kill them forever).

Each job with results has one delivery per destination: ``pending -> sending -> sent``, or back to
``pending`` with a later ``next_attempt_at`` after a failed attempt, and ``dead`` after the last
allowed attempt. Named, expiring *locks* give one owner per series hand-over and per housekeeping pass
when several nodes share the database.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from dicom_node.state_db import PostgresDatabase, Row, SqliteDatabase, StateDatabase, Tx


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
STORE_NAME = "jobs"
STATE_FILE = "jobs.sqlite"  # the SQLite job store in the storage folder

# Version 1 is the schema of synthmrf 0.1 (an existing file already has it: CREATE ... IF NOT EXISTS).
_V1 = """
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
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    purged_at DOUBLE PRECISION,
    UNIQUE (series_uid, version)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    updated_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION,
    PRIMARY KEY (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at)
"""

# Version 2: the job store is the queue (owner, run token, due time), members with heartbeats, locks.
_V2 = """
ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN run_token TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN not_before DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN owner TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, not_before, created_at);
CREATE TABLE IF NOT EXISTS members (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_started_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '',
    started_at DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
)
"""

SCHEMA = (_V1, _V2)


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
    interruptions: int = 0
    owner: str = ""
    run_token: str = ""
    not_before: float = 0.0


@dataclass(frozen=True)
class Member:
    """A process of the installation: a node (``serve``) or a pipeline worker, with its heartbeat."""

    id: str
    kind: str
    host: str
    pid: int
    pid_started_at: float
    detail: str
    started_at: float
    heartbeat_at: float


def _job(row: Row, deliveries: Sequence[Delivery] = ()) -> Job:
    return Job(row["id"], row["series_uid"], row["version"], row["study_uid"], JobState(row["state"]),
               row["reason"], row["instances"], row["attempts"], tuple(json.loads(row["results"])),
               row["created_at"], row["updated_at"], row["started_at"], row["finished_at"], row["purged_at"],
               tuple(deliveries), row["interruptions"], row["owner"], row["run_token"], row["not_before"])


def _delivery(row: Row) -> Delivery:
    return Delivery(row["job_id"], row["destination"], DeliveryState(row["state"]), row["attempts"],
                    row["next_attempt_at"], row["last_error"], row["updated_at"], row["sent_at"])


def _member(row: Row) -> Member:
    return Member(row["id"], row["kind"], row["host"], row["pid"], row["pid_started_at"], row["detail"],
                  row["started_at"], row["heartbeat_at"])


def _marks(n: int) -> str:
    return ",".join("?" * n)


def process_started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), or None if there is no such process."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def new_member_id(kind: str) -> str:
    """``<kind>@<host>:<pid>:<random>``: unique even when a pid is reused."""
    return f"{kind}@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobStore:
    """Jobs, deliveries, members and locks in one state database; thread-safe, shared by processes/machines."""

    def __init__(self, db: StateDatabase) -> None:
        self.db = db
        self.db.migrate(STORE_NAME, SCHEMA)

    @classmethod
    def sqlite(cls, path: Path) -> JobStore:
        return cls(SqliteDatabase(path))

    @classmethod
    def postgres(cls, url: str) -> JobStore:
        return cls(PostgresDatabase(url))

    def close(self) -> None:
        self.db.close()

    def __str__(self) -> str:
        return str(self.db)

    # -- reading -------------------------------------------------------------------------------------------------

    def _deliveries_of(self, tx: Tx, ids: Sequence[str]) -> dict[str, list[Delivery]]:
        out: dict[str, list[Delivery]] = {i: [] for i in ids}
        for chunk in (ids[i:i + 500] for i in range(0, len(ids), 500)):
            for r in tx.execute(f"SELECT * FROM deliveries WHERE job_id IN ({_marks(len(chunk))}) "
                                "ORDER BY destination", chunk).fetchall():
                out[r["job_id"]].append(_delivery(r))
        return out

    def job(self, job_id: str) -> Job | None:
        with self.db.tx() as tx:
            row = tx.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            return _job(row, self._deliveries_of(tx, [job_id])[job_id])

    def find(self, text: str) -> list[Job]:
        """Jobs whose id is ``text`` or starts with it, or whose series UID is ``text``."""
        pattern = text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"
        rows = self.db.read("SELECT id FROM jobs WHERE id = ? OR series_uid = ? OR id LIKE ? ESCAPE '\\' "
                            "ORDER BY created_at", (text, text, pattern))
        jobs = [self.job(r["id"]) for r in rows]
        return [j for j in jobs if j is not None]

    def jobs(self, states: Sequence[JobState] = (), limit: int | None = None) -> list[Job]:
        """Jobs newest first, optionally only in ``states``."""
        sql = "SELECT * FROM jobs"
        args: list[object] = []
        if states:
            sql += f" WHERE state IN ({_marks(len(states))})"
            args += [str(s) for s in states]
        sql += " ORDER BY created_at DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self.db.tx() as tx:
            rows = tx.execute(sql, args).fetchall()
            dels = self._deliveries_of(tx, [r["id"] for r in rows])
        return [_job(r, dels[r["id"]]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Jobs per state and deliveries per state (keys ``job:<state>``, ``delivery:<state>``)."""
        out: dict[str, int] = {}
        with self.db.tx() as tx:
            for r in tx.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall():
                out[f"job:{r['state']}"] = int(r["n"])
            for r in tx.execute("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state").fetchall():
                out[f"delivery:{r['state']}"] = int(r["n"])
        return out

    def next_version(self, series_uid: str) -> int:
        row = self.db.read("SELECT MAX(version) AS v FROM jobs WHERE series_uid = ?", (series_uid,))[0]
        return int(row["v"] or 0) + 1

    def has_job(self, series_uid: str, version: int) -> bool:
        return bool(self.db.read("SELECT 1 FROM jobs WHERE id = ?", (job_id_for(series_uid, version),)))

    def unfinished_versions(self) -> list[tuple[str, int]]:
        """(series, version) of every queued or processing job: work the node has promised to do."""
        rows = self.db.read("SELECT series_uid, version FROM jobs WHERE state IN (?, ?)",
                            (str(JobState.QUEUED), str(JobState.PROCESSING)))
        return [(r["series_uid"], int(r["version"])) for r in rows]

    def queued(self, series_uid: str | None = None) -> list[str]:
        """Ids of the queued jobs (due or waiting for a retry), oldest first; of every series or of one."""
        sql = "SELECT id FROM jobs WHERE state = ?"
        args = [str(JobState.QUEUED)]
        if series_uid is not None:
            sql += " AND series_uid = ?"
            args.append(series_uid)
        return [r["id"] for r in self.db.read(sql + " ORDER BY created_at", args)]

    # -- jobs ---------------------------------------------------------------------------------------------------------

    def create_job(self, series_uid: str, version: int, study_uid: str, instances: int, state: JobState,
                   reason: str) -> Job:
        """Insert the job of a claimed version (no-op if it exists) and return it."""
        now = time.time()
        job_id = job_id_for(series_uid, version)
        finished = now if state in TERMINAL else None
        with self.db.tx() as tx:
            tx.execute("INSERT INTO jobs (id, series_uid, version, study_uid, state, reason, instances, created_at, "
                       "updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                       (job_id, series_uid, version, study_uid, str(state), reason, instances, now, now, finished))
        job = self.job(job_id)
        assert job is not None
        return job

    def claim_job(self, owner: str) -> Job | None:
        """The oldest due queued job -> processing for ``owner`` (one more attempt, a new run token); None if
        there is none. Safe with any number of workers on any number of machines."""
        now = time.time()
        token = secrets.token_hex(8)
        with self.db.tx() as tx:
            row = tx.execute(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, owner = ?, run_token = ?, started_at = ?, "
                "updated_at = ? WHERE id = (SELECT id FROM jobs WHERE state = ? AND not_before <= ? "
                f"ORDER BY created_at, id LIMIT 1{self.db.skip_locked}) AND state = ? RETURNING id",
                (str(JobState.PROCESSING), owner, token, now, now, str(JobState.QUEUED), now,
                 str(JobState.QUEUED))).fetchone()
        return None if row is None else self.job(row["id"])

    def next_due_at(self) -> float | None:
        """When the next queued job becomes due (None: nothing queued)."""
        row = self.db.read("SELECT MIN(not_before) AS t FROM jobs WHERE state = ?", (str(JobState.QUEUED),))[0]
        return None if row["t"] is None else float(row["t"])

    def finish_job(self, job_id: str, run_token: str, results: Sequence[Path], destinations: Sequence[str]) -> bool:
        """processing -> processed, with the result files and one pending delivery per destination. False (and
        nothing changed) if this run no longer holds the job (it was taken over)."""
        now = time.time()
        paths = json.dumps([str(p) for p in results])
        state = JobState.PROCESSED if destinations and results else JobState.DELIVERED
        with self.db.tx() as tx:
            n = tx.execute("UPDATE jobs SET state = ?, results = ?, reason = '', owner = '', updated_at = ?, "
                           "finished_at = ? WHERE id = ? AND state = ? AND run_token = ?",
                           (str(state), paths, now, now, job_id, str(JobState.PROCESSING), run_token)).rowcount
            if n != 1:
                return False
            for d in destinations if state is JobState.PROCESSED else ():
                tx.execute("INSERT INTO deliveries (job_id, destination, state, attempts, next_attempt_at, "
                           "updated_at) VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (job_id, destination) DO UPDATE SET "
                           "state = excluded.state, attempts = 0, next_attempt_at = excluded.next_attempt_at, "
                           "last_error = '', owner = '', updated_at = excluded.updated_at, sent_at = NULL",
                           (job_id, d, str(DeliveryState.PENDING), now, now))
        return True

    def end_job(self, job_id: str, run_token: str, state: JobState, reason: str, retry_at: float = 0.0) -> bool:
        """processing -> rejected, failed, or queued again (a retry, due at ``retry_at``), with the reason.
        False if this run no longer holds the job."""
        if state not in (JobState.REJECTED, JobState.FAILED, JobState.QUEUED):
            raise ValueError(f"state: expected rejected, failed or queued, got {state}")
        now = time.time()
        finished = None if state is JobState.QUEUED else now
        with self.db.tx() as tx:
            return tx.execute("UPDATE jobs SET state = ?, reason = ?, owner = '', not_before = ?, updated_at = ?, "
                              "finished_at = ? WHERE id = ? AND state = ? AND run_token = ?",
                              (str(state), reason, retry_at, now, finished, job_id, str(JobState.PROCESSING),
                               run_token)).rowcount == 1

    def release_job(self, job_id: str, run_token: str, retry_at: float = 0.0, reason: str | None = None) -> bool:
        """processing -> queued (due at ``retry_at``), the run not counted: its worker was asked to stop, or the
        disk was full. False if this run no longer holds the job."""
        now = time.time()
        with self.db.tx() as tx:
            return tx.execute("UPDATE jobs SET state = ?, owner = '', attempts = CASE WHEN attempts > 0 THEN "
                              "attempts - 1 ELSE 0 END, not_before = ?, reason = COALESCE(?, reason), updated_at = ? "
                              "WHERE id = ? AND state = ? AND run_token = ?",
                              (str(JobState.QUEUED), retry_at, reason, now, job_id, str(JobState.PROCESSING),
                               run_token)).rowcount == 1

    def take_over(self, max_interruptions: int, stale_before: float | None = None,
                  owners: Sequence[str] = (), interruption: bool = True) -> tuple[list[str], list[str], int]:
        """Take over the work of dead members: processing jobs and sending deliveries whose owner is in
        ``owners`` or has no heartbeat since ``stale_before``. Such a job goes back to ``queued`` (the run is
        not an attempt, it is an interruption), or to ``failed`` once it was interrupted ``max_interruptions``
        times; the delivery goes back to ``pending``. ``interruption=False``: a stop that killed its own workers
        (not counted). The run token is cleared, so the old run can no longer finish the job. Returns (ids
        queued again, ids failed, deliveries)."""
        now = time.time()
        dead_sql, args = self._dead_owner_clause(stale_before, owners)
        processing = str(JobState.PROCESSING)
        with self.db.tx() as tx:
            rows = tx.execute(f"SELECT id, interruptions FROM jobs WHERE state = ? AND {dead_sql}{self.db.skip_locked}",
                              (processing, *args)).fetchall()
            requeued, failed = [], []
            for r in rows:
                n = int(r["interruptions"]) + (1 if interruption else 0)
                if interruption and n >= max_interruptions:
                    tx.execute("UPDATE jobs SET state = ?, interruptions = ?, owner = '', run_token = '', reason = ?, "
                               "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, updated_at = ?, "
                               "finished_at = ? WHERE id = ? AND state = ?",
                               (str(JobState.FAILED), n, f"a worker ended while processing it, {n} times (killed, "
                                "out of memory or crashed)", now, now, r["id"], processing))
                    failed.append(r["id"])
                else:
                    tx.execute("UPDATE jobs SET state = ?, interruptions = ?, owner = '', run_token = '', "
                               "attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, not_before = 0, "
                               "updated_at = ? WHERE id = ? AND state = ?",
                               (str(JobState.QUEUED), n, now, r["id"], processing))
                    requeued.append(r["id"])
            dels = tx.execute(f"UPDATE deliveries SET state = ?, owner = '', updated_at = ? WHERE state = ? AND "
                              f"{dead_sql}", (str(DeliveryState.PENDING), now, str(DeliveryState.SENDING),
                                              *args)).rowcount
        return sorted(requeued), sorted(failed), dels

    @staticmethod
    def _dead_owner_clause(stale_before: float | None, owners: Sequence[str]) -> tuple[str, list[object]]:
        parts: list[str] = []
        args: list[object] = []
        if owners:
            parts.append(f"owner IN ({_marks(len(owners))})")
            args += list(owners)
        if stale_before is not None:
            parts.append("owner NOT IN (SELECT id FROM members WHERE heartbeat_at >= ?)")
            args.append(stale_before)
        if not parts:
            raise ValueError("take_over: give owners, stale_before or both")
        return "(" + " OR ".join(parts) + ")", args

    def retry(self, job_id: str) -> list[str]:
        """Make a failed/rejected job or its dead/pending deliveries go again now; say what was changed."""
        now = time.time()
        done = []
        with self.db.tx() as tx:
            n = tx.execute("UPDATE jobs SET state = ?, attempts = 0, interruptions = 0, reason = '', not_before = 0, "
                           "updated_at = ?, finished_at = NULL WHERE id = ? AND state IN (?, ?)",
                           (str(JobState.QUEUED), now, job_id, str(JobState.FAILED),
                            str(JobState.REJECTED))).rowcount
            if n:
                done.append("processing queued")
            rows = tx.execute("SELECT destination FROM deliveries WHERE job_id = ? AND state IN (?, ?) "
                              "ORDER BY destination", (job_id, str(DeliveryState.DEAD),
                                                       str(DeliveryState.PENDING))).fetchall()
            tx.execute("UPDATE deliveries SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ? "
                       "WHERE job_id = ? AND state IN (?, ?)",
                       (str(DeliveryState.PENDING), now, now, job_id, str(DeliveryState.DEAD),
                        str(DeliveryState.PENDING)))
            if rows:
                tx.execute("UPDATE jobs SET state = ?, updated_at = ?, finished_at = NULL WHERE id = ? AND state = ?",
                           (str(JobState.PROCESSED), now, job_id, str(JobState.DELIVERED)))
                done += [f"delivery to {r['destination']} pending" for r in rows]
        return done

    # -- deliveries --------------------------------------------------------------------------------------------------

    def due_deliveries(self, now: float, busy: Sequence[str] = ()) -> list[Delivery]:
        rows = self.db.read("SELECT * FROM deliveries WHERE state = ? AND next_attempt_at <= ? "
                            "ORDER BY next_attempt_at", (str(DeliveryState.PENDING), now))
        return [_delivery(r) for r in rows if r["destination"] not in busy]

    def next_delivery_at(self) -> float | None:
        row = self.db.read("SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE state = ?",
                           (str(DeliveryState.PENDING),))[0]
        return None if row["t"] is None else float(row["t"])

    def start_delivery(self, job_id: str, destination: str, owner: str = "") -> Delivery | None:
        """pending -> sending by ``owner`` (one more attempt); None if it is not pending."""
        now = time.time()
        with self.db.tx() as tx:
            row = tx.execute("UPDATE deliveries SET state = ?, attempts = attempts + 1, owner = ?, updated_at = ? "
                             "WHERE job_id = ? AND destination = ? AND state = ? RETURNING *",
                             (str(DeliveryState.SENDING), owner, now, job_id, destination,
                              str(DeliveryState.PENDING))).fetchone()
        return None if row is None else _delivery(row)

    def delivery_sent(self, job_id: str, destination: str, detail: str = "") -> bool:
        """sending -> sent (``detail``: what went and what the destination refused, kept in ``last_error``); the
        job becomes delivered when every delivery is sent. True if it did."""
        now = time.time()
        with self.db.tx() as tx:
            tx.execute("UPDATE deliveries SET state = ?, last_error = ?, owner = '', updated_at = ?, sent_at = ? "
                       "WHERE job_id = ? AND destination = ? AND state = ?",
                       (str(DeliveryState.SENT), detail[:500], now, now, job_id, destination,
                        str(DeliveryState.SENDING)))
            left = tx.execute("SELECT COUNT(*) AS n FROM deliveries WHERE job_id = ? AND state != ?",
                              (job_id, str(DeliveryState.SENT))).fetchone()["n"]
            if left == 0:
                tx.execute("UPDATE jobs SET state = ?, updated_at = ?, finished_at = ? WHERE id = ? AND state = ?",
                           (str(JobState.DELIVERED), now, now, job_id, str(JobState.PROCESSED)))
        return bool(left == 0)

    def delivery_failed(self, job_id: str, destination: str, error: str, retry_at: float | None) -> None:
        """sending -> pending again at ``retry_at``, or -> dead when ``retry_at`` is None."""
        now = time.time()
        state = DeliveryState.DEAD if retry_at is None else DeliveryState.PENDING
        with self.db.tx() as tx:
            tx.execute("UPDATE deliveries SET state = ?, last_error = ?, owner = '', next_attempt_at = ?, "
                       "updated_at = ? WHERE job_id = ? AND destination = ? AND state = ?",
                       (str(state), error[:500], retry_at if retry_at is not None else now, now, job_id, destination,
                        str(DeliveryState.SENDING)))
            if state is DeliveryState.DEAD:
                tx.execute("UPDATE jobs SET finished_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))

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
        with self.db.tx() as tx:
            tx.execute("UPDATE jobs SET purged_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))

    # -- members (processes with heartbeats) ---------------------------------------------------------------------------

    def join(self, member_id: str, kind: str, detail: str = "") -> None:
        """Register this process (pid, host, its start time) as a member with a fresh heartbeat."""
        now = time.time()
        pid = os.getpid()
        with self.db.tx() as tx:
            tx.execute("INSERT INTO members (id, kind, host, pid, pid_started_at, detail, started_at, heartbeat_at) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET heartbeat_at = "
                       "excluded.heartbeat_at, detail = excluded.detail",
                       (member_id, kind, socket.gethostname(), pid, process_started_at(pid) or 0.0, detail, now, now))

    def beat(self, member_id: str, detail: str | None = None) -> bool:
        """Renew a member's heartbeat (and its detail); False if the member is gone (it was declared dead)."""
        now = time.time()
        with self.db.tx() as tx:
            if detail is None:
                n = tx.execute("UPDATE members SET heartbeat_at = ? WHERE id = ?", (now, member_id)).rowcount
            else:
                n = tx.execute("UPDATE members SET heartbeat_at = ?, detail = ? WHERE id = ?",
                               (now, detail, member_id)).rowcount
        return bool(n == 1)

    def leave(self, member_id: str) -> None:
        with self.db.tx() as tx:
            tx.execute("DELETE FROM members WHERE id = ?", (member_id,))
            tx.execute("DELETE FROM locks WHERE owner = ?", (member_id,))

    def members(self) -> list[Member]:
        return [_member(r) for r in self.db.read("SELECT * FROM members ORDER BY kind, host, started_at")]

    def dead_local_members(self) -> list[str]:
        """Members registered from this machine whose process no longer runs (pid gone or reused)."""
        host = socket.gethostname()
        dead = []
        for m in self.members():
            if m.host != host:
                continue
            started = process_started_at(m.pid)
            if started is None or (m.pid_started_at and abs(started - m.pid_started_at) > 1.0):
                dead.append(m.id)
        return dead

    def forget_members(self, member_ids: Sequence[str] = (), stale_before: float | None = None) -> int:
        """Remove members (given, or silent since ``stale_before``) and their locks."""
        removed = 0
        with self.db.tx() as tx:
            if member_ids:
                tx.execute(f"DELETE FROM locks WHERE owner IN ({_marks(len(member_ids))})", member_ids)
                removed += tx.execute(f"DELETE FROM members WHERE id IN ({_marks(len(member_ids))})",
                                      member_ids).rowcount
            if stale_before is not None:
                removed += tx.execute("DELETE FROM members WHERE heartbeat_at < ?", (stale_before,)).rowcount
        return removed

    # -- locks --------------------------------------------------------------------------------------------------------

    def try_lock(self, name: str, owner: str, ttl_s: float) -> bool:
        """Take (or renew) lock ``name`` for ``ttl_s`` seconds; False if another owner holds it unexpired."""
        now = time.time()
        with self.db.tx() as tx:
            row = tx.execute("INSERT INTO locks (name, owner, expires_at) VALUES (?, ?, ?) ON CONFLICT (name) DO "
                             "UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at "
                             "WHERE locks.owner = excluded.owner OR locks.expires_at < ? RETURNING owner",
                             (name, owner, now + ttl_s, now)).fetchone()
        return row is not None

    def unlock(self, name: str, owner: str) -> None:
        with self.db.tx() as tx:
            tx.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    @contextmanager
    def locked(self, name: str, owner: str, ttl_s: float = 600.0, wait_s: float = 60.0) -> Iterator[None]:
        """Hold lock ``name`` for the block (waits up to ``wait_s``; TimeoutError if it stays taken)."""
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while not self.try_lock(name, owner, ttl_s):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"lock {name!r} is held by another member")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            self.unlock(name, owner)


def open_job_store(storage_dir: Path, backend: str = "sqlite", database_url: str = "") -> JobStore:
    """The installation's job store: ``<storage_dir>/jobs.sqlite``, or the PostgreSQL database."""
    if backend == "postgres":
        return JobStore.postgres(database_url)
    return JobStore.sqlite(Path(storage_dir) / STATE_FILE)

