"""Scheduled retrospective passes: APScheduler 3 with a persistent job store in the node's storage folder.

Schedules live in ``<storage_dir>/retro/schedules.sqlite`` (APScheduler's SQLAlchemy job store), so
they survive restarts. ``synthmrf retro add|pause|resume|remove`` edit that store from the command line
(with a scheduler started paused, which never runs anything); the node runs them: ``synthmrf serve``
calls :func:`start_scheduler` after the node has started and :meth:`RetroScheduler.stop` (with the
node's drain time) before it stops: passes end after their current series, or, once that time has
passed, their archive associations are aborted (a silent archive cannot hold the stop up) and the
series in flight is resumed at the next start. A running scheduler looks at
the store at least every ``retro.scheduler_poll_s`` seconds, so a schedule added or paused on the
command line takes effect that soon without a restart.

Each stored job is ``fire(<storage_dir>, <name>, <spec>)``: it finds the scheduler running in this
process for that storage folder and runs one pass there (coalesced, never two of one schedule at once).
A pass that could not reach the archive or the node is tried again ``retro.archive_retry_s`` later (a
one-off, not persisted: the next regular firing covers a restart). When the scheduler starts, series
that a pass left half-retrieved (process killed, node stopped mid-transfer) are resumed at once.

Cron expressions have 5 fields (``minute hour day month day-of-week``, as crontab) or 6 with seconds
first (``second minute hour day month day-of-week``); they are read in the machine's local time zone.
When daylight saving time ends, the local hour before the change comes twice and APScheduler fires a
cron in it twice (01:30 summer time, then 01:30 winter time). For a cron that fires at most hourly
(one minute and one second value), a firing is skipped when the same schedule started a run at the
same local time of day under the other UTC offset less than two hours before (:func:`repeats_wall_clock`):
a daily 01:30 runs once, an hourly cron skips the repeated hour. Crons that fire more often run on
through the repeated hour, as their cadence asks.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicom_node.config import NodeConfig
from dicom_node.retro.config import parse_window
from dicom_node.retro.progress import ProgressStore, RunState
from dicom_node.retro.query import parse_query
from dicom_node.retro.runner import NodeView, PassReport, PassRunner, PassSpec, source_config

logger = logging.getLogger(__name__)

SCHEDULE_FILE = "schedules.sqlite"
DST_TOLERANCE_S = 600.0  # two firings this close in local time of day, under different UTC offsets, are one
TABLE = "retro_schedules"
STORE = "default"  # the persistent store: one job per schedule
RUNTIME = "runtime"  # in memory: the poll heartbeat, retries, the start-up resume


class ScheduleError(ValueError):
    """A schedule that does not exist, already exists, or is invalid; the message names it."""


def parse_cron(expr: str) -> CronTrigger:
    """A 5-field crontab expression, or 6 fields with seconds first; ScheduleError naming the expression."""
    fields = expr.split()
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expr)
        if len(fields) == 6:
            second, minute, hour, day, month, dow = fields
            return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=dow)
    except ValueError as exc:
        raise ScheduleError(f"cron {expr!r}: {exc}") from exc
    raise ScheduleError(f"cron {expr!r}: expected 5 fields (minute hour day month weekday) or 6 (seconds first), "
                        f"got {len(fields)}")


class ScheduleSpec(BaseModel):
    """One schedule: when, from which source, which query, under which limits (None: ``[retro]``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    source: str
    cron: str
    query: dict[str, str] = {}
    max_studies: int | None = Field(default=None, ge=1)
    max_studies_per_hour: float | None = Field(default=None, gt=0)
    window: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        parse_cron(value)
        return " ".join(value.split())

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value:
            parse_window(value)
        return value or None

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, str]) -> dict[str, str]:
        parse_query(value)
        return value

    def pass_spec(self) -> PassSpec:
        return PassSpec(self.source, self.query, self.max_studies, self.max_studies_per_hour, self.window,
                        schedule=self.name)


@dataclass(frozen=True)
class ScheduleInfo:
    spec: ScheduleSpec
    next_run: datetime.datetime | None  # None: paused

    @property
    def paused(self) -> bool:
        return self.next_run is None


def schedule_path(config: NodeConfig) -> Path:
    return Path(config.node.storage_dir) / "retro" / SCHEDULE_FILE


