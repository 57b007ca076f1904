"""Retention: delete the folders of series versions whose job ended long enough ago, and earlier when the
disk fills.

Kept for ``ignored_days`` (not an MPRAGE), ``processed_days`` (delivered everywhere) or
``failed_days`` (rejected, failed, or a delivery dead-lettered). Below ``high_water_free_mb`` free,
:func:`relieve_pressure` removes finished versions before their time, oldest first: those not an MPRAGE or
delivered, then rejected or failed ones; never a version that is queued, processing, or has a delivery
pending or dead-lettered (its results are not where they should be yet), and never ``incoming/``.
The job rows stay (marked purged), so ``synthmrf jobs`` still shows them and a re-sent series gets a new
version number; duplicate detection for a purged series ends with its folder.
"""

from __future__ import annotations

import logging
import time

from dicom_node.config import RetentionSection
from dicom_node.node.job_store import JobStore
from dicom_node.node.spool import Spool

logger = logging.getLogger(__name__)

DAY_S = 86400.0


def sweep(store: JobStore, spool: Spool, cfg: RetentionSection, now: float | None = None) -> int:
    """Purge every version past its retention; return how many were purged."""
    now = time.time() if now is None else now
    cutoffs = {
        "ignored": now - cfg.ignored_days * DAY_S,
        "delivered": now - cfg.processed_days * DAY_S,
        "rejected": now - cfg.failed_days * DAY_S,
        "failed": now - cfg.failed_days * DAY_S,
        "dead": now - cfg.failed_days * DAY_S,
    }
    purged = 0
    for job in store.purgeable(cutoffs):
        spool.purge_version(job.series_uid, job.version)
        store.mark_purged(job.id)
        purged += 1
        logger.info("retention: removed series %s version %d (job %s, %s)", job.series_uid, job.version, job.id,
                    job.state, extra={"series_uid": job.series_uid, "job_id": job.id})
    return purged


PRESSURE_ORDER = (("ignored", "delivered"), ("rejected", "failed"))  # what goes first when the disk fills


def relieve_pressure(store: JobStore, spool: Spool, cfg: RetentionSection, now: float | None = None) -> int:
    """Below ``cfg.high_water_free_mb`` free, purge finished versions (see the module docstring) until it is
    free again or nothing may go; return how many were purged."""
    target = cfg.high_water_free_mb * 2**20
    if not target or spool.free_bytes() >= target:
        return 0
    now = time.time() if now is None else now
    purged = 0
    for states in PRESSURE_ORDER:
        for job in sorted(store.purgeable(dict.fromkeys(states, now)), key=lambda j: j.finished_at or 0.0):
            if spool.free_bytes() >= target:
                return purged
            spool.purge_version(job.series_uid, job.version)
            store.mark_purged(job.id)
            purged += 1
            logger.warning("disk pressure (less than retention.high_water_free_mb %d MiB free): removed series %s "
                           "version %d (job %s, %s) before its retention ended", cfg.high_water_free_mb,
                           job.series_uid, job.version, job.id, job.state,
                           extra={"series_uid": job.series_uid, "job_id": job.id})
    if spool.free_bytes() < target:
        logger.warning("disk pressure: %d MiB free, below retention.high_water_free_mb %d MiB, and no finished "
                       "series left to remove", spool.free_bytes() // 2**20, cfg.high_water_free_mb)
    return purged
