"""The harvested training set: subject folders made from an archive's MPRAGE + MRF SVD pairs, and the manifest
with its splits (what ``synthmrf train`` reads). The retrieval itself is the node's (``synthmrf retro harvest``,
:mod:`dicom_node.retro.harvest`); this module only turns fetched DICOM into the dataset.

Each subject is written to ``OUT/.partial-<id>/`` and renamed to ``OUT/<id>/`` when complete:

    OUT/<id>/mprage.nii.gz       the MPRAGE on its own grid (float32; dicom2nifti, checked geometry)
    OUT/<id>/mrf_svd.nii.gz      the MRF coefficients (complex64, X x Y x Z x K) on the MRF grid
    OUT/<id>/brain_mask.nii.gz   uint8 on the MRF grid: the atlas brain mask of the MPRAGE's head pose
                                 (``pipeline.head_pose.place_head(...).mask``, resampled to the MRF grid)
    OUT/<id>/subject.json        source UIDs, the sequence hash and rank, the group (no names, no patient IDs)
    OUT/manifest.json            format, sequence {name, hash, rank}, split {train, val, test}, subjects

Every subject of a dataset shares one sequence hash (the first subject, or the existing manifest, decides;
others are refused with a message). Splits are by patient *group* (one volunteer scanned twice is one
group): each new group goes to the split a hash of (seed, group) picks, in the paper's proportions
(30/2/5); a new subject of a known group joins its group's split; a split once recorded in the manifest
never changes, so a subject trained on never moves to ``test``. While ``train`` is empty, one new group
is put there.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.mrf.svd_dicom import read_mrf_series

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "synthmrf-harvest/1"
FILES = {"mprage": "mprage.nii.gz", "mrf": "mrf_svd.nii.gz", "brain_mask": "brain_mask.nii.gz"}
SUBJECT_FILE = "subject.json"
SPLIT_FRACTIONS = {"test": 5 / 37, "val": 2 / 37}  # the paper's 30 / 2 / 5 of 37 volunteers

MaskFunction = Callable[[np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FetchedPair:
    """One study's fetched series: where their DICOM files are, and what to record about them."""

    subject: str
    group: str
    source: str
    study_uid: str
    mprage_series_uid: str
    mprage_dir: Path
    mrf_series_uid: str
    mrf_files: Sequence[Path]


def atlas_brain_mask(mprage: np.ndarray, mprage_affine: np.ndarray, shape: tuple[int, int, int],
                     affine: np.ndarray) -> np.ndarray:
    """The pipeline's atlas brain mask of ``mprage`` (its head pose and demons fit), on the grid (shape, affine)."""
    from pipeline.geometry import resample_to_grid
    from pipeline.head_pose import place_head

    space = place_head(mprage, mprage_affine)
    return resample_to_grid(space.mask.astype(np.float32), space.affine, shape, affine, order=1) >= 0.5


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


def write_subject(pair: FetchedPair, out: Path, dataset_hash: str | None, mask: MaskFunction | None = None) -> str:
    """Convert a fetched pair into ``out/<subject>/`` (atomically); return its sequence hash.

    ValueError if its sequence differs from ``dataset_hash`` (one dataset, one sequence)."""
    from pipeline.convert import convert_series
    from pipeline.dicom_series import read_series
    from pipeline.volume_io import save_volume

    mask = mask or atlas_brain_mask
    mrf = read_mrf_series(list(pair.mrf_files))
    if dataset_hash is not None and mrf.sequence_hash != dataset_hash:
        raise ValueError(f"series {pair.mrf_series_uid}: sequence hash {mrf.sequence_hash[:12]}... differs from "
                         f"the dataset's {dataset_hash[:12]}... (one dataset, one sequence)")
    series = read_series(pair.mprage_dir)
    volume = convert_series(series)
    mprage_affine = series.grid.ras_affine
    if mrf.frame_of_reference_uid and mrf.frame_of_reference_uid != series.frame_of_reference_uid:
        logger.warning("study %s: MRF and MPRAGE have different Frames of Reference; the dataset relies on "
                       "their patient coordinates agreeing", pair.study_uid, extra={"study_uid": pair.study_uid})
    brain = mask(volume, mprage_affine, mrf.coefficients.shape[:3], mrf.affine)  # type: ignore[arg-type]
    partial = out / f".partial-{pair.subject}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_volume(partial / FILES["mprage"], volume, mprage_affine)
    save_volume(partial / FILES["mrf"], mrf.coefficients, mrf.affine)
    _save_mask(partial / FILES["brain_mask"], brain, mrf.affine)
    info = {"id": pair.subject, "group": pair.group, "source": pair.source,
            "study_instance_uid": pair.study_uid,
            "mprage_series_instance_uid": pair.mprage_series_uid, "mrf_series_instance_uid": pair.mrf_series_uid,
            "sequence_hash": mrf.sequence_hash, "rank": mrf.rank, "files": FILES,
            "mrf_grid": {"shape": list(mrf.coefficients.shape[:3]), "affine_ras": np.round(mrf.affine, 6).tolist()},
            "brain_voxels": int(brain.sum()), "harvested_at": datetime.datetime.now().isoformat(timespec="seconds")}
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


def subjects_in(out: Path) -> list[dict[str, Any]]:
    found = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info_file = folder / SUBJECT_FILE
        if info_file.is_file():
            found.append(json.loads(info_file.read_text()))
    return found


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def dataset_hash(out: Path) -> str | None:
    sequence = read_manifest(out).get("sequence") or {}
    if sequence.get("hash"):
        return str(sequence["hash"])
    subjects = subjects_in(out) if out.is_dir() else []
    return str(subjects[0]["sequence_hash"]) if subjects else None


def assign_splits(subjects: list[dict[str, Any]], recorded: Mapping[str, str], seed: int) -> dict[str, str]:
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
    subjects = subjects_in(out)
    if not subjects:
        return None
    hashes = {s["sequence_hash"] for s in subjects}
    if len(hashes) != 1:
        raise ValueError(f"{out}: subjects with different sequence hashes {sorted(hashes)}; one dataset, one sequence")
    digest = hashes.pop()
    previous = read_manifest(out)
    recorded = {sid: part for part, ids in (previous.get("split") or {}).items() if part in ("train", "val", "test")
                for sid in ids}
    where = assign_splits(subjects, recorded, seed)
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


class HarvestedDataset:
    """The training-set side of a harvest, handed to :class:`dicom_node.retro.harvest.Harvester` by the CLI;
    ``mask`` makes the brain mask (default: the pipeline's atlas mask)."""

    def __init__(self, mask: MaskFunction | None = None) -> None:
        self.mask = mask

    def dataset_hash(self, out: Path) -> str | None:
        return dataset_hash(out)

    def has_subject(self, out: Path, subject: str) -> bool:
        return (out / subject / SUBJECT_FILE).is_file()

    def add_subject(self, out: Path, dataset_hash: str | None, *, subject: str, group: str, source: str,
                    study_uid: str, mprage_series_uid: str, mprage_dir: Path, mrf_series_uid: str,
                    mrf_files: Sequence[Path]) -> str:
        pair = FetchedPair(subject, group, source, study_uid, mprage_series_uid, mprage_dir, mrf_series_uid,
                           tuple(mrf_files))
        return write_subject(pair, out, dataset_hash, self.mask)

    def write_manifest(self, out: Path, seed: int) -> Path | None:
        return write_manifest(out, seed)
