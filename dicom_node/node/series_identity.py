"""Does an arriving instance belong to the same study and patient as the rest of its series?

The spool groups instances by SeriesInstanceUID alone. A stored instance whose StudyInstanceUID or
PatientID differs from what its series already holds (in ``incoming/`` or a claimed version) is logged,
with UIDs only, and counted; it is kept (nothing acknowledged is thrown away), and the pipeline then
refuses to process the series, naming the attributes that disagree, so nobody gets maps filed under
the wrong patient. A corrected series resent under the same SOP Instance UIDs is a duplicate and
dropped: a patient correction needs new UIDs or a new series, or an operator.

What a series holds is remembered from its first instance, or read from one of its spooled files the
first time this process sees it. PatientIDs are kept only as keyed digests (``instances.patient_key``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from dicom_node.node.instances import InstanceInfo, read_instance_info
from dicom_node.node.spool import SUFFIX, Spool

logger = logging.getLogger(__name__)

MAX_SERIES = 10_000  # series remembered; one forgotten is read back from the spool when it is seen again
Identity = tuple[str, str]  # (StudyInstanceUID, patient key)


class SeriesIdentities:
    """The identity each series arrived with; :meth:`check` reports instances that disagree."""

    def __init__(self, spool: Spool, count: Callable[[str], None]) -> None:
        self.spool = spool
        self.count = count
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Identity] = OrderedDict()
        self._warned: set[tuple[str, Identity]] = set()

    def check(self, info: InstanceInfo) -> list[str]:
        """The attributes in which ``info`` differs from its series (logged once per series and identity, each
        instance counted); empty when it agrees or is the series' first."""
        series = info.series_instance_uid
        mine = (info.study_instance_uid, info.patient_key)
        with self._lock:
            held = self._held.get(series)
        if held is None:
            held = self._from_spool(series) or mine
        with self._lock:
            held = self._held.setdefault(series, held)
            self._held.move_to_end(series)
            while len(self._held) > MAX_SERIES:
                self._held.popitem(last=False)
            differs = [name for name, a, b in (("StudyInstanceUID", mine[0], held[0]),
                                               ("PatientID", mine[1], held[1])) if a != b]
            first = bool(differs) and (series, mine) not in self._warned
            if first:
                self._warned.add((series, mine))
                if len(self._warned) > MAX_SERIES:
                    self._warned.clear()
        for name in differs:
            self.count(name)
        if first:
            logger.warning("series %s: instance %s differs from the instances the series holds in %s (its study %s, "
                           "the series' study %s); stored anyway",
                           series, info.sop_instance_uid, " and ".join(differs), info.study_instance_uid, held[0],
                           extra={"series_uid": series, "sop_uid": info.sop_instance_uid,
                                  "study_uid": info.study_instance_uid})
        return differs

    def _from_spool(self, series_uid: str) -> Identity | None:
        """The identity of one instance the spool holds for the series, or None (also when the series' files
        move or go while they are looked at: the check never stops an instance from being stored)."""
        try:
            candidates = self.spool.incoming_files(series_uid)[:1]
            versions = self.spool.versions(series_uid)
            if versions:
                inputs = self.spool.version_dir(series_uid, versions[-1]) / "input"
                candidates += sorted(inputs.glob(f"*{SUFFIX}"))[:1]
        except OSError:
            return None
        for path in candidates:
            try:
                info = read_instance_info(Path(path))
            except Exception:  # claimed or purged meanwhile, or unreadable: try the next one
                continue
            return info.study_instance_uid, info.patient_key
        return None
