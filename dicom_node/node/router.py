"""From a complete series to a job: claim the spooled instances, apply the MPRAGE rules, queue or ignore.

Policies (deliberate, visible in ``synthmrf jobs``):

- Duplicates: an instance whose SOP Instance UID the series already holds is acknowledged (Success)
  and dropped by the spool; a series sent twice therefore makes no new version, no job, no result.
- Late instances: new instances of a series that was already claimed start a new version once the
  series is quiet again. Version N+1 holds every instance (the earlier ones are hard-linked), is
  judged by the rules again and, if it is an MPRAGE, processed again: the destination receives a new
  result series (new UIDs) that references the same source series, so the latest result covers the
  whole series. Job ids are ``<SeriesInstanceUID>-v<N>``.
- Other series (not an MPRAGE by the rules, or an unreadable header) get an ``ignored`` job with the
  reason, a log line, and are deleted after ``retention.ignored_days``.
- Failures: a claim or a job creation that raised leaves a ``.vN.claim`` folder or a version without
  a job. Before each hand-over of a series, and for every series from the node's housekeeping loop,
  :meth:`Router.reconcile` settles these as a restart would (finishes the claim, creates the job); a
  version is therefore never claimed while the previous one is unfinished.
- Several nodes on one storage folder: every hand-over and reconciliation of a series holds the
  series' lock in the job store (``series:<uid>``), so one node at a time owns a series.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import dcmread

from dicom_node.config import MprageSection
from dicom_node.node.job_store import Job, JobState, JobStore
from dicom_node.node.series_rules import Decision, classify
from dicom_node.node.spool import SUFFIX, Claim, Spool

logger = logging.getLogger(__name__)


class Router:
    """Turns claimed series versions into jobs (a queued job is what the workers claim)."""

    def __init__(self, spool: Spool, store: JobStore, rules: MprageSection, owner: str) -> None:
        self.spool = spool
        self.store = store
        self.rules = rules
        self.owner = owner  # the node's member id, for the series locks
        self._lock = threading.Lock()  # one hand-over or reconciliation at a time in this process

    @contextmanager
    def _series(self, series_uid: str) -> Iterator[None]:
        with self._lock, self.store.locked(f"series:{series_uid}", self.owner, ttl_s=600.0, wait_s=120.0):
            yield

    def series_complete(self, series_uid: str, why: str) -> Job | None:
        """The assembler's callback: reconcile the series, then claim what arrived and route it (None if nothing
        was waiting)."""
        with self._series(series_uid):
            self.settle(series_uid)
            claim = self.spool.claim(series_uid, at_least=self.store.next_version(series_uid))
            if claim is None:
                return None
            return self.route(claim, why)

    def settle(self, series_uid: str) -> list[Job]:
        """Finish an interrupted claim of the series and create the jobs its versions lack (the jobs routed)."""
        jobs = [self.route(claim, "claim finished after an interruption")
                for claim in self.spool.finish_interrupted_claims([series_uid])]
        for version in self.spool.versions(series_uid):
            if not self.store.has_job(series_uid, version):
                jobs.append(self.route(self.spool.claim_of(series_uid, version), "version found without a job"))
        return jobs

    def reconcile(self, series_uid: str | None = None) -> int:
        """:meth:`settle` the series (default: every series); return how many jobs were routed."""
        uids = self.spool.series_uids() if series_uid is None else [series_uid]
        routed = 0
        for uid in uids:
            with self._series(uid):
                routed += len(self.settle(uid))
        return routed

    def route(self, claim: Claim, why: str) -> Job:
        """Create the job of a claimed version (idempotent) and queue it if it is an MPRAGE."""
        first = min((p for p in claim.input_dir.iterdir() if p.name.endswith(SUFFIX)), default=None)
        study = ""
        try:
            if first is None:
                raise FileNotFoundError(f"{claim.input_dir}: no instances")
            header = dcmread(first, stop_before_pixels=True)
            study = str(header.get("StudyInstanceUID", ""))
            decision = classify(header, self.rules)
        except Exception as exc:
            decision = Decision(False, f"header unreadable ({type(exc).__name__}: {exc})")
        state = JobState.QUEUED if decision.accepted else JobState.IGNORED
        job = self.store.create_job(claim.series_uid, claim.version, study, claim.total_instances, state,
                                    decision.reason)
        extra = {"series_uid": claim.series_uid, "study_uid": study, "job_id": job.id}
        if job.state is JobState.QUEUED:
            logger.info("series %s version %d complete (%s): %d instances, %s; job %s queued", claim.series_uid,
                        claim.version, why, claim.total_instances, decision.reason, job.id, extra=extra)
        else:
            logger.info("series %s version %d complete (%s): %d instances, ignored: %s", claim.series_uid,
                        claim.version, why, claim.total_instances, job.reason, extra=extra)
        return job
