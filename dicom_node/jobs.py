"""Processing jobs: the huey queue (SQLite by default, Redis optional), its worker threads, and a job's run.

The queue only carries job ids; the job store holds the truth. A task that finds its job not
``queued`` does nothing, so a job enqueued twice (a restart re-enqueues every queued job) runs once.
At start the node empties the queue and re-enqueues from the store, which also recovers jobs a crash
took out of the queue while they ran. The queue is named after the node's AE title and storage folder
(:func:`queue_name`), so nodes sharing one Redis server never see each other's tasks.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from huey import Huey, SqliteHuey
from huey.consumer import Scheduler, Worker

from dicom_node.config import ConfigError, NodeConfig
from dicom_node.job_store import JobState, JobStore
from dicom_node.processor import Processor, rejection_types
from dicom_node.spool import Spool

logger = logging.getLogger(__name__)

TASK_NAME = "process_job"
QUEUE_FILE = "queue.sqlite"


def queue_name(cfg: NodeConfig) -> str:
    """``synthmrf_<AE title>_<hash of the resolved storage folder>``: one queue per node (one node per folder).

    Only letters, digits and ``_`` (huey's Redis storage drops any other character from the name).
    """
    folder = hashlib.sha256(str(cfg.node.storage_dir.resolve()).encode()).hexdigest()[:12]
    return f"synthmrf_{re.sub(r'[^A-Za-z0-9_]', '_', cfg.node.ae_title)}_{folder}"


def make_huey(cfg: NodeConfig) -> Huey:
    """The queue of this node: ``<storage_dir>/queue.sqlite``, or Redis at ``jobs.redis_url``."""
    name = queue_name(cfg)
    if cfg.jobs.backend == "redis":
        try:
            import redis  # noqa: F401  (huey needs it for RedisHuey)
        except ImportError as exc:
            raise ConfigError("jobs.backend 'redis' needs the 'redis' package (pip install redis)") from exc
        from huey import RedisHuey

        return RedisHuey(name=name, url=cfg.jobs.redis_url, results=False, utc=True)
    cfg.node.storage_dir.mkdir(parents=True, exist_ok=True)
    return SqliteHuey(name=name, filename=str(cfg.node.storage_dir / QUEUE_FILE), results=False, utc=True,
                      fsync=True, timeout=30)


def _enqueue_only(job_id: str) -> None:
    raise RuntimeError(f"job {job_id}: this process only enqueues; the node's workers run jobs")


class JobQueue:
    """Enqueue job ids on the huey queue; with ``run`` the same object's workers execute them."""

    def __init__(self, huey: Huey, run: Callable[[str], None] = _enqueue_only) -> None:
        self.huey = huey

        def process_job(job_id: str) -> None:
            run(job_id)

        self._task = huey.task(name=TASK_NAME)(process_job)

    def enqueue(self, job_id: str, delay_s: float = 0.0) -> None:
        if delay_s > 0:
            self._task.schedule(args=(job_id,), delay=delay_s)
        else:
            self._task(job_id)

    def held(self) -> set[str]:
        """Ids of the jobs with a task waiting in the queue or its schedule."""
        tasks = [*self.huey.pending(), *self.huey.scheduled()]
        return {str(t.args[0]) for t in tasks if t.name == TASK_NAME and t.args}

    def depth(self) -> int:
        """Tasks waiting in the queue or its schedule."""
        return int(self.huey.pending_count()) + int(self.huey.scheduled_count())

    def reset(self, job_ids: list[str]) -> None:
        """Empty the queue and enqueue ``job_ids`` (at start, from the job store)."""
        self.huey.flush()
        for job_id in job_ids:
            self.enqueue(job_id)


def _result_files(result: object, out_dir: Path) -> list[Path]:
    """The processor's ``dicom_files``, checked to exist; files outside ``out_dir`` are copied into it."""
    files = getattr(result, "dicom_files", None)
    if files is None:
        raise TypeError(f"processor result: expected an object with 'dicom_files', got {type(result).__name__}")
    out = []
    keep = out_dir / "results"
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise FileNotFoundError(f"processor result: {path} does not exist")
        if not path.resolve().is_relative_to(out_dir.resolve()):
            keep.mkdir(parents=True, exist_ok=True)
            path = Path(shutil.copy2(path, keep / path.name))
        out.append(path)
    return out


class JobRunner:
    """Runs one job: the processor on the version's input, then the state change."""

    def __init__(self, cfg: NodeConfig, spool: Spool, store: JobStore, processor: Processor, queue_retry:
                 Callable[[str, float], None], on_processed: Callable[[str], None],
                 observe: Callable[[str, float], None] = lambda state, seconds: None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.processor = processor
        self.queue_retry = queue_retry
        self.on_processed = on_processed
        self.observe = observe

    def __call__(self, job_id: str) -> None:
        job = self.store.start_job(job_id)
        if job is None:
            logger.debug("job %s is not queued; nothing to do", job_id, extra={"job_id": job_id})
            return
        extra = {"job_id": job_id, "series_uid": job.series_uid, "study_uid": job.study_uid}
        logger.info("job %s: processing %d instances (attempt %d)", job_id, job.instances, job.attempts, extra=extra)
        start = time.monotonic()
        try:
            claim = self.spool.claim_of(job.series_uid, job.version)
            out = claim.output_dir
            for stale in [out, *claim.folder.glob(f".{out.name}.*")]:  # an interrupted run (and its staging)
                shutil.rmtree(stale, ignore_errors=True)
            out.mkdir(parents=True)
            result = self.processor(claim.input_dir, out, model=self.cfg.pipeline.model)
            files = _result_files(result, out)
        except rejection_types() as exc:
            self.store.end_job(job_id, JobState.REJECTED, str(exc))
            self.observe("rejected", time.monotonic() - start)
            logger.warning("job %s: rejected by the pipeline: %s", job_id, exc, extra=extra)
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self.observe("error", time.monotonic() - start)
            if job.attempts < self.cfg.jobs.max_attempts:
                self.store.end_job(job_id, JobState.QUEUED, reason)
                logger.exception("job %s: processing failed (attempt %d of %d), retrying in %.0f s", job_id,
                                 job.attempts, self.cfg.jobs.max_attempts, self.cfg.jobs.retry_delay_s, extra=extra)
                self.queue_retry(job_id, self.cfg.jobs.retry_delay_s)
            else:
                self.store.end_job(job_id, JobState.FAILED, reason)
                logger.exception("job %s: processing failed (attempt %d of %d), giving up", job_id, job.attempts,
                                 self.cfg.jobs.max_attempts, extra=extra)
            return
        destinations = [d.name for d in self.cfg.destinations]
        self.store.finish_job(job_id, files, destinations)
        self.observe("processed", time.monotonic() - start)
        logger.info("job %s: %d result files in %.1f s, to %s", job_id, len(files), time.monotonic() - start,
                    ", ".join(destinations) or "no destination", extra=extra)
        self.on_processed(job_id)


class JobWorkers:
    """huey worker and scheduler threads inside the node process (no signal handlers of their own)."""

    def __init__(self, huey: Huey, workers: int, poll_interval_s: float) -> None:
        self.huey = huey
        self.stop_flag = threading.Event()
        self._procs: list[tuple[str, Worker | Scheduler]] = [
            (f"job-worker-{i + 1}", Worker(huey, self.stop_flag, poll_interval_s, poll_interval_s, 1.0))
            for i in range(workers)]
        self._procs.append(("job-scheduler", Scheduler(huey, self.stop_flag, 1, False)))
        self._threads: list[threading.Thread] = []

    def _run(self, proc: Worker | Scheduler) -> None:
        proc.initialize()
        try:
            while not self.stop_flag.is_set():
                try:
                    proc.loop()
                except Exception:
                    logger.exception("job queue loop error")
                    self.stop_flag.wait(1.0)
        finally:
            proc.shutdown()

    def start(self) -> None:
        self.stop_flag.clear()
        self._threads = [threading.Thread(target=self._run, args=(p,), name=n, daemon=True) for n, p in self._procs]
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> bool:
        """Let running jobs finish for up to ``timeout_s``; True if every thread ended."""
        self.stop_flag.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("stopping with jobs still running in %s; they are queued again at the next start", alive)
        return not alive
