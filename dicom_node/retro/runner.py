"""One retrospective pass: find MPRAGE series in an archive and have them retrieved into the node.

A pass (``synthmrf retro run``, or a schedule firing inside ``synthmrf serve``):

1. records a run; outside its run window it records ``skipped`` and stops; for C-MOVE it first checks
   that the node answers C-ECHO (the archive sends the instances there);
2. resumes series that an earlier pass left half-retrieved (see below);
3. C-FINDs the studies matching the study-level keys, then each study's series (series-level keys);
   keeps the series the MPRAGE pre-filter accepts (``query.prefilter``) that are neither done
   (retrieved, given up, or already received by the node: its spool or job store knows the
   SeriesInstanceUID) nor failed recently;
4. for each study with something to fetch, up to ``max_studies_per_run``: waits while the node has
   ``max_queued_jobs`` jobs queued or processing (or series still arriving), keeps to the rate limit,
   then claims each series in the progress store and retrieves it: C-MOVE to the node's AE, or C-GET
   into a scratch folder and C-STORE to the node. The node's storage SCP, series assembly, job queue
   and dispatch do the rest, exactly as for prospectively sent series;
5. stops between series when the window closes or a stop is requested (the rest waits for the next
   pass), and records the outcome.

Resuming: a series whose retrieval was interrupted (process killed, Ctrl-C, node down mid-transfer,
partial failure) is fetched again at IMAGE level, only the SOP instances the node's spool does not
hold, so nothing is fetched twice. An unreachable or refusing archive ends the pass with state
``failed`` and a message; nothing is lost, and the next pass (or the scheduler's retry) tries again.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset

from dicom_node.config import ConfigError, NodeConfig
from dicom_node.dimse.client import AssociationError, Peer, echo, store_files
from dicom_node.node.job_store import STATE_FILE, JobState, JobStore, open_job_store
from dicom_node.node.spool import SUFFIX, Spool
from dicom_node.retro.association import (
    Archive,
    ArchiveError,
    ArchiveSession,
    ArchiveUnavailableError,
    SourceSlots,
    archive_for,
)
from dicom_node.retro.config import SourceConfig, in_window
from dicom_node.retro.progress import DONE, ProgressStore, RunState, SeriesState
from dicom_node.retro.query import (
    Query,
    find_instances,
    find_series,
    find_studies,
    parse_query,
    prefilter,
    redacted,
)
from dicom_node.retro.retrieve import RetrieveResult, retrieve

logger = logging.getLogger(__name__)

IMAGE_LEVEL_CHUNK = 200  # SOP Instance UIDs per IMAGE-level retrieve when resuming
BUSY_POLL_S = 1.0


class NodeUnavailableError(RuntimeError):
    """The node does not answer C-ECHO: C-MOVE would send the instances nowhere."""


def source_config(config: NodeConfig, name: str) -> SourceConfig:
    """The ``[[sources]]`` entry called ``name``; ConfigError naming the configured ones otherwise."""
    found = [s for s in config.sources if s.name == name]
    if not found:
        raise ConfigError(f"source {name!r}: not configured (configured: {[s.name for s in config.sources]})")
    if len(found) > 1:
        raise ConfigError(f"source {name!r}: configured {len(found)} times; names must be unique")
    return found[0]


def node_peer(config: NodeConfig, port: int | None = None) -> Peer:
    """The node's own listener as seen from this machine."""
    host = "127.0.0.1" if config.node.host in ("0.0.0.0", "", "::") else config.node.host
    return Peer(config.node.ae_title, host, port if port is not None else config.node.port)