def _storage_key(config: NodeConfig) -> str:
    return str(Path(config.node.storage_dir).resolve())


def _scheduler(config: NodeConfig) -> BackgroundScheduler:
    path = schedule_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    return BackgroundScheduler(
        jobstores={STORE: SQLAlchemyJobStore(url=f"sqlite:///{path}", tablename=TABLE), RUNTIME: MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(4)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": int(config.retro.misfire_grace_s)},
    )


@contextmanager
def _editing(config: NodeConfig) -> Iterator[BackgroundScheduler]:
    """A scheduler started paused: it reads and writes the store and never runs a job."""
    scheduler = _scheduler(config)
    scheduler.start(paused=True)
    try:
        yield scheduler
    finally:
        scheduler.shutdown(wait=False)


def _info(job: Job) -> ScheduleInfo:
    return ScheduleInfo(ScheduleSpec.model_validate(job.kwargs["spec"]), job.next_run_time)


def add_schedule(config: NodeConfig, spec: ScheduleSpec, *, replace: bool = False) -> ScheduleInfo:
    """Store a schedule (its source must be configured); ScheduleError if the name exists and not ``replace``."""
    source_config(config, spec.source)
    with _editing(config) as scheduler:
        if scheduler.get_job(spec.name, STORE) is not None and not replace:
            raise ScheduleError(f"schedule {spec.name!r}: exists already (use --replace, or remove it first)")
        job = scheduler.add_job(fire, trigger=parse_cron(spec.cron), id=spec.name, name=spec.name, jobstore=STORE,
                                replace_existing=True, args=[_storage_key(config), spec.name],
                                kwargs={"spec": spec.model_dump()})
        return _info(job)


def list_schedules(config: NodeConfig) -> list[ScheduleInfo]:
    if not schedule_path(config).is_file():
        return []
    with _editing(config) as scheduler:
        return sorted((_info(j) for j in scheduler.get_jobs(STORE)), key=lambda i: i.spec.name)


def _edit(config: NodeConfig, name: str, action: str) -> ScheduleInfo | None:
    with _editing(config) as scheduler:
        try:
            if action == "pause":
                return _info(scheduler.pause_job(name, STORE))
            if action == "resume":
                return _info(scheduler.resume_job(name, STORE))
            scheduler.remove_job(name, STORE)
            return None
        except JobLookupError as exc:
            known = [j.id for j in scheduler.get_jobs(STORE)]
            raise ScheduleError(f"schedule {name!r}: no such schedule (schedules: {known})") from exc


def pause_schedule(config: NodeConfig, name: str) -> ScheduleInfo:
    info = _edit(config, name, "pause")
    assert info is not None
    return info


def resume_schedule(config: NodeConfig, name: str) -> ScheduleInfo:
    info = _edit(config, name, "resume")
    assert info is not None
    return info


def remove_schedule(config: NodeConfig, name: str) -> None:
    _edit(config, name, "remove")


def schedule_summary(config: NodeConfig) -> list[dict[str, Any]]:
    """Every schedule with its next run and its last run (for ``synthmrf status`` and ``retro list``)."""
    infos = list_schedules(config)
    progress_file = Path(config.node.storage_dir) / "retro" / "progress.sqlite"
    last: dict[str, Any] = {}
    if progress_file.is_file():
        progress = ProgressStore(progress_file)
        try:
            last = {name: run.as_dict() for name, run in progress.last_runs().items()}
        finally:
            progress.close()
    return [{"name": i.spec.name, "source": i.spec.source, "cron": i.spec.cron, "query": i.spec.query,
             "max_studies": i.spec.max_studies, "max_studies_per_hour": i.spec.max_studies_per_hour,
             "window": i.spec.window, "paused": i.paused,
             "next_run": i.next_run.isoformat(timespec="seconds") if i.next_run else None,
             "last_run": last.get(i.spec.name)} for i in infos]


# -- running inside the node -------------------------------------------------------------------------------------

_running: dict[str, RetroScheduler] = {}  # storage folder -> the scheduler running its schedules in this process
_running_lock = threading.Lock()


def repeats_wall_clock(previous: float, now: float) -> bool:
    """Is a firing at ``now`` the repeat of one at ``previous`` (epoch seconds) in the local hour that the
    end of daylight saving time repeats: the same local time of day (within ``DST_TOLERANCE_S``) under a
    different UTC offset, at most two hours later?"""
    if not 0 < now - previous < 7200:
        return False
    before = datetime.datetime.fromtimestamp(previous, datetime.UTC).astimezone()
    after = datetime.datetime.fromtimestamp(now, datetime.UTC).astimezone()
    if before.utcoffset() == after.utcoffset():
        return False
    return abs((after.replace(tzinfo=None) - before.replace(tzinfo=None)).total_seconds()) <= DST_TOLERANCE_S


def fires_at_most_hourly(cron: str) -> bool:
    """Does the cron expression fire at most once an hour (a single minute and a single second value)?"""
    fields = cron.split()
    second, minute = ("0", fields[0]) if len(fields) == 5 else (fields[0], fields[1])
    return second.isdigit() and minute.isdigit()


def fire(storage_key: str, name: str, spec: dict[str, Any]) -> None:
    """The stored job: run schedule ``name`` with the scheduler of this process for ``storage_key``."""
    with _running_lock:
        runtime = _running.get(storage_key)
        if runtime is None and len(_running) == 1:  # the storage folder was moved since the schedule was added
            runtime = next(iter(_running.values()))
    if runtime is None:
        logger.error("schedule %s fired with no retro scheduler running for %s", name, storage_key)
        return
    runtime.fire(ScheduleSpec.model_validate(spec))


PassLock = Callable[[str], AbstractContextManager[bool]]  # name -> held for the block (False: another node has it)
PASS_LOCK_TTL_S = 6 * 3600.0  # a pass longer than this may be started again by another node


@contextmanager
def no_lock(name: str) -> Iterator[bool]:
    yield True


def job_store_lock(store: Any, owner: str) -> PassLock:
    """Passes locked in the installation's job store: with several nodes, one node runs a schedule at a time."""
    @contextmanager
    def hold(name: str) -> Iterator[bool]:
        if not store.try_lock(name, owner, PASS_LOCK_TTL_S):
            yield False
            return
        try:
            yield True
        finally:
            store.unlock(name, owner)
    return hold


class RetroScheduler:
    """The schedules of one node, running in its process; see :func:`start_scheduler`."""

    def __init__(self, config: NodeConfig, node_port: int | None = None, pass_lock: PassLock = no_lock) -> None:
        self.config = config
        self.node_port = node_port
        self.pass_lock = pass_lock
        self.key = _storage_key(config)
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._active = 0
        self._runners: set[PassRunner] = set()  # of the passes running now (stop interrupts them)
        self._idle = threading.Condition()
        self._progress: ProgressStore | None = None
        self._scheduler: BackgroundScheduler | None = None

    @property
    def scheduler(self) -> BackgroundScheduler:
        if self._scheduler is None:
            raise RuntimeError("retro scheduler not started")
        return self._scheduler

    def start(self) -> RetroScheduler:
        with _running_lock:
            if self.key in _running:
                raise RuntimeError(f"a retro scheduler already runs for {self.key} in this process")
            _running[self.key] = self
        try:
            self._start()
        except BaseException:
            self.stop(timeout_s=0)
            raise
        return self

    def _start(self) -> None:
        self._stop.clear()
        self._cancel.clear()
        self._progress = ProgressStore.open(self.config.node.storage_dir)
        scheduler = self._scheduler = _scheduler(self.config)
        scheduler.add_job(self._heartbeat, IntervalTrigger(seconds=self.config.retro.scheduler_poll_s),
                          id="heartbeat", jobstore=RUNTIME)
        sources = sorted({s.source for s in self._progress.interrupted()})
        for source in sources:
            scheduler.add_job(self._resume, DateTrigger(datetime.datetime.now()), args=[source],
                              id=f"resume:{source}", jobstore=RUNTIME, misfire_grace_time=None)
        scheduler.start()
        names = [j.id for j in scheduler.get_jobs(STORE)]
        logger.info("retro scheduler started: %d schedules %s%s", len(names), names,
                    f"; resuming interrupted retrievals from {sources}" if sources else "")

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop. Running passes end after their current series; after ``timeout_s`` (None: wait for that)
        their archive associations are aborted and the series in flight is left to be resumed at the next
        start."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        with self._idle:
            if not self._idle.wait_for(lambda: self._active == 0, timeout_s):
                logger.warning("retro scheduler: cancelling the retrievals in flight")
                for runner in self._runners:
                    runner.interrupt()
                self._idle.wait_for(lambda: self._active == 0, 30.0)
            busy = self._active > 0
        with _running_lock:
            if _running.get(self.key) is self:
                del _running[self.key]
        if self._progress is not None and not busy:
            self._progress.close()
        self._progress = None
        logger.info("retro scheduler stopped")

    @contextmanager
    def _pass(self) -> Iterator[PassRunner]:
        """A runner for one pass, counted as active until it ends."""
        if self._progress is None or self._stop.is_set():
            raise RuntimeError("retro scheduler not running")
        runner = PassRunner(self.config, self._progress, NodeView(self.config, self.node_port), stop=self._stop,
                            cancel=self._cancel)
        with self._idle:
            self._active += 1
            self._runners.add(runner)
        try:
            yield runner
        finally:
            runner.node.close()
            with self._idle:
                self._active -= 1
                self._runners.discard(runner)
                self._idle.notify_all()

    def _heartbeat(self) -> None:
        """Nothing: the wake-up makes the scheduler read the store again (schedules changed by the CLI)."""

    def fire(self, spec: ScheduleSpec) -> PassReport | None:
        """A firing of schedule ``spec``: its pass, unless it repeats one of the hour that the end of daylight
        saving time repeats (see the module's docstring)."""
        progress = self._progress
        if progress is not None and fires_at_most_hourly(spec.cron):
            now = time.time()
            if any(repeats_wall_clock(run.started_at, now) for run in progress.runs(schedule=spec.name, limit=10)):
                logger.info("schedule %s: skipped, it already ran at this local time before daylight saving time "
                            "ended", spec.name)
                return None
        return self.run_schedule(spec)

    def run_schedule(self, spec: ScheduleSpec) -> PassReport | None:
        """Run one pass of ``spec`` now (in the calling thread), unless another node of the installation is
        running that schedule (its ``retro:<name>`` lock)."""
        try:
            with self.pass_lock(f"retro:{spec.name}") as mine:
                if not mine:
                    logger.info("schedule %s: another node is running it; skipped here", spec.name)
                    return None
                with self._pass() as runner:
                    report = runner.run(spec.pass_spec())
        except Exception:
            logger.exception("schedule %s: the pass failed", spec.name)
            return None
        if report.retry_later and not self._stop.is_set() and self._scheduler is not None:
            when = datetime.datetime.now() + datetime.timedelta(seconds=self.config.retro.archive_retry_s)
            self._scheduler.add_job(self.run_schedule, DateTrigger(when), args=[spec], id=f"retry:{spec.name}",
                                    jobstore=RUNTIME, replace_existing=True)
            logger.warning("schedule %s: %s; trying again at %s", spec.name, report.message,
                           when.isoformat(timespec="seconds"))
        return report

    def _resume(self, source: str) -> None:
        try:
            with self.pass_lock(f"retro-resume:{source}") as mine:
                if not mine:
                    return
                with self._pass() as runner:
                    report = runner.run(PassSpec(source, resume_only=True))
        except Exception:
            logger.exception("resuming interrupted retrievals from %s failed", source)
            return
        if report.state is not RunState.FINISHED:
            logger.warning("resuming interrupted retrievals from %s: %s", source, report.summary())


def start_scheduler(config: NodeConfig, node: object | None = None) -> RetroScheduler:
    """Start running the stored schedules in this process (call after the node has started).

    ``node``: the running :class:`dicom_node.node.Node` (its bound port is used to check that the node
    answers before C-MOVE, its job store locks each pass so that several nodes never run one schedule at
    once); None uses ``node.port`` from the configuration and no lock.
    """
    port = getattr(node, "port", None) if node is not None else None
    store, member = getattr(node, "store", None), getattr(node, "member_id", None)
    lock = job_store_lock(store, member) if store is not None and isinstance(member, str) else no_lock
    return RetroScheduler(config, port if isinstance(port, int) else None, lock).start()
