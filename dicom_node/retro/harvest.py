"""Training-data harvest: studies with both an MPRAGE and an MRF SVD series, fetched from an archive
into a dataset folder that ``synthmrf train`` reads.

A *subject* is one study (one session: the MPRAGE and the MRF share patient space). In each study
found with the study-level query keys, the MPRAGE is the first series (by SeriesNumber) that the node's
MPRAGE pre-filter accepts and that matches the series-level keys; the MRF is the last series whose
SeriesDescription matches ``retro.harvest_mrf_pattern`` (default ``mrf.?svd``), in the form documented
in :mod:`dicom_node.retro.mrf_dicom`. Both are fetched with C-GET (source ``retrieve = "get"``) or with
C-MOVE to a storage SCP this command starts for the time of the harvest (AE ``retro.harvest_ae_title``
on ``retro.harvest_port``, which the archive must know) into ``OUT/.incoming/``: never to the node, so a
harvest triggers no processing. An interrupted harvest fetches only the instances still missing.

Each subject is written to ``OUT/.partial-<id>/`` and renamed to ``OUT/<id>/`` when complete:

    OUT/<id>/mprage.nii.gz       the MPRAGE on its own grid (float32; dicom2nifti, checked geometry)
    OUT/<id>/mrf_svd.nii.gz      the MRF coefficients (complex64, X x Y x Z x K) on the MRF grid
    OUT/<id>/brain_mask.nii.gz   uint8 on the MRF grid: the atlas brain mask of the MPRAGE's head pose
                                 (``pipeline.head_pose.place_head(...).mask``, resampled to the MRF grid)
    OUT/<id>/subject.json        source UIDs, the sequence hash and rank, the group (no names, no patient IDs)
    OUT/manifest.json            format, sequence {name, hash, rank}, split {train, val, test}, subjects

``<id>`` is ``sub-`` and the first 12 hex characters of the SHA-256 of the StudyInstanceUID: stable, so
repeated harvests skip subjects already there and add new ones; the manifest is rewritten from the
subject folders after each subject. Every subject of a dataset must share one sequence hash (the first
subject, or the existing manifest, decides; others are refused with a message).

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

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event

from dicom_node.config import NodeConfig
from dicom_node.retro.association import (
    GET_STORAGE_CLASSES,
    Archive,
    ArchiveError,
    ArchiveSession,
    ArchiveUnavailableError,
    SourceSlots,
)
from dicom_node.retro.mrf_dicom import MrfFormatError, read_mrf_series
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
from dicom_node.retro.retrieve import RetrieveResult, retrieve, store_to_folder
from dicom_node.retro.runner import NoEvents, PassEvents, PlannedSeries, source_config
from dicom_node.storage_scp import TRANSFER_SYNTAXES

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "synthmrf-harvest/1"
FILES = {"mprage": "mprage.nii.gz", "mrf": "mrf_svd.nii.gz", "brain_mask": "brain_mask.nii.gz"}
SUBJECT_FILE = "subject.json"
SPLIT_FRACTIONS = {"test": 5 / 37, "val": 2 / 37}  # the paper's 30 / 2 / 5 of 37 volunteers
INCOMING = ".incoming"

MaskFunction = Callable[[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray], np.ndarray]


def atlas_brain_mask(mprage: np.ndarray, mprage_affine: np.ndarray, shape: tuple[int, int, int],
                     affine: np.ndarray) -> np.ndarray:
    """The pipeline's atlas brain mask of ``mprage`` (its head pose and demons fit), on the grid (shape, affine)."""
    from pipeline.geometry import resample_to_grid
    from pipeline.head_pose import place_head

    space = place_head(mprage, mprage_affine)
    return resample_to_grid(space.mask.astype(np.float32), space.affine, shape, affine, order=1) >= 0.5


def subject_id(study_uid: str) -> str:
    return "sub-" + hashlib.sha256(study_uid.encode()).hexdigest()[:12]


def patient_group(patient_id: str, issuer: str, salt: str) -> str:
    """The group of a patient in a dataset: a keyed hash of (issuer, PatientID); never the ID itself."""
    digest = hmac.new(salt.encode(), f"{issuer.strip()}\\{patient_id.strip()}".encode(), hashlib.sha256)
    return "grp-" + digest.hexdigest()[:16]


def split_of(group: str, seed: int) -> str:
    """The split a new group goes to (stable for a seed)."""
    u = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:12], 16) / 16**12
    if u < SPLIT_FRACTIONS["test"]:
        return "test"
    if u < SPLIT_FRACTIONS["test"] + SPLIT_FRACTIONS["val"]:
        return "val"
    return "train"


