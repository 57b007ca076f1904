"""Training pairs: MPRAGE resampled to the MRF grid, skull-stripped and normalised, with the seven
MRF channels as targets; cached per subject so epochs never redo it.

Dataset layout (phantom world or a site's own data): ``DIR/manifest.json`` with a ``split`` and
``sequence`` entry, and per subject ``mprage.nii.gz`` (any grid), ``mrf_svd.nii.gz`` (complex
coefficients, phase-normalised, on the MRF grid: axial 256^3 at 1 mm), ``brain_mask.nii.gz`` (MRF grid).
The MPRAGE reaches the MRF grid by a rigid mutual-information registration (SimpleITK) of the MPRAGE to
the MRF's first singular image (magnitude), started from the NIfTI affines (patient space of one
session); a manifest entry ``"mprage_registration": "none"`` skips it for data known to be co-registered.
Axial slices are the MRF grid's third axis.

Inputs are cached divided by their 95th percentile in the brain (:mod:`pipeline.normalise`), with the
volume's maximum and 95th percentile beside them, so a run may use either normalisation. Each subject's
acquisition protocol comes from its manifest entry (``acquisition``, what a reader of its header would
learn); entries without one (datasets before world v2) used the paper's protocol.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from pipeline.geometry import resample_to_grid
from pipeline.mrf.coefficients import CHANNEL_NAMES, to_channels
from pipeline.normalise import intensity_scale
from pipeline.protocol import PAPER_PROTOCOL, AcquisitionProtocol, protocol_features
from pipeline.volume_io import load_volume

logger = logging.getLogger(__name__)

MIN_BRAIN_VOXELS_PER_SLICE = 200
CACHE_FORMAT = 3  # part of the cache file names: bump when prepared arrays change meaning
REGISTRATION_RIM_VOXELS = 5


def _motion(transform: np.ndarray) -> tuple[float, float]:
    """Translation (mm) and rotation angle (degrees) of a rigid 4x4."""
    angle = np.degrees(np.arccos(np.clip((np.trace(transform[:3, :3]) - 1) / 2, -1.0, 1.0)))
    return float(np.linalg.norm(transform[:3, 3])), float(angle)


@dataclass(frozen=True)
class PreparedSubject:
    """Cached arrays of one subject: axial slices that contain brain, float16, memory-mapped."""

    subject: str
    slices: np.ndarray  # (S,) slice indices k on the MRF grid
    inputs: np.ndarray  # (S, X, Y) skull-stripped MPRAGE divided by its 95th percentile in the brain
    targets: np.ndarray  # (S, 7, X, Y) raw channel values (masked)
    masks: np.ndarray  # (S, X, Y) bool
    scales: np.ndarray  # (2,): the volume's maximum and 95th percentile in the brain
    protocol: AcquisitionProtocol
    reference_t2: np.ndarray | None = None  # (S, X, Y) reference T2 map, ms, float16 (load_dataset(reference_t2=True))

    def input_factor(self, normalisation: str) -> float:
        """Multiply :attr:`inputs` by this to get the ``normalisation`` ("p95" or "max") of the volume."""
        if normalisation == "p95":
            return 1.0
        if normalisation == "max":
            return float(self.scales[1] / self.scales[0])
        raise ValueError(f"normalisation: expected 'p95' or 'max', got {normalisation!r}")

    @property
    def features(self) -> np.ndarray:
        return protocol_features(self.protocol)


def _cache_paths(cache: Path, subject: str) -> dict[str, Path]:
    return {name: cache / f"{subject}.v{CACHE_FORMAT}.{name}.npy"
            for name in ("slices", "inputs", "targets", "masks", "scales")}


def mprage_to_mrf(mprage: np.ndarray, mprage_affine: np.ndarray, coeffs: np.ndarray, mrf_affine: np.ndarray,
                  mask: np.ndarray) -> np.ndarray:
    """Rigid MRF-to-MPRAGE patient transform (4x4 RAS): MPRAGE registered to the first singular image."""
    from pipeline.registration import register_images  # SimpleITK: only datasets that need registering

    reference = np.abs(coeffs[..., 0]).astype(np.float32)
    region = ndimage.binary_dilation(mask, iterations=REGISTRATION_RIM_VOXELS)
    return register_images(reference, mrf_affine, mprage, mprage_affine, kind="rigid", initial=np.eye(4),
                           fixed_mask=region).transform


MRF_FILE = "mrf_svd.nii.gz"


def check_subjects_have_mrf(root: Path, subjects: Sequence[str]) -> None:
    """Raise ValueError naming the subjects of ``root`` without an MRF (``phantom make --no-mrf``): training and
    evaluation prepare every subject on its MRF grid, with its MRF as the networks' target."""
    missing = [s for s in subjects if not (root / s / MRF_FILE).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{root}: no {MRF_FILE} in {shown}: training and evaluation need each subject's MRF "
                         "(a dataset made with 'phantom make --no-mrf' has none; make it again without that flag)")


