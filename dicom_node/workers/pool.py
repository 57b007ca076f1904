"""Pipeline workers: claim a job from the job store, run the processor, record the outcome; heartbeats.

A worker is a loop (:class:`WorkerLoop`) around :meth:`JobStore.claim_job`. ``synthmrf serve`` runs
``jobs.workers`` of them as child processes (:class:`WorkerPool`, which restarts a child that died and
hands its job back at once); ``synthmrf worker`` runs them on any machine that shares the database and
the storage folder. The node process never imports torch: the processor is imported in the worker.
An embedding that passes a processor object to :class:`dicom_node.node.Node` (tests, the demo) runs
the same loop in threads (:class:`ThreadWorkers`).

SIGTERM to a worker process interrupts the job it runs (between two Python steps of the pipeline),
hands the job back to the queue (not counted as an attempt) and exits: a node stops in seconds even
mid-job, and nothing is lost. A worker killed outright (kill -9, out of memory) is noticed by its
``serve`` at once, or by any member after ``jobs.takeover_s`` without a heartbeat.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.queues
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import NodeConfig
from dicom_node.node.job_store import Job, JobState, JobStore, new_member_id, open_job_store
from dicom_node.node.spool import Spool
from dicom_node.stop_signals import stop_on_signals
from dicom_node.workers.processor import LazyProcessor, Processor, rejection_types

logger = logging.getLogger(__name__)

MAX_RETRY_DELAY_S = 3600.0
DISK_FULL_RETRY_S = 60.0  # a job that met a full disk runs again after this (or jobs.retry_delay_s if shorter)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
RUN_PREFIX = "run-"


class WorkerStopping(BaseException):
    """Raised inside a running job when its worker process is asked to stop (SIGTERM)."""


def retry_delay_s(attempts: int, first_s: float) -> float:
    """Back-off before the next run after ``attempts`` failed ones: doubling from ``first_s``, at most 1 h."""
    return float(min(first_s * 2 ** max(attempts - 1, 0), MAX_RETRY_DELAY_S))


def error_reason(exc: BaseException) -> str:
    """A job's reason for an unexpected error: a fixed code and the exception's type, never its text."""
    return f"processing error {type(exc).__name__} (details: worker log at DEBUG)"


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


@dataclass(frozen=True)
class Outcome:
    state: str  # processed, rejected, error, released, lost
    seconds: float


class JobRunner:
    """Runs one claimed job: the processor on the version's input into ``output/run-<token>/``, then the state
    change, conditional on the run token (a run whose job was taken over changes nothing and is removed)."""

    def __init__(self, cfg: NodeConfig, spool: Spool, store: JobStore, processor: Processor,
                 running: Callable[[bool], None] = lambda on: None) -> None:
        self.cfg = cfg
        self.spool = spool
        self.store = store
        self.processor = processor
        self.running = running  # told when the processor starts and ends (a process worker may interrupt it)

    def __call__(self, job: Job) -> Outcome:
        extra = {"job_id": job.id, "series_uid": job.series_uid, "study_uid": job.study_uid}
        logger.info("job %s: processing %d instances (attempt %d)", job.id, job.instances, job.attempts, extra=extra)
        start = time.monotonic()
        claim = self.spool.claim_of(job.series_uid, job.version)
        out = claim.output_dir / f"{RUN_PREFIX}{job.run_token}"
        try:
            if claim.output_dir.is_dir():  # runs that ended without finishing (their jobs were taken over)
                for stale in claim.output_dir.iterdir():
                    if stale != out:
                        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            out.mkdir(parents=True)
            try:
                self.running(True)
                result = self.processor(claim.input_dir, out, model=self.cfg.pipeline.model)
            finally:
                self.running(False)
            files = _result_files(result, out)
        except WorkerStopping:
            self.running(False)  # again: the interrupt may have come inside the first call
            shutil.rmtree(out, ignore_errors=True)
            released = self.store.release_job(job.id, job.run_token)
            logger.warning("job %s: interrupted by a stop; %s", job.id, "queued again" if released else
                           "it had been taken over", extra=extra)
            raise
        except rejection_types() as exc:
            self.store.end_job(job.id, job.run_token, JobState.REJECTED, str(exc))
            logger.warning("job %s: rejected by the pipeline: %s", job.id, exc, extra=extra)
            return Outcome("rejected", time.monotonic() - start)
        except Exception as exc:
            shutil.rmtree(out, ignore_errors=True)
            # An exception's text may quote header values (names, IDs): the job and the log at INFO and above
            # carry its type only; the traceback, with the text, is logged at DEBUG.
            reason = error_reason(exc)
            logger.debug("job %s: traceback", job.id, exc_info=True, extra=extra)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:  # not the series' fault: wait for space
                delay = min(self.cfg.jobs.retry_delay_s, DISK_FULL_RETRY_S) or DISK_FULL_RETRY_S
                self.store.release_job(job.id, job.run_token, time.time() + delay, "waiting for disk space")
                logger.error("job %s: the disk is full (%s); queued again in %.0f s, not counted as an attempt",
                             job.id, type(exc).__name__, delay, extra=extra)
                return Outcome("no_space", time.monotonic() - start)
            if job.attempts < self.cfg.jobs.max_attempts:
                delay = retry_delay_s(job.attempts, self.cfg.jobs.retry_delay_s)
                self.store.end_job(job.id, job.run_token, JobState.QUEUED, reason, retry_at=time.time() + delay)
                logger.error("job %s: %s (attempt %d of %d), retrying in %.0f s", job.id, reason, job.attempts,
                             self.cfg.jobs.max_attempts, delay, extra=extra)
            else:
                self.store.end_job(job.id, job.run_token, JobState.FAILED, reason)
                logger.error("job %s: %s (attempt %d of %d), giving up", job.id, reason, job.attempts,
                             self.cfg.jobs.max_attempts, extra=extra)
            return Outcome("error", time.monotonic() - start)
        destinations = [d.name for d in self.cfg.destinations]
        if not self.store.finish_job(job.id, job.run_token, files, destinations):
            shutil.rmtree(out, ignore_errors=True)
            logger.warning("job %s: finished, but another worker had taken it over; results discarded", job.id,
                           extra=extra)
            return Outcome("lost", time.monotonic() - start)
        seconds = time.monotonic() - start
        logger.info("job %s: %d result files in %.1f s, to %s", job.id, len(files), seconds,
                    ", ".join(destinations) or "no destination", extra=extra)
        return Outcome("processed", seconds)


OutcomeHandler = Callable[[str, Outcome], None]  # (job id, outcome)


class WorkerLoop:
    """Claim and run jobs until ``stop`` is set; take over dead members' jobs now and then."""

    def __init__(self, cfg: NodeConfig, store: JobStore, runner: JobRunner, member_id: str,
                 stop: threading.Event, on_outcome: OutcomeHandler = lambda job_id, outcome: None) -> None:
        self.cfg = cfg
        self.store = store
        self.runner = runner
        self.member_id = member_id
        self.stop = stop
        self.on_outcome = on_outcome

    def run(self) -> None:
        next_takeover = 0.0
        while not self.stop.is_set():
            try:
                if time.monotonic() >= next_takeover:
                    next_takeover = time.monotonic() + self.cfg.jobs.heartbeat_s
                    take_over_dead(self.store, self.cfg)
                job = self.store.claim_job(self.member_id)
            except Exception:
                logger.exception("worker %s: cannot reach the job store; trying again", self.member_id)
                self.stop.wait(min(5.0, self.cfg.jobs.takeover_s / 10))
                continue
            if job is None:
                self.stop.wait(self.cfg.jobs.poll_interval_s)
                continue
            try:
                self.store.beat(self.member_id, detail=f"running {job.id}")
                outcome = self.runner(job)
                self.store.beat(self.member_id, detail="idle")
            except Exception:
                if self.stop.is_set():  # the node closed the store under a job that outlived its stop timeout
                    logger.warning("worker %s: stopped before job %s was recorded; it runs again after the next "
                                   "start", self.member_id, job.id, extra={"job_id": job.id})
                    return
                logger.exception("worker %s: job %s could not be recorded; it is taken over after jobs.takeover_s",
                                 self.member_id, job.id, extra={"job_id": job.id})
                continue
            self.on_outcome(job.id, outcome)


