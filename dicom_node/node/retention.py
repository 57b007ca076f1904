"""Retention: delete the folders of series versions whose job ended long enough ago.

Kept for ``ignored_days`` (not an MPRAGE), ``processed_days`` (delivered everywhere) or
``failed_days`` (rejected, failed, or a delivery dead-lettered). The job rows stay (marked purged), so
``synthmrf jobs`` still shows them and a re-sent series gets a new version number; duplicate detection
for a purged series ends with its folder.
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
