"""The node in one object: listener, series assembler, worker processes, dispatcher, retention, metrics.

``Node(config).start()`` joins the job store as a member (with a heartbeat), takes over the work of
members of this machine that died (a previous run of this node, its workers), recovers the spool
(finishes interrupted claims, creates missing jobs, tracks partially received series) and starts the
listener, the dispatcher and ``jobs.workers`` worker processes (:mod:`dicom_node.workers.pool`). The
housekeeping thread repeats the recovery every ``RECONCILE_INTERVAL_S`` (for a claim or job creation
that failed at run time), takes over the work of silent members, and applies retention; with
several nodes on one database, one node at a time does so (the ``housekeeping`` lock). ``stop()``:
no new associations; worker processes hand their running jobs back and exit; in-flight
associations and sends get up to ``node.drain_timeout_s``; whatever is left is persisted.
``synthmrf serve`` is a thin wrapper; the demo and the tests run a Node in-process (``port = 0``
picks a free port, see :attr:`Node.port`); given a processor object, its workers are threads.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from dicom_node.config import NodeConfig
from dicom_node.dimse.storage_scp import Listener, start_listener
from dicom_node.metrics import NodeMetrics
from dicom_node.node.dispatch import Dispatcher
from dicom_node.node.instances import InstanceInfo, complete_file_uids, read_instance_info
from dicom_node.node.job_store import DeliveryState, JobState, JobStore, new_member_id, open_job_store
from dicom_node.node.retention import relieve_pressure, sweep
from dicom_node.node.router import Router
from dicom_node.node.series_assembly import CompletionHandler, SeriesAssembler
from dicom_node.node.series_identity import SeriesIdentities
from dicom_node.node.spool import Spool
from dicom_node.retro.progress import PROGRESS_FILE, ProgressStore
from dicom_node.workers.pool import Heartbeat, JobRunner, Outcome, ThreadWorkers, WorkerPool, take_over_dead
from dicom_node.workers.processor import Processor

logger = logging.getLogger(__name__)

LOCK_FILE = "node.lock"
RECONCILE_INTERVAL_S = 60.0  # how often every series is checked for work a failure left unfinished


class NodeLockedError(RuntimeError):
    """Another node process is using the storage folder."""


class NodeLock:
    """An exclusive ``flock`` on ``<storage_dir>/node.lock`` (released by the OS if the process dies)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> NodeLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise NodeLockedError(f"{self.path.parent}: another synthmrf node is running on this storage "
                                  "folder") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class Node:
    """A running synthmrf node (start/stop in-process; also a context manager)."""

    def __init__(self, config: NodeConfig, processor: Processor | None = None) -> None:
        self.config = config
        self.storage_dir = Path(config.node.storage_dir)
        self.processor = processor  # None: the configured processor, in worker processes
        self.metrics = NodeMetrics()
        self.shared = config.jobs.backend == "postgres"  # several nodes may share the storage folder
        self.member_id = new_member_id("node")
        tmp_name = re.sub(r"[^A-Za-z0-9_.-]", "_", self.member_id) if self.shared else ""
        self.spool = Spool(self.storage_dir, config.node.min_free_mb * 2**20, config.node.fsync_directories,
                           tmp_name=tmp_name, reserve=self._promised_result_bytes)
        self._reserve_lock = threading.Lock()
        self._version_bytes: dict[tuple[str, int], int] = {}  # input bytes of queued/processing versions
        self._versions_read_at = -1e9
        self._lock = None if self.shared else NodeLock(self.storage_dir)
        self._listener: Listener | None = None
        self._store: JobStore | None = None
        self._threads: ThreadWorkers | None = None
        self._pool: WorkerPool | None = None
        self._heartbeat: Heartbeat | None = None
        self._dispatcher: Dispatcher | None = None
        self._assembler: SeriesAssembler | None = None
        self._progress: ProgressStore | None = None  # retrospective progress, opened once a pass has run
        self._progress_failed = False  # reading it failed (logged once)
        self._router: Router | None = None
        self._housekeeping: threading.Thread | None = None
        self._stopping = threading.Event()
        self.metrics_port: int | None = None

    # -- parts (valid after start) ---------------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise RuntimeError("node not started")
        return self._store

    @property
    def port(self) -> int:
        """The port the listener is bound to (the configured one, or the one picked for port 0)."""
        if self._listener is None:
            raise RuntimeError("node not started")
        return self._listener.port

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the worker processes (none when the workers are threads)."""
        return self._pool.pids if self._pool is not None else []

    @property
    def assembler(self) -> SeriesAssembler:
        if self._assembler is None:
            raise RuntimeError("node not started")
        return self._assembler

    def _promised_result_bytes(self) -> int:
        """Space the results of the series received and not yet processed will need: ``ingress.result_space_factor``
        times their bytes (incoming, and the inputs of queued and processing jobs, read at most every 2 s)."""
        factor = self.config.ingress.result_space_factor
        if not factor:
            return 0
        with self._reserve_lock:
            store = self._store
            if store is not None and time.monotonic() - self._versions_read_at > 2.0:
                try:
                    versions = store.unfinished_versions()
                except Exception as exc:  # the database is briefly unavailable: keep the last figure
                    logger.warning("cannot read the queued jobs to reserve space for their results: %s", exc)
                    versions = list(self._version_bytes)
                self._version_bytes = {v: self._version_bytes[v] if v in self._version_bytes
                                       else self.spool.input_bytes(*v) for v in versions}
                self._versions_read_at = time.monotonic()
            promised = sum(self._version_bytes.values())
        return int(factor * (self.spool.incoming_bytes() + promised))

    # -- life cycle ---------------------------------------------------------------------------------------------------

    def start(self) -> Node:
        cfg = self.config
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is not None:
            self._lock.acquire()
        try:
            self._start(cfg)
        except BaseException:
            self.stop(drain=False)
            raise
        return self

    def _start(self, cfg: NodeConfig) -> None:
        self._stopping.clear()
        self.spool.prepare(complete_file_uids)
        store = self._store = open_job_store(self.storage_dir, cfg.jobs.backend, cfg.jobs.database_url)
        store.join(self.member_id, "node", self._member_detail(self.member_id) or "")
        dispatcher = self._dispatcher = Dispatcher(cfg, store, observe=self.metrics.observe_delivery,
                                                   owner=self.member_id)
        router = self._router = Router(self.spool, store, cfg.mprage, self.member_id)
        assembler = self._assembler = SeriesAssembler(cfg.series, self._series_complete_handler(router))
        self._recover(router, store, assembler)
        self.metrics.track(lambda: float(len(store.queued())), lambda: float(self.spool.free_bytes()))
        if self.processor is not None:
            runner = JobRunner(cfg, self.spool, store, self.processor)
            self._threads = ThreadWorkers(cfg, store, runner, cfg.jobs.workers, self._job_done)
            self._threads.start()
        elif cfg.jobs.workers:
            self._pool = WorkerPool(cfg, store, cfg.jobs.workers, on_outcome=self._job_done).start()
        members = [self.member_id, *(self._threads.member_ids if self._threads else [])]
        self._heartbeat = Heartbeat(store, lambda: members, cfg.jobs.heartbeat_s, self._member_detail).start()
        dispatcher.start()
        assembler.start()
        self._housekeeping = threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True)
        self._housekeeping.start()
        if cfg.metrics.port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        identities = SeriesIdentities(self.spool, self.metrics.count_identity_mismatch)
        self._listener = start_listener(cfg.node, self.spool, assembler, identities, self.metrics.count_instance,
                                        cfg.ingress, cfg.mprage, self.metrics.count_refused_connection)

    def _member_detail(self, member_id: str) -> str | None:
        """The node's line in ``synthmrf status``: where it listens and its C-STORE outcomes since start."""
        if member_id != self.member_id:
            return None
        port = self._listener.port if self._listener is not None else self.config.node.port
        return (f"{self.config.node.ae_title} on port {port}; instances since start: "
                f"{self.metrics.instance_summary()}")

    def _job_done(self, job_id: str, outcome: Outcome) -> None:
        self.metrics.observe_job(outcome.state, outcome.seconds)
        if outcome.state == "processed" and self._dispatcher is not None:
            self._dispatcher.wake(job_id)

    def _series_complete_handler(self, router: Router) -> CompletionHandler:
        def complete(series_uid: str, why: str) -> str | None:
            not_yet = self._incomplete_retrieval(series_uid)
            if not_yet is not None:
                return not_yet
            job = router.series_complete(series_uid, why)
            if job is not None:
                self.metrics.series.labels("queued" if job.state is JobState.QUEUED else "ignored").inc()
            return None
        return complete

    def _incomplete_retrieval(self, series_uid: str) -> str | None:
        """Why a quiet series is still incomplete because a retrospective pass has not fetched it all.

        The progress store is only advice here: if it cannot be read, the series is processed (logged once)."""
        try:
            if self._progress is None:
                path = self.storage_dir / "retro" / PROGRESS_FILE
                if not path.exists() or self._stopping.is_set():  # no pass ever ran here, or stopping
                    return None
                self._progress = ProgressStore(path)
            return self._progress.incomplete_retrieval(series_uid, self.config.retro.hold_incomplete_s)
        except (sqlite3.Error, OSError) as exc:
            if not self._progress_failed:
                logger.error("cannot read the retrospective progress store (%s); series are processed without "
                             "checking for unfinished retrievals", exc)
                self._progress_failed = True
            return None

    def _recover(self, router: Router, store: JobStore, assembler: SeriesAssembler) -> None:
        """Bring the spool and the job store back in line after any kind of stop."""
        dead = store.dead_local_members()
        take_over_dead(store, self.config, owners=dead)  # and the work of members silent for jobs.takeover_s
        store.forget_members(dead, stale_before=time.time() - 86400.0)
        for series_uid in self.spool.series_uids():
            router.reconcile(series_uid)
            files = self.spool.incoming_files(series_uid)
            if files:
                infos: list[InstanceInfo] = []
                for f in files:
                    try:
                        infos.append(read_instance_info(f))
                    except Exception as exc:  # it was checked when received; count it without details
                        logger.warning("series %s: cannot re-read %s (%s)", series_uid, f.name, exc)
                assembler.track(series_uid, infos)
                logger.info("series %s: %d instances waiting from before the restart", series_uid, len(files),
                            extra={"series_uid": series_uid})
        queued = store.queued()
        if queued:
            logger.info("%d jobs queued", len(queued))

    def _housekeeping_loop(self) -> None:
        """Reconcile every ``RECONCILE_INTERVAL_S`` (start-up has just done so) and sweep every
        ``retention.sweep_interval_s`` (from start-up)."""
        next_reconcile = time.monotonic() + RECONCILE_INTERVAL_S
        next_sweep = time.monotonic()
        next_takeover = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_takeover:
                next_takeover = time.monotonic() + self.config.jobs.heartbeat_s
                try:
                    take_over_dead(self.store, self.config)
                except Exception:
                    logger.exception("taking over the work of silent members failed")
                try:
                    if self.spool.free_bytes() < self.config.retention.high_water_free_mb * 2**20:
                        self._housekeeping_pass(lambda: relieve_pressure(self.store, self.spool,
                                                                         self.config.retention))
                except Exception:
                    logger.exception("freeing space under disk pressure failed")
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + RECONCILE_INTERVAL_S
                try:
                    if self._router is not None and (n := self._housekeeping_pass(self._router.reconcile)):
                        logger.warning("housekeeping: %d jobs that a failure had left behind routed", n)
                except Exception:
                    logger.exception("reconciling the spool and the job store failed")
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.config.retention.sweep_interval_s
                try:
                    self._housekeeping_pass(lambda: sweep(self.store, self.spool, self.config.retention))
                except Exception:
                    logger.exception("retention sweep failed")
            self._stopping.wait(max(0.0, min(next_reconcile, next_sweep, next_takeover) - time.monotonic()))

    def _housekeeping_pass(self, work: Callable[[], int]) -> int:
        """Run ``work`` if no other node is doing housekeeping (the store's ``housekeeping`` lock)."""
        if not self.store.try_lock("housekeeping", self.member_id, ttl_s=3600.0):
            return 0
        try:
            return work()
        finally:
            self.store.unlock("housekeeping", self.member_id)

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop; with ``drain``, in-flight work gets up to ``timeout_s`` (default node.drain_timeout_s)."""
        timeout = self.config.node.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + (timeout if drain else 0.0)
        self._stopping.set()
        if self._listener is not None:
            listener = self._listener
            self._listener = None
            listener.stop_accepting()  # no new associations; running ones continue
            while listener.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in listener.active_associations:
                logger.warning("aborting association from %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
            listener.close()
        if self._pool is not None:  # each worker process hands its running job back and exits
            self._pool.stop(min(self.config.jobs.stop_timeout_s, max(0.0, deadline - time.monotonic()) + 5.0))
            self._pool = None
        if self._assembler is not None:
            self._assembler.stop()
        if self._threads is not None:
            self._threads.stop(max(1.5, deadline - time.monotonic()))  # idle threads notice within ~1 s
            self._threads = None
        if self._dispatcher is not None:
            self._dispatcher.stop(max(0.0, deadline - time.monotonic()) + 1.0)
            self._dispatcher = None
        if self._housekeeping is not None:
            self._housekeeping.join(5.0)
            self._housekeeping = None
        self.metrics.shutdown()
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self._store is not None:
            try:
                self._store.leave(self.member_id)
            except Exception as exc:
                logger.warning("could not leave the job store: %s", exc)
            self._store.close()
            self._store = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._lock is not None:
            self._lock.release()
        logger.info("node stopped")

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- for the demo and tests ---------------------------------------------------------------------------------------

    def idle(self) -> bool:
        """True when nothing is arriving, queued, processing or waiting to be sent."""
        if self._assembler is not None and self._assembler.pending():
            return False
        counts = self.store.counts()
        busy = [JobState.QUEUED, JobState.PROCESSING]
        if any(counts.get(f"job:{s}", 0) for s in busy):
            return False
        return not any(counts.get(f"delivery:{s}", 0) for s in (DeliveryState.PENDING, DeliveryState.SENDING))

    def wait_idle(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Wait until :meth:`idle` (polled); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(poll_s)
        return self.idle()