def take_over_dead(store: JobStore, cfg: NodeConfig, owners: Sequence[str] = ()) -> None:
    """Take over the jobs and deliveries of members that died (``owners``, or silent for ``jobs.takeover_s``)."""
    requeued, failed, deliveries = store.take_over(cfg.jobs.max_attempts, time.time() - cfg.jobs.takeover_s, owners)
    for job_id in requeued:
        logger.warning("job %s: its worker ended while processing it; queued again", job_id, extra={"job_id": job_id})
    for job_id in failed:
        logger.error("job %s failed: workers ended while processing it %d times (jobs.max_attempts); not run again "
                     "('synthmrf jobs retry %s' runs it again)", job_id, cfg.jobs.max_attempts, job_id,
                     extra={"job_id": job_id})
    if deliveries:
        logger.warning("%d deliveries whose sender ended were made pending again", deliveries)


class Heartbeat:
    """A thread that renews the heartbeats of some members every ``jobs.heartbeat_s``."""

    def __init__(self, store: JobStore, member_ids: Callable[[], Sequence[str]], interval_s: float,
                 detail: Callable[[str], str | None] = lambda member: None) -> None:
        self.store = store
        self.member_ids = member_ids
        self.interval_s = interval_s
        self.detail = detail  # a member's new detail line for ``synthmrf status`` (None: unchanged)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for member in self.member_ids():
                try:
                    if not self.store.beat(member, self.detail(member)):
                        logger.error("member %s was declared dead by another process; its work runs elsewhere",
                                     member)
                except Exception as exc:
                    logger.warning("heartbeat of %s failed: %s", member, exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


class ThreadWorkers:
    """Worker loops in threads of the calling process (an embedded processor object: tests, the demo)."""

    def __init__(self, cfg: NodeConfig, store: JobStore, runner: JobRunner, count: int,
                 on_outcome: OutcomeHandler) -> None:
        self.stop_flag = threading.Event()
        self.member_ids = [new_member_id("worker") for _ in range(count)]
        self.store = store
        self._loops = [WorkerLoop(cfg, store, runner, m, self.stop_flag, on_outcome) for m in self.member_ids]
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for m in self.member_ids:
            self.store.join(m, "worker", "idle (thread)")
        self._threads = [threading.Thread(target=loop.run, name=f"job-worker-{i + 1}", daemon=True)
                         for i, loop in enumerate(self._loops)]
        for t in self._threads:
            t.start()

    def stop(self, timeout_s: float) -> bool:
        """Let running jobs finish for up to ``timeout_s``; True if every thread ended. Members leave either
        way, so a job still running is taken over at the next start (its late finish is refused)."""
        self.stop_flag.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            logger.warning("stopping with jobs still running in %s; they are queued again at the next start", alive)
        for m in self.member_ids:
            try:
                self.store.leave(m)
            except Exception as exc:
                logger.warning("worker %s could not leave the job store: %s", m, exc)
        return not alive


# -- worker processes ---------------------------------------------------------------------------------------------


def _stop_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when its parent ends, even by kill -9 (PR_SET_PDEATHSIG, and a watcher thread
    for when the kernel's notice does not apply): an orphaned worker hands its job back and exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _interrupt_again_after_stop(stop: threading.Event, in_job: threading.Event, rearm: Callable[[], None],
                                every_s: float = 2.0) -> None:
    """A thread that, once ``stop`` is set, interrupts the main thread again every ``every_s`` while ``in_job``
    stays set: the WorkerStopping raised at the first signal can be lost (raised inside a finaliser or under
    a library's bare ``except``), and the job would then run to its end instead of being handed back."""
    main = threading.main_thread().ident
    assert main is not None

    def run() -> None:
        stop.wait()
        while True:
            time.sleep(every_s)
            if not in_job.is_set():
                return
            logger.warning("the running job did not stop at SIGTERM; interrupting it again")
            rearm()
            signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=run, name="interrupt-again", daemon=True).start()


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def worker_process_main(cfg: NodeConfig, member_id: str, device: str | None,
                        outcomes: multiprocessing.queues.Queue | None = None,  # type: ignore[type-arg]
                        parent_pid: int | None = None, threads: int | None = None) -> None:
    """Entry of one worker process: the loop until SIGTERM/SIGINT, the running job handed back on a stop.
    Outcomes go to ``outcomes`` (the node's metrics); the process stops when ``parent_pid`` ends. ``threads``:
    the CPU threads its torch and SimpleITK may use (unless the environment already says)."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if threads is not None:
        for name in THREAD_VARIABLES:  # read by torch and ITK when they load, in this process only
            os.environ.setdefault(name, str(threads))
    from dicom_node.logs import configure_logging

    configure_logging(cfg.logging.level, cfg.logging.format)
    stop = threading.Event()
    in_job = threading.Event()  # set while the processor runs; cleared by the runner when it ends, however it ends
    # Written in the signal handler, so plain values (no locks): whether a stop was asked for, and whether the next
    # signal may interrupt the job (once: a second signal raising while the first unwinds could skip a lock's release).
    asked = {"stop": False, "armed": True}

    def in_handler(signum: int) -> None:
        asked["stop"] = True
        if in_job.is_set() and asked["armed"]:
            asked["armed"] = False
            raise WorkerStopping(signal.Signals(signum).name)

    stop_on_signals(stop, in_handler)
    _interrupt_again_after_stop(stop, in_job, rearm=lambda: asked.update(armed=True))
    if parent_pid is not None:
        _stop_with_parent(parent_pid)
    store = open_job_store(cfg.node.storage_dir, cfg.jobs.backend, cfg.jobs.database_url)
    store.join(member_id, "worker", "idle")
    heartbeat = Heartbeat(store, lambda: [member_id], cfg.jobs.heartbeat_s).start()
    spool = Spool(cfg.node.storage_dir)
    def job_running(on: bool) -> None:
        """The processor starts (or ended): from now on SIGTERM interrupts it; a stop that came just before
        (between the claim and here) interrupts it at once."""
        if not on:
            in_job.clear()
            return
        in_job.set()
        if asked["stop"]:
            in_job.clear()
            raise WorkerStopping("stop requested")

    runner = JobRunner(cfg, spool, store, LazyProcessor(cfg.pipeline), running=job_running)
    logger.info("worker %s started (pid %d%s)", member_id, os.getpid(), f", CUDA device {device}" if device else "")
    def report(job_id: str, outcome: Outcome) -> None:
        if outcomes is not None:
            outcomes.put((job_id, outcome.state, outcome.seconds))

    try:
        WorkerLoop(cfg, store, runner, member_id, stop, report).run()
    except WorkerStopping:
        pass
    finally:
        heartbeat.stop()
        store.leave(member_id)
        store.close()
        logger.info("worker %s stopped", member_id)


@dataclass
class _Child:
    index: int
    member_id: str
    process: multiprocessing.process.BaseProcess
    started: float


class WorkerPool:
    """``count`` worker processes, supervised: a child that dies is replaced (after a back-off when it dies
    quickly again and again) and its job is handed back at once; :meth:`stop` asks them to stop (SIGTERM),
    then kills what is left after ``jobs.stop_timeout_s``."""

    RESTART_BACKOFF_S = (1.0, 5.0, 30.0)

    def __init__(self, cfg: NodeConfig, store: JobStore, count: int,
                 on_outcome: OutcomeHandler = lambda job_id, outcome: None) -> None:
        self.cfg = cfg
        self.store = store
        self.count = count
        self.on_outcome = on_outcome
        self._ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process; torch loads in the child
        self._outcomes = self._ctx.Queue()
        self._reader = threading.Thread(target=self._read_outcomes, name="worker-outcomes", daemon=True)
        self._children: list[_Child] = []
        self._quick_deaths = [0] * count
        # the machine's cores shared out, so N workers do not run N x cores threads (CPU sites)
        self.threads = max(1, (os.cpu_count() or 1) // max(count, 1))
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def _device(self, index: int) -> str | None:
        devices = self.cfg.jobs.devices
        return devices[index % len(devices)] if devices else None

    def _spawn(self, index: int) -> _Child:
        member_id = new_member_id("worker")
        process = self._ctx.Process(target=worker_process_main,
                                    args=(self.cfg, member_id, self._device(index), self._outcomes, os.getpid(),
                                          self.threads),
                                    name=f"synthmrf-worker-{index + 1}", daemon=False)
        process.start()
        return _Child(index, member_id, process, time.monotonic())

    def start(self) -> WorkerPool:
        with self._lock:
            self._children = [self._spawn(i) for i in range(self.count)]
        self._thread.start()
        self._reader.start()
        return self

    def _read_outcomes(self) -> None:
        import queue

        while not self._stopping.is_set():
            try:
                job_id, state, seconds = self._outcomes.get(timeout=0.5)
            except queue.Empty:
                continue
            except (EOFError, OSError):
                return
            try:
                self.on_outcome(job_id, Outcome(state, seconds))
            except Exception:
                logger.exception("handling the outcome of job %s failed", job_id)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children if c.process.pid is not None]

    def _supervise(self) -> None:
        from multiprocessing.connection import wait

        while not self._stopping.is_set():
            with self._lock:
                sentinels = {c.process.sentinel: c for c in self._children}
            ready = wait(list(sentinels), timeout=1.0)
            for sentinel in ready:
                child = sentinels[sentinel]  # type: ignore[index]
                if self._stopping.is_set():
                    return
                self._replace(child)

    def _replace(self, child: _Child) -> None:
        child.process.join()
        code = child.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        logger.error("worker %s (pid %s) ended unexpectedly (%s%s); its job goes back to the queue", child.member_id,
                     child.process.pid, how, ", maybe out of memory" if code == -signal.SIGKILL else "")
        try:
            take_over_dead(self.store, self.cfg, owners=[child.member_id])
            self.store.forget_members([child.member_id])
        except Exception:
            logger.exception("could not hand back the job of worker %s (it is taken over after jobs.takeover_s)",
                             child.member_id)
        quick = time.monotonic() - child.started < 60.0
        self._quick_deaths[child.index] = self._quick_deaths[child.index] + 1 if quick else 0
        n = self._quick_deaths[child.index]
        if n:
            delay = self.RESTART_BACKOFF_S[min(n, len(self.RESTART_BACKOFF_S)) - 1]
            if self._stopping.wait(delay):
                return
        with self._lock:
            if self._stopping.is_set():
                return
            replacement = self._spawn(child.index)
            self._children = [replacement if c is child else c for c in self._children]

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM every worker (each hands its job back), wait, then SIGKILL and hand back what is left."""
        timeout = self.cfg.jobs.stop_timeout_s if timeout_s is None else timeout_s
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        with self._lock:
            children = list(self._children)
        for c in children:
            if c.process.is_alive():
                c.process.terminate()
        deadline = time.monotonic() + timeout
        for c in children:
            c.process.join(max(0.0, deadline - time.monotonic()))
        killed = [c for c in children if c.process.is_alive()]
        for c in killed:
            logger.warning("worker %s did not stop in %.0f s; killed", c.member_id, timeout)
            c.process.kill()
            c.process.join(5.0)
        if killed:
            try:
                self.store.take_over(self.cfg.jobs.max_attempts, owners=[c.member_id for c in killed],
                                     interruption=False)
                self.store.forget_members([c.member_id for c in killed])
            except Exception:
                logger.exception("could not hand back the jobs of killed workers (taken over at the next start)")
        self._reader.join(2.0)
        self._outcomes.close()
        self._outcomes.cancel_join_thread()
