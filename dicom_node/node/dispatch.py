"""Dispatch: C-STORE the results of processed jobs to every destination, with retries and a dead letter.

Deliveries live in the job store (one per job and destination). The dispatcher thread picks the due
ones, at most one association per destination at a time, and records the outcome: ``sent``; or a
later attempt after ``backoff_initial_s * 2**(attempt-1)`` (at most ``backoff_max_s``); or ``dead``
after ``max_attempts`` attempts (``synthmrf jobs retry`` makes it pending again). An attempt that
could not send every result file (one is missing or unreadable) is a failed attempt. A resend carries
the same SOP Instance UIDs, so a destination that already has an object keeps one copy.

Each destination receives the kinds of result listed in its ``outputs`` (:mod:`pipeline.result_kinds`). A
kind whose SOP class the destination does not accept (a PACS without Parametric Map support) is refused
for good, not retried: the rest is delivered, and the delivery's detail names what went and what was
refused (``synthmrf jobs show``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dicom_node.config import Destination, DispatchSection, NodeConfig
from dicom_node.dimse.client import Peer, StoreReport, store_files
from dicom_node.node.job_store import Delivery, JobStore
from pipeline.result_kinds import OTHER, kind_of

logger = logging.getLogger(__name__)

Sender = Callable[[Sequence[Path], Peer, str, float, float], StoreReport]


def backoff_s(attempts: int, cfg: DispatchSection) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (exponential, capped)."""
    return float(min(cfg.backoff_initial_s * 2 ** max(attempts - 1, 0), cfg.backoff_max_s))


def delivery_detail(report: StoreReport) -> str:
    """Which kinds went (files per kind) and which the destination refused by SOP class."""
    def counts(paths: Sequence[Path]) -> str:
        per_kind = Counter(kind_of(p.name) for p in paths)
        return ", ".join(f"{kind} {n}" for kind, n in sorted(per_kind.items()))

    text = f"sent {counts(report.stored) or 'nothing'}"
    if report.refused:
        why = sorted({reason for _, reason in report.refused})
        text += f"; refused by the destination: {counts([p for p, _ in report.refused])} ({'; '.join(why)})"
    return text


def peer_of(d: Destination) -> Peer:
    return Peer(d.ae_title, d.host, d.port, d.tls, d.tls_ca, d.tls_cert, d.tls_key)


class Dispatcher:
    """The dispatcher thread and its per-destination senders."""

    def __init__(self, cfg: NodeConfig, store: JobStore, send: Sender = store_files,
                 observe: Callable[[str, str], None] = lambda destination, outcome: None, owner: str = "") -> None:
        self.cfg = cfg
        self.owner = owner  # the node's member id: its sends are taken over if the node dies
        self.store = store
        self.send = send
        self.observe = observe
        self._destinations = {d.name: d for d in cfg.destinations}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    def wake(self, job_id: str | None = None) -> None:
        """Look for due deliveries now (a job was processed, or a retry was requested)."""
        self._wake.set()

    def run_once(self) -> int:
        """Start every due delivery whose destination is idle; return how many were started."""
        with self._lock:
            busy = sorted(self._busy)
        started = 0
        for delivery in self.store.due_deliveries(time.time(), busy):
            with self._lock:
                if delivery.destination in self._busy:
                    continue
                self._busy.add(delivery.destination)
            if self._pool is None:
                self._deliver(delivery)
            else:
                self._pool.submit(self._deliver, delivery)
            started += 1
        return started

    def _deliver(self, due: Delivery) -> None:
        try:
            self._attempt(due)
        except Exception:
            logger.exception("delivery of job %s to %s: unexpected error", due.job_id, due.destination)
        finally:
            with self._lock:
                self._busy.discard(due.destination)
            self._wake.set()

    def _attempt(self, due: Delivery) -> None:
        extra = {"job_id": due.job_id, "destination": due.destination}
        dest = self._destinations.get(due.destination)
        delivery = self.store.start_delivery(due.job_id, due.destination, self.owner)
        if delivery is None:
            return
        job = self.store.job(due.job_id)
        error = detail = ""
        if dest is None:
            error = f"destination {due.destination!r} is no longer configured"
        elif job is None or not job.results:
            error = "no result files recorded"
        else:
            wanted = {*dest.outputs, OTHER}
            files = [Path(p) for p in job.results if kind_of(Path(p).name) in wanted]
            try:
                report = self.send(files, peer_of(dest), self.cfg.calling_ae_title,
                                   self.cfg.dispatch.connect_timeout_s, self.cfg.dispatch.dimse_timeout_s)
                if not report.ok:
                    error = "; ".join(f"{p.name}: {why}" for p, why in report.failed[:3])
                elif report.skipped:  # a partial result is not a delivery
                    error = (f"{len(report.skipped)} of {len(files)} result files unreadable, not sent: "
                             + "; ".join(f"{p.name}: {why}" for p, why in report.skipped[:3]))
                detail = delivery_detail(report)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if not error:
            all_sent = self.store.delivery_sent(due.job_id, due.destination, detail)
            self.observe(due.destination, "sent")
            logger.info("job %s: results sent to %s (attempt %d): %s%s", due.job_id, due.destination,
                        delivery.attempts, detail, "; job delivered" if all_sent else "", extra=extra)
            return
        if delivery.attempts >= self.cfg.dispatch.max_attempts or dest is None:
            self.store.delivery_failed(due.job_id, due.destination, error, None)
            self.observe(due.destination, "dead")
            logger.error("job %s: delivery to %s failed %d times, dead-lettered ('synthmrf jobs retry %s'): %s",
                         due.job_id, due.destination, delivery.attempts, due.job_id, error, extra=extra)
            return
        delay = backoff_s(delivery.attempts, self.cfg.dispatch)
        self.store.delivery_failed(due.job_id, due.destination, error, time.time() + delay)
        self.observe(due.destination, "retry")
        logger.warning("job %s: delivery to %s failed (attempt %d of %d), next in %.1f s: %s", due.job_id,
                       due.destination, delivery.attempts, self.cfg.dispatch.max_attempts, delay, error, extra=extra)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._busy)

    # -- thread ----------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                next_at = self.store.next_delivery_at()
            except Exception:
                logger.exception("dispatcher loop error")
                next_at = None
            timeout = 1.0 if next_at is None else min(1.0, max(0.05, next_at - time.time()))
            self._wake.wait(timeout)
            self._wake.clear()

    def start(self) -> None:
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._destinations)), thread_name_prefix="dispatch")
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop picking deliveries; let sends in progress end (bounded by their own timeouts)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._thread = None
        self._pool = None
