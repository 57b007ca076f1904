"""C-MOVE and C-GET SCU for one series (or some of its instances), and the C-STORE handler that files
what a C-GET (or a harvest's own storage SCP) receives.

A retrieve reads every response: pending ones (0xFF00) carry the sub-operation counts and reset the
silence timer (``retrieve_timeout_s`` is the longest silence allowed, not a limit on the whole
transfer, so archives that send pending responses for minutes are fine). The final response says
success, warning (0xB000: some sub-operations failed) or failure; the result keeps the counts, the
failed SOP Instance UIDs the archive listed, and the status in words. A retrieve is complete only if
nothing failed: no failed count, no listed failed instance, and no 0xB000 that leaves out the failed
count (completeness cannot be shown then); otherwise the series is recorded failed and a later pass
fetches the instances still missing. A retrieve interrupted on our side (Ctrl-C, an exception) sends
C-CANCEL and aborts the association: the caller records the series as interrupted, and the next pass
fetches what is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.association import Association

from dicom_node.dimse.status import (
    CANCELLED,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUBOPERATIONS_WARNING,
    SUCCESS,
)
from dicom_node.retro.association import (
    GET_MODEL,
    MOVE_MODEL,
    Archive,
    ArchiveError,
    ArchiveUnavailableError,
    status_text,
)

logger = logging.getLogger(__name__)


Progress = Callable[[int, int | None], None]  # (sub-operations done, total if known)


@dataclass
class RetrieveResult:
    """What the archive reported for one C-MOVE/C-GET."""

    status: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    comment: str = ""
    failures_uncounted: bool = False  # a final 0xB000 without NumberOfFailedSuboperations

    @property
    def ok(self) -> bool:
        """Every sub-operation succeeded (or ended with a warning: the instance was stored), provably."""
        return (self.status in (SUCCESS, SUBOPERATIONS_WARNING) and self.failed == 0 and not self.failed_uids
                and not self.failures_uncounted)

    def describe(self) -> str:
        text = f"{status_text(self.status)}; {self.completed} completed, {self.failed} failed, {self.warning} warning"
        if self.failed_uids:
            text += f"; {len(self.failed_uids)} instances listed as failed"
        if self.failures_uncounted:
            text += "; the archive did not say how many sub-operations failed"
        return text + (f"; {self.comment}" if self.comment else "")


def _count(ds: Dataset | None, keyword: str) -> int | None:
    if ds is None or keyword not in ds or ds[keyword].value in (None, ""):
        return None
    return int(ds[keyword].value)


def _identifier(study_uid: str, series_uid: str, sop_uids: Sequence[str] | None) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if sop_uids:
        ds.QueryRetrieveLevel = "IMAGE"
        ds.SOPInstanceUID = list(sop_uids)
    else:
        ds.QueryRetrieveLevel = "SERIES"
    return ds


def retrieve(assoc: Association, archive: Archive, study_uid: str, series_uid: str, *, method: str,
             sop_uids: Sequence[str] | None = None, on_progress: Progress | None = None) -> RetrieveResult:
    """C-MOVE (to ``archive.move_destination``) or C-GET (instances go to the association's C-STORE
    handler) of a series, or of ``sop_uids`` of it. Raises :class:`ArchiveUnavailableError` when the
    association is lost or silent for longer than ``retrieve_timeout_s``, :class:`ArchiveError` for a
    refusal that retrying cannot fix (unknown move destination)."""
    ident = _identifier(study_uid, series_uid, sop_uids)
    assoc.dimse_timeout = archive.source.retrieve_timeout_s  # the longest silence between two responses
    if method == "move":
        responses = assoc.send_c_move(ident, archive.move_destination, MOVE_MODEL)
    elif method == "get":
        responses = assoc.send_c_get(ident, GET_MODEL)
    else:
        raise ValueError(f"method: expected 'move' or 'get', got {method!r}")
    result = RetrieveResult()
    finished = False
    try:
        for status, found in responses:
            code = int(status.Status) if status is not None and "Status" in status else None
            completed = _count(status, "NumberOfCompletedSuboperations")
            failed = _count(status, "NumberOfFailedSuboperations")
            warning = _count(status, "NumberOfWarningSuboperations")
            remaining = _count(status, "NumberOfRemainingSuboperations")
            result.completed = completed if completed is not None else result.completed
            result.failed = failed if failed is not None else result.failed
            result.warning = warning if warning is not None else result.warning
            if code == PENDING:
                if on_progress is not None:
                    done = result.completed + result.failed + result.warning
                    on_progress(done, None if remaining is None else done + remaining)
                continue
            result.status = code
            result.failures_uncounted = code == SUBOPERATIONS_WARNING and failed is None
            if status is not None:
                result.comment = str(status.get("ErrorComment", "")).strip()
            if found is not None and "FailedSOPInstanceUIDList" in found:
                value = found.FailedSOPInstanceUIDList
                values = value if isinstance(value, list | tuple | MultiValue) else [value]
                result.failed_uids = [str(v) for v in values if str(v)]
            break
        finished = True
    finally:
        if not finished and assoc.is_established:  # interrupted on our side: stop the archive's transfer
            try:
                ctx = next(c for c in assoc.accepted_contexts
                           if c.abstract_syntax == (MOVE_MODEL if method == "move" else GET_MODEL))
                assoc.send_c_cancel(1, ctx.context_id)
            except Exception:  # the association may already be unusable; it is aborted next
                logger.debug("C-CANCEL not sent", exc_info=True)
            assoc.abort()
    what = f"{'C-MOVE' if method == 'move' else 'C-GET'} of series {series_uid}"
    if result.status is None:
        raise ArchiveUnavailableError(f"{archive}: {what}: no response within {archive.source.retrieve_timeout_s:g} s "
                                      "or association lost")
    if result.status == MOVE_DESTINATION_UNKNOWN:
        raise ArchiveError(f"{archive}: {what} refused: the archive does not know the move destination "
                           f"{archive.move_destination!r}; add it (AE title, host, port of the node) to the archive's "
                           "DICOM peers")
    if result.status == CANCELLED:
        result.comment = result.comment or "cancelled by the archive"
    logger.info("%s: %s", what, result.describe(), extra={"series_uid": series_uid, "study_uid": study_uid})
    return result