def sequence_name_for(sequence_hash: str) -> str | None:
    """The name of the shipped sequence file with this hash, if any."""
    from pipeline.mrf.sequence import load_sequence, sequence_dir

    for path in sorted(sequence_dir().glob("*.json")):
        try:
            sequence = load_sequence(path)
        except (OSError, ValueError):
            continue
        if sequence.hash() == sequence_hash:
            return sequence.name
    return None


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
def harvest_scp(ae_title: str, host: str, port: int, folder: Path) -> Iterator[int]:
    """A storage SCP filing what it receives into ``folder/<SeriesUID>/`` (the C-MOVE destination of a harvest)."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 0
    for sop_class in GET_STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))

    def handle(event: Event) -> int:
        return store_to_folder(event, folder)

    server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    assert server is not None  # block=False returns the server
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


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
    """Finds, fetches and converts subjects; ``mask`` makes the brain mask (default: the atlas mask)."""

    def __init__(self, config: NodeConfig, progress: ProgressStore, *, mask: MaskFunction = atlas_brain_mask,
                 stop: threading.Event | None = None) -> None:
        self.config = config
        self.progress = progress
        self.mask = mask
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
            with self._receiver(source.retrieve, incoming, spec.dry_run):
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
                report.manifest = write_manifest(out, retro.harvest_split_seed)
            self.progress.update_run(run_id, studies=report.studies_found, series_fetched=2 * len(report.harvested),
                                     series_failed=len(report.failed))
            self.progress.finish_run(run_id, report.state, report.message)
            logger.info("%s", report.summary(), extra={"run_id": run_id, "source": source.name})
        return report

    @contextmanager
    def _receiver(self, method: str, folder: Path, dry_run: bool) -> Iterator[None]:
        if method != "move" or dry_run:
            yield
            return
        host = self.config.node.host
        with harvest_scp(self.config.retro.harvest_ae_title, host, self.config.retro.harvest_port, folder):
            yield

    def _harvest(self, spec: HarvestSpec, query: Query, archive: Archive, session: ArchiveSession, incoming: Path,
                 salt: str, report: HarvestReport, events: PassEvents) -> None:
        out = Path(spec.out_dir)
        dataset_hash = _dataset_hash(out)
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
            if (out / pair.subject / SUBJECT_FILE).is_file():
                report.skip("already harvested")
                continue
            if spec.dry_run:
                continue
            try:
                for item in (pair.mprage, pair.mrf):
                    self._fetch(session, archive, item, incoming / item.series_uid, events)
                digest = self._convert(pair, incoming, out, dataset_hash, archive)
                dataset_hash = dataset_hash or digest
            except ArchiveUnavailableError:
                raise
            except (ArchiveError, MrfFormatError, ValueError, OSError) as exc:
                report.failed[pair.subject] = str(exc)
                logger.warning("harvest of study %s failed: %s", study_uid, exc, extra={"study_uid": study_uid})
                continue
            if not spec.keep_dicom:
                for item in (pair.mprage, pair.mrf):
                    shutil.rmtree(incoming / item.series_uid, ignore_errors=True)
            report.harvested.append(pair.subject)
            write_manifest(out, self.config.retro.harvest_split_seed)  # the split on record at once

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

    def _convert(self, pair: Pair, incoming: Path, out: Path, dataset_hash: str | None, archive: Archive) -> str:
        from pipeline.convert import convert_series
        from pipeline.dicom_series import read_series
        from pipeline.volume_io import save_volume

        mrf = read_mrf_series(sorted((incoming / pair.mrf.series_uid).glob("*.dcm")))
        if dataset_hash is not None and mrf.sequence_hash != dataset_hash:
            raise ValueError(f"series {pair.mrf.series_uid}: sequence hash {mrf.sequence_hash[:12]}... differs from "
                             f"the dataset's {dataset_hash[:12]}... (one dataset, one sequence)")
        series = read_series(incoming / pair.mprage.series_uid)
        volume = convert_series(series)
        mprage_affine = series.grid.ras_affine
        if mrf.frame_of_reference_uid and mrf.frame_of_reference_uid != series.frame_of_reference_uid:
            logger.warning("study %s: MRF and MPRAGE have different Frames of Reference; the dataset relies on "
                           "their patient coordinates agreeing", pair.study_uid, extra={"study_uid": pair.study_uid})
        mask = self.mask(volume, mprage_affine, mrf.coefficients.shape[:3], mrf.affine)  # type: ignore[arg-type]
        partial = out / f".partial-{pair.subject}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_volume(partial / FILES["mprage"], volume, mprage_affine)
        save_volume(partial / FILES["mrf"], mrf.coefficients, mrf.affine)
        _save_mask(partial / FILES["brain_mask"], mask, mrf.affine)
        info = {"id": pair.subject, "group": pair.group, "source": archive.source.name,
                "study_instance_uid": pair.study_uid,
                "mprage_series_instance_uid": pair.mprage.series_uid, "mrf_series_instance_uid": pair.mrf.series_uid,
                "sequence_hash": mrf.sequence_hash, "rank": mrf.rank, "files": FILES,
                "mrf_grid": {"shape": list(mrf.coefficients.shape[:3]), "affine_ras": np.round(mrf.affine, 6).tolist()},
                "brain_voxels": int(mask.sum()), "harvested_at": datetime.datetime.now().isoformat(timespec="seconds")}
        (partial / SUBJECT_FILE).write_text(json.dumps(info, indent=1) + "\n")
        final = out / pair.subject
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        logger.info("harvested study %s as %s", pair.study_uid, pair.subject, extra={"study_uid": pair.study_uid})
        return mrf.sequence_hash


def _save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    tmp = path.with_name(f".{path.name}.partial.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)


def _subjects(out: Path) -> list[dict[str, Any]]:
    found = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info_file = folder / SUBJECT_FILE
        if info_file.is_file():
            found.append(json.loads(info_file.read_text()))
    return found


def _manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _dataset_hash(out: Path) -> str | None:
    sequence = _manifest(out).get("sequence") or {}
    if sequence.get("hash"):
        return str(sequence["hash"])
    subjects = _subjects(out) if out.is_dir() else []
    return str(subjects[0]["sequence_hash"]) if subjects else None


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


def _assign(subjects: list[dict[str, Any]], recorded: Mapping[str, str], seed: int) -> dict[str, str]:
    """Subject id -> split: recorded ones kept, new ones with their group (see the module's docstring)."""
    group_of = {s["id"]: str(s["group"]) for s in subjects}
    where = {sid: recorded[sid] for sid in group_of if sid in recorded}
    group_split: dict[str, str] = {}
    for sid, part in sorted(where.items()):
        if group_split.setdefault(group_of[sid], part) != part:
            logger.warning("subject %s: recorded in %s while its group is in %s (an earlier harvest); kept, "
                           "recorded splits never change", sid, part, group_split[group_of[sid]])
    fresh = sorted({g for sid, g in group_of.items() if sid not in where and g not in group_split})
    group_split.update({g: split_of(g, seed) for g in fresh})
    if fresh and "train" not in group_split.values():  # training needs one: a new group from the larger part
        test = [g for g in fresh if group_split[g] == "test"]
        val = [g for g in fresh if group_split[g] == "val"]
        group_split[(test if len(test) >= len(val) else val)[-1]] = "train"
    return {sid: where.get(sid) or group_split[g] for sid, g in group_of.items()}


def write_manifest(out: Path, seed: int) -> Path | None:
    """(Re)write ``out/manifest.json`` from the subject folders; None (and no file) when there are none.

    Splits recorded in the existing manifest are kept."""
    subjects = _subjects(out)
    if not subjects:
        return None
    hashes = {s["sequence_hash"] for s in subjects}
    if len(hashes) != 1:
        raise ValueError(f"{out}: subjects with different sequence hashes {sorted(hashes)}; one dataset, one sequence")
    digest = hashes.pop()
    previous = _manifest(out)
    recorded = {sid: part for part, ids in (previous.get("split") or {}).items() if part in ("train", "val", "test")
                for sid in ids}
    where = _assign(subjects, recorded, seed)
    manifest = {
        "format": MANIFEST_FORMAT,
        "sequence": {"name": sequence_name_for(digest), "hash": digest, "rank": subjects[0]["rank"]},
        "split": {part: sorted(sid for sid, p in where.items() if p == part) for part in ("train", "val", "test")},
        "split_seed": seed,
        "files": FILES,
        "grids": {"mrf": subjects[0]["mrf_grid"]},
        "subjects": [{"id": s["id"], "group": s["group"], "split": where[s["id"]], "files": FILES,
                      "study_instance_uid": s["study_instance_uid"], "source": s["source"]} for s in subjects],
        "written_at": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    path = out / "manifest.json"
    tmp = out / ".manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(path)
    return path