class NodeView:
    """What a pass needs to know about the node: which series it holds, how busy it is, whether it listens.

    Reads the node's storage folder (spool and job store), so it works from another process.
    """

    def __init__(self, config: NodeConfig, port: int | None = None) -> None:
        self.config = config
        self.storage_dir = Path(config.node.storage_dir)
        self.peer = node_peer(config, port)
        self._store: JobStore | None = None

    def _jobs(self) -> JobStore | None:
        if self._store is None:
            jobs = self.config.jobs
            if jobs.backend != "sqlite" or (self.storage_dir / STATE_FILE).is_file():
                self._store = open_job_store(self.storage_dir, jobs.backend, jobs.database_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def has_series(self, series_uid: str) -> bool:
        spool = Spool(self.storage_dir)
        try:
            if spool.series_dir(series_uid).is_dir():
                return True
        except ValueError:
            return False
        store = self._jobs()
        return store is not None and any(j.series_uid == series_uid for j in store.find(series_uid))

    def held_instances(self, series_uid: str) -> set[str]:
        """SOP Instance UIDs of the series in the spool (arriving or in any version)."""
        spool = Spool(self.storage_dir)
        folders = [spool.series_dir(series_uid) / "incoming"]
        folders += [spool.version_dir(series_uid, v) / "input" for v in spool.versions(series_uid)]
        held: set[str] = set()
        for folder in folders:
            if folder.is_dir():
                held.update(p.name[:-len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX))
        return held

    def busy(self, held: Collection[str] = ()) -> int:
        """Jobs queued or processing, plus series still arriving, not counting ``held``: series the node
        holds until a later pass fetches the rest (``ProgressStore.held_series``). Counting those would
        let partly failed series fill the queue and stall the very passes that complete them."""
        store = self._jobs()
        n = 0
        if store is not None:
            counts = store.counts()
            n += counts.get(f"job:{JobState.QUEUED}", 0) + counts.get(f"job:{JobState.PROCESSING}", 0)
        spool = Spool(self.storage_dir)
        n += sum(1 for s in spool.series_uids() if s not in held and spool.incoming_files(s))
        return n

    def check_listening(self, calling_ae_title: str) -> None:
        try:
            code = echo(self.peer, calling_ae_title, timeout_s=5.0)
        except (AssociationError, OSError) as exc:
            raise NodeUnavailableError(f"the node {self.peer} does not answer ({exc}); C-MOVE needs it running: "
                                       "start 'synthmrf serve' (or use a C-GET source)") from exc
        if code != 0:
            raise NodeUnavailableError(f"the node {self.peer} answers C-ECHO with status 0x{code:04X}")


@dataclass(frozen=True)
class PassSpec:
    """What one pass fetches and under which limits (None: the ``[retro]`` defaults)."""

    source: str
    query: Mapping[str, str] = field(default_factory=dict)
    max_studies: int | None = None
    max_studies_per_hour: float | None = None
    window: str | None = None
    dry_run: bool = False
    schedule: str | None = None
    resume_only: bool = False  # only finish interrupted retrievals (no C-FIND for new studies)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["query"] = dict(self.query)
        return d


@dataclass(frozen=True)
class PlannedSeries:
    study_uid: str
    series_uid: str
    description: str
    series_number: str
    expected: int | None
    reason: str
    resume: bool = False


@dataclass
class PassReport:
    """The outcome of a pass (also in the progress store as the run ``run_id``)."""

    run_id: int
    state: RunState = RunState.RUNNING
    message: str = ""
    studies_found: int = 0
    studies: int = 0
    planned: list[PlannedSeries] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    instances: int = 0
    retry_later: bool = False  # the archive or the node could not be reached: worth trying again soon

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def summary(self) -> str:
        parts = [f"run {self.run_id} {self.state}: {self.studies_found} studies found, {self.studies} with work"]
        if self.planned and not self.fetched:
            parts.append(f"{len(self.planned)} series planned")
        parts.append(f"{len(self.fetched)} series fetched ({self.instances} instances)")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        return "; ".join(parts) + (f". {self.message}" if self.message else "")


class PassEvents(Protocol):
    """Progress callbacks (the CLI draws tqdm bars with them); every method may be a no-op."""

    def studies_found(self, n: int) -> None: ...
    def study_done(self) -> None: ...
    def series_started(self, item: PlannedSeries) -> None: ...
    def series_progress(self, item: PlannedSeries, done: int, total: int | None) -> None: ...
    def series_done(self, item: PlannedSeries, ok: bool) -> None: ...


class NoEvents:
    def studies_found(self, n: int) -> None:
        pass

    def study_done(self) -> None:
        pass

    def series_started(self, item: PlannedSeries) -> None:
        pass

    def series_progress(self, item: PlannedSeries, done: int, total: int | None) -> None:
        pass

    def series_done(self, item: PlannedSeries, ok: bool) -> None:
        pass


class PassCancelledError(Exception):
    """A stop cancelled the series in flight (it stays 'retrieving' and is resumed)."""


CANCELLED_MESSAGE = "cancelled mid-series by a stop; the series is resumed by the next start or pass"


class _StopPassError(Exception):
    """The pass stops between series (window closed, stop requested)."""


class PassRunner:
    """Runs passes for one node configuration (thread-safe: each call to :meth:`run` is independent)."""

    def __init__(self, config: NodeConfig, progress: ProgressStore, node: NodeView, *,
                 stop: threading.Event | None = None, cancel: threading.Event | None = None) -> None:
        self.config = config
        self.progress = progress
        self.node = node
        self.stop = stop or threading.Event()  # set: the pass ends before its next series
        self.cancel = cancel or threading.Event()  # set: the series in flight is cancelled (C-CANCEL) and resumed later
        self.retro_dir = Path(config.node.storage_dir) / "retro"
        self._sessions: set[ArchiveSession] = set()  # open in running passes (see interrupt)
        self._sessions_lock = threading.Lock()

    def interrupt(self) -> None:
        """Cancel the series in flight now, from another thread: set ``cancel`` and abort the passes' archive
        associations, so a retrieve waiting on a silent archive returns at once. The series stays
        'retrieving' and is resumed by the next start or pass."""
        self.cancel.set()
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.abort()

    # -- the pass -----------------------------------------------------------------------------------------------

    def run(self, spec: PassSpec, events: PassEvents | None = None) -> PassReport:
        """One pass; never raises for archive or node trouble (the report says what happened)."""
        events = events or NoEvents()
        source = source_config(self.config, spec.source)
        query = parse_query(spec.query)
        archive = archive_for(source, self.config.node.ae_title)
        self.progress.reap_dead_runs()
        kind = "resume" if spec.resume_only else "pass"
        run_id = self.progress.start_run(kind, source.name, {**spec.as_dict(), "query": redacted(spec.query)},
                                         schedule=spec.schedule, dry_run=spec.dry_run)
        report = PassReport(run_id)
        get_dir = self.retro_dir / "get" / str(run_id) if source.retrieve == "get" else None
        session = ArchiveSession(archive, SourceSlots(self.retro_dir / "locks", source), self.stop, get_dir,
                                 check=lambda: self._check_continue(spec))
        with self._sessions_lock:
            self._sessions.add(session)
        extra = {"run_id": run_id, "source": source.name}
        logger.info("retro pass %d on %s started: %s", run_id, archive, redacted(spec.query), extra=extra)
        try:
            self._pass(spec, source, archive, query, session, report, events)
            if report.state is RunState.RUNNING:
                report.state = RunState.FINISHED
        except _StopPassError as exc:
            report.state, report.message = RunState.STOPPED, str(exc)
        except PassCancelledError:
            report.state, report.message = RunState.INTERRUPTED, CANCELLED_MESSAGE
        except (ArchiveError, NodeUnavailableError) as exc:
            if self.cancel.is_set():  # interrupt() aborted the association
                report.state, report.message = RunState.INTERRUPTED, CANCELLED_MESSAGE
            else:
                report.state, report.message = RunState.FAILED, f"{exc}; the next pass will try again"
                report.retry_later = True
                logger.warning("retro pass %d failed: %s", run_id, exc, extra=extra)
        except BaseException as exc:
            report.state = RunState.INTERRUPTED
            report.message = f"interrupted ({type(exc).__name__}); the next pass resumes"
            raise
        finally:
            with self._sessions_lock:
                self._sessions.discard(session)
            session.close(error=report.state is RunState.INTERRUPTED)
            if get_dir is not None:
                shutil.rmtree(get_dir, ignore_errors=True)
            self.progress.update_run(run_id, studies=report.studies, series_fetched=len(report.fetched),
                                     series_skipped=sum(report.skipped.values()), series_failed=len(report.failed),
                                     instances=report.instances)
            self.progress.finish_run(run_id, report.state, report.message)
            logger.info("retro pass %s", report.summary(), extra=extra)
        return report

    def _window(self, spec: PassSpec) -> str | None:
        return spec.window if spec.window is not None else self.config.retro.window

    def _check_continue(self, spec: PassSpec) -> None:
        if self.stop.is_set():
            raise _StopPassError("stop requested; the rest is left for the next pass")
        window = self._window(spec)
        if not in_window(window, datetime.datetime.now()):
            raise _StopPassError(f"the run window {window} closed; the rest is left for the next pass")

    def _pass(self, spec: PassSpec, source: SourceConfig, archive: Archive, query: Query, session: ArchiveSession,
              report: PassReport, events: PassEvents) -> None:
        window = self._window(spec)
        if not in_window(window, datetime.datetime.now()):
            report.state, report.message = RunState.SKIPPED, f"outside the run window {window}"
            return
        if source.retrieve == "move" and not spec.dry_run:  # C-MOVE sends to the node: no point without it
            self.node.check_listening(archive.calling_ae_title)
            session.node_checked = True
        cap = spec.max_studies or self.config.retro.max_studies_per_run
        if not spec.dry_run:
            self._resume_interrupted(spec, source, archive, session, report, events)
        if spec.resume_only:
            return
        studies = find_studies(session.assoc(), archive, query)
        report.studies_found = len(studies)
        events.studies_found(len(studies))
        for study in studies:
            if report.studies >= cap:
                report.message = f"cap of {cap} studies per run reached; the rest is left for the next pass"
                break
            self._check_continue(spec)
            study_uid = str(study.StudyInstanceUID)
            plan = self._plan(study_uid, find_series(session.assoc(), archive, study_uid, query), source, report,
                              dry_run=spec.dry_run)
            if plan:
                report.studies += 1
                if spec.dry_run:
                    report.planned += plan
                else:
                    self._fetch_study(spec, source, archive, session, plan, report, events)
            events.study_done()

    def _plan(self, study_uid: str, found: list[Dataset], source: SourceConfig, report: PassReport, *,
              dry_run: bool) -> list[PlannedSeries]:
        plan = []
        now = time.time()
        for ds in found:
            uid = str(ds.SeriesInstanceUID)
            description = str(ds.get("SeriesDescription", ""))
            decision = prefilter(ds, self.config.mprage)
            if not decision.accepted:
                report.skip("not MPRAGE")
                logger.debug("series %s skipped: %s", uid, decision.reason, extra={"series_uid": uid})
                continue
            record = self.progress.series(uid)
            if record is not None and record.state in DONE:
                report.skip(str(record.state))
                continue
            if record is not None and record.state is SeriesState.FAILED and (record.next_attempt_at or 0) > now:
                report.skip("failed, retry later")
                continue
            if record is not None and record.state is SeriesState.RETRIEVING and \
                    record.series_uid not in {s.series_uid for s in self.progress.interrupted()}:
                report.skip("being retrieved by another pass")
                continue
            if record is None and self.node.has_series(uid):
                report.skip(str(SeriesState.ALREADY_RECEIVED))
                if not dry_run:
                    self.progress.already_received(uid, study_uid, source.name, description)
                continue
            expected = ds.get("NumberOfSeriesRelatedInstances")
            plan.append(PlannedSeries(study_uid, uid, description, str(ds.get("SeriesNumber", "")),
                                      int(expected) if expected not in (None, "") else None, decision.reason,
                                      resume=record is not None))
        return plan

    def _resume_interrupted(self, spec: PassSpec, source: SourceConfig, archive: Archive, session: ArchiveSession,
                            report: PassReport, events: PassEvents) -> None:
        left = [s for s in self.progress.interrupted() if s.source == source.name]
        for s in left:
            self._check_continue(spec)
            item = PlannedSeries(s.study_uid, s.series_uid, s.description, "", s.expected, "interrupted", resume=True)
            logger.info("series %s: resuming an interrupted retrieval", s.series_uid,
                        extra={"series_uid": s.series_uid, "study_uid": s.study_uid})
            self._fetch_series(source, archive, session, item, report, events)

    # -- fetching -----------------------------------------------------------------------------------------------

    def _wait_turn(self, spec: PassSpec, source: SourceConfig, session: ArchiveSession,
                   last_start: float | None) -> None:
        """Back-pressure (the node's queue) and the rate limit; the association is closed while waiting."""
        limit = self.config.retro.max_queued_jobs
        closed = False
        while self.node.busy(self.progress.held_series(self.config.retro.hold_incomplete_s)) >= limit:
            if not closed:
                logger.info("waiting: the node has %d or more series queued or arriving", limit)
                session.close()
                closed = True
            self._check_continue(spec)
            self.stop.wait(BUSY_POLL_S)
        rate = spec.max_studies_per_hour or self.config.retro.max_studies_per_hour
        if rate:
            last = last_start if last_start is not None else self.progress.last_study_started_at(source.name)
            if last is not None:
                delay = last + 3600.0 / rate - time.time()
                if delay > 0:
                    if delay > 5.0:
                        session.close()
                    self._check_continue(spec)
                    if self.stop.wait(delay):
                        self._check_continue(spec)

    def _fetch_study(self, spec: PassSpec, source: SourceConfig, archive: Archive, session: ArchiveSession,
                     plan: list[PlannedSeries], report: PassReport, events: PassEvents) -> None:
        self._wait_turn(spec, source, session, session.last_study_start)
        session.last_study_start = time.time()
        for item in plan:
            self._check_continue(spec)
            self._fetch_series(source, archive, session, item, report, events)

    def _fetch_series(self, source: SourceConfig, archive: Archive, session: ArchiveSession, item: PlannedSeries,
                      report: PassReport, events: PassEvents) -> None:
        extra = {"series_uid": item.series_uid, "study_uid": item.study_uid, "run_id": report.run_id}
        if not session.node_checked:  # C-GET forwards to the node: check it before the first series
            self.node.check_listening(archive.calling_ae_title)
            session.node_checked = True
        claimed = self.progress.claim(item.series_uid, item.study_uid, source.name, report.run_id,
                                      description=item.description, expected=item.expected)
        if claimed is None:
            report.skip("being retrieved by another pass")
            return
        events.series_started(item)
        retro = self.config.retro
        try:
            result = self._retrieve(source, archive, session, item, claimed.attempts > 1, events)
        except ArchiveUnavailableError as exc:  # not the series' fault: it stays 'retrieving' and is resumed
            report.failed[item.series_uid] = str(exc)
            events.series_done(item, False)
            raise
        except (ArchiveError, AssociationError, OSError) as exc:
            state = self.progress.failed(item.series_uid, str(exc), retry_after_s=retro.retry_after_s,
                                         max_attempts=retro.max_attempts)
            report.failed[item.series_uid] = str(exc)
            events.series_done(item, False)
            logger.warning("series %s: retrieval failed (%s): %s", item.series_uid, state, exc, extra=extra)
            if isinstance(exc, ArchiveError) and "move destination" in str(exc):
                raise
            return
        report.instances += result.completed
        if result.ok:
            self.progress.retrieved(item.series_uid, result.completed)
            report.fetched.append(item.series_uid)
            events.series_done(item, True)
            return
        state = self.progress.failed(item.series_uid, result.describe(), retry_after_s=retro.retry_after_s,
                                     max_attempts=retro.max_attempts)
        report.failed[item.series_uid] = result.describe()
        events.series_done(item, False)
        logger.warning("series %s: retrieval incomplete (%s): %s", item.series_uid, state, result.describe(),
                       extra=extra)

    def _retrieve(self, source: SourceConfig, archive: Archive, session: ArchiveSession, item: PlannedSeries,
                  resume: bool, events: PassEvents) -> RetrieveResult:
        sop_chunks: list[list[str] | None] = [None]
        if resume:
            all_uids = find_instances(session.assoc(), archive, item.study_uid, item.series_uid)
            held = self.node.held_instances(item.series_uid)
            missing = [u for u in all_uids if u not in held]
            logger.info("series %s: %d of %d instances already at the node", item.series_uid,
                        len(all_uids) - len(missing), len(all_uids), extra={"series_uid": item.series_uid})
            if not missing:
                return RetrieveResult(status=0, completed=0)
            sop_chunks = [missing[i:i + IMAGE_LEVEL_CHUNK] for i in range(0, len(missing), IMAGE_LEVEL_CHUNK)]
        total = RetrieveResult(status=0)
        base = 0
        for chunk in sop_chunks:
            def progress(done: int, of: int | None, base: int = base) -> None:
                if self.cancel.is_set():
                    raise PassCancelledError(item.series_uid)
                self.progress.record_progress(item.series_uid, base + done, 0)
                events.series_progress(item, base + done, None if of is None else base + of)

            result = retrieve(session.assoc(), archive, item.study_uid, item.series_uid, method=source.retrieve,
                              sop_uids=chunk, on_progress=progress)
            if source.retrieve == "get" and session.get_dir is not None:
                self._forward(session.get_dir / item.series_uid, result)
            total.completed += result.completed
            total.failed += result.failed
            total.warning += result.warning
            total.failed_uids += result.failed_uids
            total.failures_uncounted = total.failures_uncounted or result.failures_uncounted
            total.comment = result.comment or total.comment
            if not result.ok:
                total.status = result.status
            base += result.completed + result.failed + result.warning
        return total

    def _forward(self, folder: Path, result: RetrieveResult) -> None:
        """C-GET mode: C-STORE what arrived to the node (its normal path), then delete it here."""
        files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
        if files:
            report = store_files(files, self.node.peer, self.config.calling_ae_title)
            if report.failed:
                result.failed += len(report.failed)
                result.completed -= len(report.failed)
                result.comment = f"{len(report.failed)} instances not accepted by the node: {report.failed[0][1]}"
        shutil.rmtree(folder, ignore_errors=True)


def iter_planned(report: PassReport) -> Iterator[dict[str, object]]:
    """The planned series of a dry run as plain dicts (for listing)."""
    for p in report.planned:
        yield asdict(p)
