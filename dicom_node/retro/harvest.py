"""Training-data harvest: studies with both an MPRAGE and an MRF SVD series, fetched from an archive
and handed to a training set (``training.harvested.HarvestedDataset``, given by the CLI) that writes the
dataset folder ``synthmrf train`` reads (its layout and splits: :mod:`training.harvested`).

A *subject* is one study (one session: the MPRAGE and the MRF share patient space). In each study
found with the study-level query keys, the MPRAGE is the first series (by SeriesNumber) that the node's
MPRAGE pre-filter accepts and that matches the series-level keys; the MRF is the last series whose
SeriesDescription matches ``retro.harvest_mrf_pattern`` (default ``mrf.?svd``), in the form documented
in :mod:`pipeline.mrf.svd_dicom`. Both are fetched with C-GET (source ``retrieve = "get"``) or with
C-MOVE to a storage SCP this command starts for the time of the harvest (AE ``retro.harvest_ae_title``
on ``retro.harvest_port``, which the archive must know) into ``OUT/.incoming/``: never to the node, so a
harvest triggers no processing. An interrupted harvest fetches only the instances still missing.

``<id>`` is ``sub-`` and the first 12 hex characters of the SHA-256 of the StudyInstanceUID: stable, so
repeated harvests skip subjects already there and add new ones; the manifest is rewritten from the
subject folders after each subject.

One volunteer scanned twice gives two subjects, so the split is by *group*: a keyed hash (HMAC-SHA-256)
of the study's IssuerOfPatientID and PatientID from the study-level C-FIND; the PatientID itself is
never written to disk or to a log. The key is the node's (``<storage_dir>/retro/harvest.key``, random,
mode 0600), never the dataset's: patient IDs have so few digits that anyone holding the key could test
every candidate, so a dataset handed to researchers must not carry it. A
study whose answer lacks a PatientID is a group of its own. Each new group goes to the split a hash of
(``retro.harvest_split_seed``, group) picks, in the proportions of the paper (30/2/5); a new subject of a
known group joins its group's split; and a split once recorded in the manifest never changes, so a
subject trained on never moves to ``test``. While ``train`` is empty, one new group is put there.
The dataset is pseudonymised by its folder names only: ``subject.json`` keeps the source UIDs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset

from dicom_node.config import NodeConfig, NodeSection
from dicom_node.dimse.folder_scp import FolderSCP
from dicom_node.dimse.storage_scp import ssl_context_for
from dicom_node.retro.association import (
    GET_STORAGE_CLASSES,
    Archive,
    ArchiveError,
    ArchiveSession,
    ArchiveUnavailableError,
    SourceSlots,
)
from dicom_node.retro.config import SourceConfig
from dicom_node.retro.progress import ProgressStore, RunState
from dicom_node.retro.query import (
    Query,
    find_instances,
    find_series,
    find_studies,
    matches,
    parse_query,
    prefilter,
    redacted,
)
from dicom_node.retro.retrieve import RetrieveResult, retrieve
from dicom_node.retro.runner import NoEvents, PassEvents, PlannedSeries, source_config

logger = logging.getLogger(__name__)

INCOMING = ".incoming"



class TrainingSet(Protocol):
    """Where fetched pairs become training subjects (``training.harvested.HarvestedDataset``)."""

    def dataset_hash(self, out: Path) -> str | None:
        """The sequence hash every subject of ``out`` shares (None: no subject yet)."""

    def has_subject(self, out: Path, subject: str) -> bool: ...

    def add_subject(self, out: Path, dataset_hash: str | None, *, subject: str, group: str, source: str,
                    study_uid: str, mprage_series_uid: str, mprage_dir: Path, mrf_series_uid: str,
                    mrf_files: Sequence[Path]) -> str:
        """Write the subject; return its sequence hash (ValueError: not this dataset's sequence)."""

    def write_manifest(self, out: Path, seed: int) -> Path | None: ...


def subject_id(study_uid: str) -> str:
    return "sub-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def patient_group(patient_id: str, issuer: str, salt: str) -> str:
    """The group of a patient in a dataset: a keyed hash of (issuer, PatientID); never the ID itself."""
    digest = hmac.new(salt.encode(), f"{issuer.strip()}\\{patient_id.strip()}".encode(), hashlib.sha256)
    return "grp-" + digest.hexdigest()[:16]


@dataclass(frozen=True)
class HarvestSpec:
    source: str
    out_dir: Path
    query: Mapping[str, str] = field(default_factory=dict)
    max_subjects: int | None = None
    dry_run: bool = False
    keep_dicom: bool = False


@dataclass(frozen=True)
class Pair:
    """One subject to harvest: a study with its MPRAGE and MRF series."""

    subject: str
    study_uid: str
    mprage: PlannedSeries
    mrf: PlannedSeries
    group: str  # the patient's group (patient_group), or the subject itself when the archive gave no PatientID


@dataclass
class HarvestReport:
    run_id: int
    state: RunState = RunState.RUNNING
    message: str = ""
    studies_found: int = 0
    pairs: list[Pair] = field(default_factory=list)
    harvested: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def summary(self) -> str:
        text = (f"harvest run {self.run_id} {self.state}: {self.studies_found} studies found, {len(self.pairs)} with "
                f"MPRAGE and MRF, {len(self.harvested)} subjects harvested")
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
        return text + (f". {self.message}" if self.message else "")


@contextmanager
def harvest_scp(ae_title: str, host: str, port: int, folder: Path, allowed_calling_aets: Sequence[str] = (),
                min_free_bytes: int = 0, tls: NodeSection | None = None) -> Iterator[int]:
    """A storage SCP filing what it receives into ``folder/<SeriesUID>/`` (the C-MOVE destination of a harvest);
    only ``allowed_calling_aets`` (the archive) may store, and not below ``min_free_bytes`` of free space. With
    ``tls`` (the node's section) and its certificate set, it speaks TLS only, as the node's listener does:
    the same certificate, CA (mutual TLS) and ``tls_identities``."""
    context = ssl_context_for(tls) if tls is not None else None
    with FolderSCP(ae_title, folder, sop_classes=GET_STORAGE_CLASSES, allowed_calling_aets=allowed_calling_aets,
                   min_free_bytes=min_free_bytes, ssl_context=context,
                   tls_identities=tls.tls_identities if tls is not None and context is not None else None) as scp:
        yield scp.start(host, port)


def _planned(study_uid: str, ds: Dataset, reason: str) -> PlannedSeries:
    expected = ds.get("NumberOfSeriesRelatedInstances")
    return PlannedSeries(study_uid, str(ds.SeriesInstanceUID), str(ds.get("SeriesDescription", "")),
                         str(ds.get("SeriesNumber", "")), int(expected) if expected not in (None, "") else None,
                         reason)


def _number(ds: Dataset) -> float:
    try:
        return float(ds.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


class Harvester:
    """Finds and fetches subjects and hands them to ``dataset``."""

    def __init__(self, config: NodeConfig, progress: ProgressStore, dataset: TrainingSet, *,
                 stop: threading.Event | None = None) -> None:
        self.config = config
        self.progress = progress
        self.dataset = dataset
        self.stop = stop or threading.Event()
        self.pattern = re.compile(config.retro.harvest_mrf_pattern, re.IGNORECASE)

    def pair(self, study_uid: str, series: list[Dataset], query: Query, group: str | None = None) -> Pair | None:
        mprage = sorted((ds for ds in series if prefilter(ds, self.config.mprage).accepted and
                         matches(ds, query.series)), key=_number)
        mrf = sorted((ds for ds in series if self.pattern.search(str(ds.get("SeriesDescription", "")))), key=_number)
        if not mprage or not mrf:
            return None
        subject = subject_id(study_uid)
        return Pair(subject, study_uid, _planned(study_uid, mprage[0], "MPRAGE"),
                    _planned(study_uid, mrf[-1], "MRF SVD"), group or subject)

    def run(self, spec: HarvestSpec, events: PassEvents | None = None) -> HarvestReport:
        events = events or NoEvents()
        source = source_config(self.config, spec.source)
        query = parse_query(spec.query)
        retro = self.config.retro
        archive = Archive(source, source.calling_ae_title or self.config.node.ae_title, retro.harvest_ae_title)
        out = Path(spec.out_dir)
        incoming = out / INCOMING
        salt = harvest_key(Path(self.config.node.storage_dir))
        run_id = self.progress.start_run("harvest", source.name, {**spec.__dict__, "out_dir": str(out),
                                                                  "query": redacted(spec.query)},
                                         dry_run=spec.dry_run)
        report = HarvestReport(run_id)
        get_dir = incoming if source.retrieve == "get" else None
        session = ArchiveSession(archive, SourceSlots(Path(self.config.node.storage_dir) / "retro" / "locks", source),
                                 self.stop, get_dir)
        try:
            with self._receiver(source, incoming, spec.dry_run):
                self._harvest(spec, query, archive, session, incoming, salt, report, events)
            if report.state is RunState.RUNNING:
                report.state = RunState.FINISHED
        except ArchiveError as exc:
            report.state, report.message = RunState.FAILED, f"{exc}; run the harvest again later"
        except BaseException as exc:
            report.state, report.message = RunState.INTERRUPTED, f"interrupted ({type(exc).__name__})"
            raise
        finally:
            session.close(error=report.state is RunState.INTERRUPTED)
            if not spec.dry_run and out.is_dir():
                report.manifest = self.dataset.write_manifest(out, retro.harvest_split_seed)
            self.progress.update_run(run_id, studies=report.studies_found, series_fetched=2 * len(report.harvested),
                                     series_failed=len(report.failed))
            self.progress.finish_run(run_id, report.state, report.message)
            logger.info("%s", report.summary(), extra={"run_id": run_id, "source": source.name})
        return report

    @contextmanager
    def _receiver(self, source: SourceConfig, folder: Path, dry_run: bool) -> Iterator[None]:
        if source.retrieve != "move" or dry_run:
            yield
            return
        host = self.config.node.host
        with harvest_scp(self.config.retro.harvest_ae_title, host, self.config.retro.harvest_port, folder,
                         allowed_calling_aets=[source.ae_title], min_free_bytes=self.config.node.min_free_mb * 2**20,
                         tls=self.config.node):
            yield

    def _harvest(self, spec: HarvestSpec, query: Query, archive: Archive, session: ArchiveSession, incoming: Path,
                 salt: str, report: HarvestReport, events: PassEvents) -> None:
        out = Path(spec.out_dir)
        dataset_hash = self.dataset.dataset_hash(out)
        studies = find_studies(session.assoc(), archive, query)
        report.studies_found = len(studies)
        events.studies_found(len(studies))
        for study in studies:
            if self.stop.is_set():
                report.state, report.message = RunState.STOPPED, "stop requested"
                return
            if spec.max_subjects is not None and len(report.harvested) >= spec.max_subjects:
                report.message = f"{spec.max_subjects} subjects harvested (the cap)"
                break
            study_uid = str(study.StudyInstanceUID)
            group = self._group(study, salt)
            pair = self.pair(study_uid, find_series(session.assoc(), archive, study_uid, Query({}, {})), query, group)
            events.study_done()
            if pair is None:
                report.skip("no MPRAGE and MRF pair")
                continue
            report.pairs.append(pair)
            if self.dataset.has_subject(out, pair.subject):
                report.skip("already harvested")
                continue
            if spec.dry_run:
                continue
            try:
                for item in (pair.mprage, pair.mrf):
                    self._fetch(session, archive, item, incoming / item.series_uid, events)
                digest = self.dataset.add_subject(
                    out, dataset_hash, subject=pair.subject, group=pair.group, source=archive.source.name,
                    study_uid=pair.study_uid, mprage_series_uid=pair.mprage.series_uid,
                    mprage_dir=incoming / pair.mprage.series_uid, mrf_series_uid=pair.mrf.series_uid,
                    mrf_files=sorted((incoming / pair.mrf.series_uid).glob("*.dcm")))
                dataset_hash = dataset_hash or digest
            except ArchiveUnavailableError:
                raise
            except (ArchiveError, ValueError, OSError) as exc:  # MrfFormatError is a ValueError
                report.failed[pair.subject] = str(exc)
                logger.warning("harvest of study %s failed: %s", study_uid, exc, extra={"study_uid": study_uid})
                continue
            if not spec.keep_dicom:
                for item in (pair.mprage, pair.mrf):
                    shutil.rmtree(incoming / item.series_uid, ignore_errors=True)
            report.harvested.append(pair.subject)
            self.dataset.write_manifest(out, self.config.retro.harvest_split_seed)  # the split on record at once

    @staticmethod
    def _group(study: Dataset, salt: str) -> str | None:
        """The study's patient group, or None (with a warning) when the archive returned no PatientID."""
        patient_id = str(study.get("PatientID", "") or "")
        if not patient_id.strip():
            logger.warning("study %s: the archive returned no PatientID; the study is a group of its own in the "
                           "split", study.StudyInstanceUID, extra={"study_uid": str(study.StudyInstanceUID)})
            return None
        return patient_group(patient_id, str(study.get("IssuerOfPatientID", "") or ""), salt)

    def _fetch(self, session: ArchiveSession, archive: Archive, item: PlannedSeries, folder: Path,
               events: PassEvents) -> None:
        """Bring the series into ``folder`` (only the instances not there yet)."""
        method = archive.source.retrieve
        held = {p.name[:-4] for p in folder.glob("*.dcm")} if folder.is_dir() else set()
        sop_uids: list[str] | None = None
        if held:
            all_uids = find_instances(session.assoc(), archive, item.study_uid, item.series_uid)
            sop_uids = [u for u in all_uids if u not in held]
            if not sop_uids:
                return
        events.series_started(item)
        result: RetrieveResult = retrieve(session.assoc(), archive, item.study_uid, item.series_uid, method=method,
                                          sop_uids=sop_uids,
                                          on_progress=lambda done, of: events.series_progress(item, done, of))
        events.series_done(item, result.ok)
        if not result.ok:
            raise ArchiveError(f"{archive}: retrieving series {item.series_uid}: {result.describe()}")
        have = len(list(folder.glob("*.dcm"))) if folder.is_dir() else 0
        if item.expected is not None and have < item.expected:
            raise ArchiveError(f"{archive}: series {item.series_uid}: {have} of {item.expected} instances arrived")

def harvest_key(storage_dir: Path) -> str:
    """The node's key for patient groups (``retro/harvest.key``), made at first use: random, mode 0600."""
    path = storage_dir / "retro" / "harvest.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".harvest.key.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # the first process to get here decides; the others read its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()