def prepare_subject(subject_dir: Path, cache: Path, *, register: bool = True,
                    protocol: AcquisitionProtocol = PAPER_PROTOCOL) -> PreparedSubject:
    """Load (or build, then cache) one subject's training arrays."""
    subject = subject_dir.name
    paths = _cache_paths(cache, subject)
    if not all(p.is_file() for p in paths.values()):
        mask, mask_affine = load_volume(subject_dir / "brain_mask.nii.gz")
        mask = mask > 0
        coeffs, coeff_affine = load_volume(subject_dir / MRF_FILE)
        if coeffs.ndim != 4 or coeffs.shape[:3] != mask.shape or not np.allclose(coeff_affine, mask_affine, atol=1e-4):
            raise ValueError(f"{subject_dir}: mrf_svd.nii.gz and brain_mask.nii.gz are not on one grid")
        mprage, mprage_affine = load_volume(subject_dir / "mprage.nii.gz")
        to_mprage = mprage_to_mrf(mprage, mprage_affine, coeffs, mask_affine, mask) if register else np.eye(4)
        on_grid = resample_to_grid(mprage, mprage_affine, mask.shape, to_mprage @ mask_affine)
        try:
            scales = np.array([intensity_scale(on_grid, mask, "max"), intensity_scale(on_grid, mask, "p95")])
        except ValueError as exc:
            raise ValueError(f"{subject_dir}: {exc}") from exc
        inputs = np.where(mask, on_grid, 0) / scales[1]
        targets = to_channels(coeffs) * mask[..., None]
        keep = np.flatnonzero(mask.sum(axis=(0, 1)) >= MIN_BRAIN_VOXELS_PER_SLICE)
        cache.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "slices": keep,
            "inputs": np.moveaxis(inputs[:, :, keep], 2, 0).astype(np.float16),
            "targets": np.transpose(targets[:, :, keep, :], (2, 3, 0, 1)).astype(np.float16),
            "masks": np.moveaxis(mask[:, :, keep], 2, 0),
            "scales": scales,
        }
        for name, values in arrays.items():
            # Per-process temp name: several ranks (torchrun) may prepare one subject at once.
            tmp = paths[name].with_suffix(f".{os.getpid()}.partial.npy")
            np.save(tmp, values)
            tmp.replace(paths[name])
        logger.info("prepared %s: %d axial slices with brain; MPRAGE moved %.2f mm / %.2f deg by registration",
                    subject, keep.size, *_motion(to_mprage))
    loaded = {name: np.load(p, mmap_mode="r") for name, p in paths.items()}
    return PreparedSubject(subject, np.asarray(loaded["slices"]), loaded["inputs"], loaded["targets"],
                           loaded["masks"], np.asarray(loaded["scales"]), protocol)


@dataclass(frozen=True)
class Dataset:
    """A dataset folder: its manifest and its prepared subjects by split."""

    root: Path
    manifest: dict[str, object]
    subjects: dict[str, list[PreparedSubject]]

    @property
    def sequence_hash(self) -> str:
        sequence = self.manifest.get("sequence")
        if not isinstance(sequence, dict) or "hash" not in sequence:
            raise ValueError(f"{self.root}/manifest.json: no sequence hash")
        return str(sequence["hash"])


def prepared_reference_t2(subject_dir: Path, cache: Path, prepared: PreparedSubject) -> np.ndarray:
    """The subject's reference T2 map (``T2.nii.gz``, ms, MRF grid) on its prepared slices: (S, X, Y) float16,
    memory-mapped from ``cache`` (built on first use)."""
    path = cache / f"{subject_dir.name}.v{CACHE_FORMAT}.t2.npy"
    if not path.is_file():
        source = subject_dir / "T2.nii.gz"
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no reference T2 map (holding outputs by T2 needs one per subject)")
        t2, affine = load_volume(source)
        _, mask_affine = load_volume(subject_dir / "brain_mask.nii.gz")
        if t2.ndim != 3 or t2.shape[:2] != prepared.inputs.shape[1:] or prepared.slices.max() >= t2.shape[2] or \
                not np.allclose(affine, mask_affine, atol=1e-4):
            raise ValueError(f"{source}: not on the subject's MRF grid (brain_mask.nii.gz's)")
        tmp = path.with_suffix(f".{os.getpid()}.partial.npy")
        np.save(tmp, np.moveaxis(t2[:, :, prepared.slices], 2, 0).astype(np.float16))
        tmp.replace(path)
    t2_slices = np.load(path, mmap_mode="r")
    if t2_slices.shape != prepared.inputs.shape:
        raise ValueError(f"{path}: cached for other prepared slices; delete it to rebuild")
    return t2_slices


def load_dataset(root: Path, cache: Path, *, progress: bool = False, reference_t2: bool = False) -> Dataset:
    """Prepare every subject of the manifest's train/val/test split (cached in ``cache``); ``reference_t2``: with
    each subject's reference T2 map (:attr:`PreparedSubject.reference_t2`)."""
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no dataset manifest (see the README's dataset layout)")
    manifest = json.loads(manifest_path.read_text())
    split = manifest.get("split")
    if not isinstance(split, dict) or not split.get("train"):
        raise ValueError(f"{manifest_path}: 'split' must list at least one training subject")
    names = [(part, name) for part in ("train", "val", "test") for name in split.get(part, [])]
    subjects: dict[str, list[PreparedSubject]] = {"train": [], "val": [], "test": []}
    registration = manifest.get("mprage_registration", "rigid")
    if registration not in ("rigid", "none"):
        raise ValueError(f"{manifest_path}: mprage_registration must be 'rigid' or 'none', got {registration!r}")
    entries = manifest_entries(manifest)
    check_subjects_have_mrf(root, [name for _, name in names])
    for part, name in tqdm(names, desc="preparing subjects", unit="subject", disable=not progress):
        prepared = prepare_subject(root / name, cache, register=registration == "rigid",
                                   protocol=subject_protocol(entries.get(name, {})))
        if reference_t2:
            prepared = replace(prepared, reference_t2=prepared_reference_t2(root / name, cache, prepared))
        subjects[part].append(prepared)
    return Dataset(root, manifest, subjects)


def manifest_entries(manifest: dict[str, object]) -> dict[str, dict[str, object]]:
    """Per-subject manifest entries by subject id (empty for manifests without a ``subjects`` list)."""
    listed = manifest.get("subjects", [])
    return {str(e.get("id")): e for e in listed if isinstance(e, dict)} if isinstance(listed, list) else {}


def subject_protocol(entry: dict[str, object]) -> AcquisitionProtocol:
    """A manifest entry's acquisition as its header reads; the paper's protocol for entries without one."""
    doc = entry.get("acquisition")
    return AcquisitionProtocol.from_dict(doc) if isinstance(doc, dict) else PAPER_PROTOCOL


def channel_ranges(subjects: list[PreparedSubject]) -> np.ndarray:
    """Per-channel (min, max) over the training subjects' slices, background (0) included: (7, 2)."""
    lo = np.zeros(len(CHANNEL_NAMES))
    hi = np.zeros(len(CHANNEL_NAMES))
    for s in subjects:
        t = np.asarray(s.targets, dtype=np.float32)
        lo = np.minimum(lo, t.min(axis=(0, 2, 3)))
        hi = np.maximum(hi, t.max(axis=(0, 2, 3)))
    if np.any(hi <= lo):
        raise ValueError(f"channel ranges: a channel is constant over the training set: {lo}, {hi}")
    return np.stack([lo, hi], axis=1)
