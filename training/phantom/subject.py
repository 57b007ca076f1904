"""One phantom subject: its random draws, and the files it writes (truths, MRF, MPRAGE NIfTI and DICOM)."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.mrf.dictionary import Dictionary, Grid
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, Sequence
from pipeline.protocol import Family
from training.phantom.anatomy import RenderedAnatomy, Template, Warp, random_warp, render
from training.phantom.dicom_series import (
    VENDOR_HEADERS,
    DicomStyle,
    SeriesIdentity,
    Vendor,
    make_identity,
    write_mprage_series,
)
from training.phantom.fields import SmoothField, random_smooth_field
from training.phantom.geometry import Orientation, VolumeGrid, acquisition_grid, mrf_grid
from training.phantom.mprage import MprageProtocol, acquire
from training.phantom.mrf import acquire_mrf
from training.phantom.tissues import TissueModel, draw_tissues, truth_maps
from training.phantom.world import (
    AnatomyChanges,
    draw_world,
    expected_t2_target,
    individualise,
    remap_csf_t2,
    resegment,
    scale_grey_t2,
)

WORLDS = ("v1", "v2", "v3", "v4")
MRF_TARGETS = ("subject", "expected")
V1_VENDORS = ["siemens", "ge"]  # world v1 draws between these two (the draws of a seed must not change)
CSF_T2_LIMITS_MS = (100.0, Grid().t2_max_ms)
"""What ``--csf-t2-range`` may ask for: a subject's CSF T2 (its tissue value) stays on the MRF dictionary's T2 axis.
Single voxels of the within-subject T2 field can still lie up to about 1.45x above it (field amplitude up to 15 %,
levels to 2.5 SD); their simulated MRF matches at the axis's end."""

logger = logging.getLogger(__name__)

ENTRY = "entry.json"
"""Written last into a subject folder: its manifest entry, and the sign that the subject is complete."""

FILES = {
    "mprage_dicom": "mprage_dicom",
    "mprage": "mprage.nii.gz",
    "t1": "T1.nii.gz",
    "t2": "T2.nii.gz",
    "pd": "PD.nii.gz",
    "brain_mask": "brain_mask.nii.gz",
    "labels": "labels.nii.gz",
    "mrf": "mrf_svd.nii.gz",
}
"""Per-subject file names, relative to the subject folder."""


@dataclass(frozen=True)
class PhantomOptions:
    """What to write for every subject. ``downsample`` 2 halves every grid's resolution (tests only)."""

    orientation: Orientation = Orientation.SAGITTAL
    style: DicomStyle = DicomStyle.CLASSIC
    vendor: Vendor | None = None  # None: drawn per subject
    oblique_deg: float = 15.0
    mrf: bool = True
    sequence: str = DEFAULT_SEQUENCE
    rank: int = 4
    downsample: int = 1
    protocol: MprageProtocol = field(default_factory=MprageProtocol)
    world: str = "v1"  # v2: protocol, grid, tissues, anatomy, noise per subject; v3/v4: + an individual cortex
    mrf_target: str = "subject"  # expected: the MRF keeps only what an MPRAGE shows (world.expected_t2_target)
    grey_t2_scale: float = 1.0  # worlds v2-v4: cortical grey matter's T2 prior re-centred (world.scale_grey_t2)
    csf_t2_range: tuple[float, float] | None = None  # worlds v2-v4: CSF's T2 prior, ms (world.remap_csf_t2)

    def __post_init__(self) -> None:
        if self.world not in WORLDS:
            raise ValueError(f"world: expected one of {WORLDS}, got {self.world!r}")
        if self.mrf_target not in MRF_TARGETS:
            raise ValueError(f"mrf_target: expected one of {MRF_TARGETS}, got {self.mrf_target!r}")
        if self.mrf_target == "expected" and self.world == "v1":
            raise ValueError("mrf_target 'expected' needs world v2, v3 or v4 (their priors define the expectation)")
        if not 0.5 <= self.grey_t2_scale <= 2.0:
            raise ValueError(f"grey_t2_scale: expected 0.5 to 2, got {self.grey_t2_scale}")
        if self.grey_t2_scale != 1.0 and self.world == "v1":
            raise ValueError("grey_t2_scale: needs world v2, v3 or v4 (world v1 keeps its fixed priors)")
        if self.csf_t2_range is not None:
            lo, hi = self.csf_t2_range
            if not CSF_T2_LIMITS_MS[0] <= lo < hi <= CSF_T2_LIMITS_MS[1]:
                raise ValueError(f"csf_t2_range: expected {CSF_T2_LIMITS_MS[0]:g} <= low < high <= "
                                 f"{CSF_T2_LIMITS_MS[1]:g} ms (the subject's CSF T2; the MRF dictionary's T2 axis "
                                 f"ends there), got {lo:g}, {hi:g}")
            if self.world == "v1":
                raise ValueError("csf_t2_range: needs world v2, v3 or v4 (world v1 keeps its fixed priors)")

    def mrf_grid(self) -> VolumeGrid:
        return mrf_grid(self.downsample)

    def mprage_grid(self) -> VolumeGrid:
        d = self.downsample
        if d not in (1, 2):
            raise ValueError(f"downsample: must be 1 or 2, got {d}")
        return acquisition_grid(self.orientation, matrix=(192 // d, 192 // d, 150 // d), pixel_mm=1.25 * d,
                                slice_mm=1.2 * d, oblique_deg=self.oblique_deg)


@dataclass(frozen=True)
class Subject:
    """Everything random about one subject, drawn from its own seed stream."""

    subject_id: str
    warp: Warp
    tissues: TissueModel
    bias: SmoothField  # log receive bias, scanner space
    coil_phase: SmoothField  # radians, scanner space
    mprage_snr: float
    mrf_snr: float
    vendor: Vendor
    identity: SeriesIdentity
    noise_seed: int
    protocol: MprageProtocol
    mprage_grid: VolumeGrid
    changes: AnatomyChanges | None = None  # world v2: atrophy, lesions


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """The subject's own stream: independent of the order and the process subjects are made in."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def draw_subject(seed: int, index: int, template: Template, options: PhantomOptions) -> Subject:
    """Draw subject ``index`` (0-based) of the dataset with ``seed``."""
    rng = subject_rng(seed, index)
    subject_id = f"sub-{index + 1:03d}"
    warp = random_warp(rng, template)
    tissues = draw_tissues(rng, template)
    bias = random_smooth_field(rng, components=1, centre_mm=np.zeros(3), extent_mm=300.0, correlation_mm=60.0,
                               sd=0.12, spacing_mm=15.0)
    coil_phase = random_smooth_field(rng, components=1, centre_mm=np.zeros(3), extent_mm=300.0,
                                     correlation_mm=50.0, sd=1.0, spacing_mm=15.0)
    mprage_snr = float(rng.uniform(20.0, 40.0))
    mrf_snr = float(rng.uniform(30.0, 60.0))
    vendor = options.vendor if options.vendor is not None else Vendor(rng.choice(V1_VENDORS))
    identity = make_identity(subject_id, f"synthmrf-phantom/{seed}/{subject_id}", rng)
    noise_seed = int(rng.integers(2**63))
    if options.world == "v1":
        return Subject(subject_id, warp, tissues, bias, coil_phase, mprage_snr, mrf_snr, vendor, identity,
                       noise_seed, options.protocol, options.mprage_grid())
    # World v2 draws from a stream of its own, after v1's: v1 datasets of a seed stay as they were.
    world = draw_world(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 2))), template)
    if options.world in ("v3", "v4"):  # and v3's from one more, so a v3 subject is its v2 namesake, individualised
        world = individualise(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 3))), template,
                              world)
    if options.world == "v4":  # v4's likewise: a v4 subject is its v3 namesake, re-segmented
        world = resegment(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 4))), template, world)
    # The same draw with grey matter's or CSF's T2 moved: a subject differs from its namesake in that alone.
    if options.grey_t2_scale != 1.0:
        world = replace(world, tissues=scale_grey_t2(world.tissues, options.grey_t2_scale))
    if options.csf_t2_range is not None:
        world = replace(world, tissues=remap_csf_t2(world.tissues, world.field_strength_t, options.csf_t2_range))
    d = options.downsample
    grid = acquisition_grid(world.orientation, matrix=tuple(-(-n // d) for n in world.matrix),  # type: ignore[arg-type]
                            pixel_mm=world.pixel_mm * d, slice_mm=world.slice_mm * d, oblique_deg=world.oblique_deg)
    family_vendor = {Family.MPRAGE: Vendor.SIEMENS, Family.IR_FSPGR: Vendor.GE, Family.TFE: Vendor.PHILIPS}
    vendor = family_vendor[world.protocol.family] if options.vendor is None else options.vendor
    return Subject(subject_id, world.warp, world.tissues, world.bias, coil_phase, world.mprage_snr, world.mrf_snr,
                   vendor, identity, noise_seed, world.protocol, grid, world.changes)


def _render(template: Template, subject: Subject, grid: VolumeGrid) -> RenderedAnatomy:
    anatomy = render(template, subject.warp, grid)
    return anatomy if subject.changes is None else subject.changes.apply(anatomy)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, path)


def make_subject(subject: Subject, template: Template, options: PhantomOptions, out_dir: Path, *,
                 sequence: Sequence | None, dictionary: Dictionary | None) -> dict[str, object]:
    """Write one subject's files into ``out_dir`` and return its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(subject.noise_seed)
    grid = options.mrf_grid()
    anatomy = _render(template, subject, grid)
    t1, t2, pd = truth_maps(subject.tissues, anatomy)
    for key, values in (("t1", t1), ("t2", t2), ("pd", pd)):
        _save(anatomy.full(values), grid.affine, out_dir / FILES[key])
    _save(anatomy.full(anatomy.brain.astype(np.uint8)), grid.affine, out_dir / FILES["brain_mask"])
    _save(anatomy.full(anatomy.labels), grid.affine, out_dir / FILES["labels"])
    del t1, t2, pd
    files = {k: v for k, v in FILES.items() if k != "mrf"}
    if options.mrf:
        if sequence is None or dictionary is None:
            raise ValueError("sequence, dictionary: required when options.mrf is set")
        tissues = subject.tissues
        if options.mrf_target == "expected":
            tissues = expected_t2_target(tissues, subject.protocol.field_strength_t, options.grey_t2_scale,
                                         options.csf_t2_range)
        coeffs = acquire_mrf(sequence, dictionary, tissues, anatomy, coil_phase=subject.coil_phase,
                             snr=subject.mrf_snr, rng=noise)
        _save(coeffs, grid.affine, out_dir / FILES["mrf"])
        files["mrf"] = FILES["mrf"]
        del coeffs
    del anatomy
    mprage_grid = subject.mprage_grid
    mprage_anatomy = _render(template, subject, mprage_grid)
    image = acquire(subject.protocol, subject.tissues, mprage_anatomy, bias=subject.bias,
                    snr=subject.mprage_snr, rng=noise)
    _save(image, mprage_grid.affine, out_dir / FILES["mprage"])
    write_mprage_series(image, mprage_grid, out_dir / FILES["mprage_dicom"], protocol=subject.protocol,
                        identity=subject.identity, vendor=subject.vendor, style=options.style)
    logger.info("subject %s written", subject.subject_id, extra={"study_uid": subject.identity.study_uid})
    w = subject.warp
    entry = {
        "id": subject.subject_id,
        "files": files,
        "tissues": subject.tissues.manifest(),
        "mprage_snr": round(subject.mprage_snr, 3),
        "mrf_snr": round(subject.mrf_snr, 3) if options.mrf else None,
        "vendor": subject.vendor.value,
        "protocol": {**{k: v for k, v in asdict(subject.protocol).items() if k != "family"},
                     "family": subject.protocol.family.value},
        "acquisition": subject.protocol.as_read(VENDOR_HEADERS[subject.vendor].manufacturer).to_dict(),
        "partial_volume_exchange": round(subject.tissues.exchange, 4),
        "anatomy_changes": None if subject.changes is None else {
            "atrophy": round(subject.changes.atrophy, 4),
            "lesions": 0 if subject.changes.lesions is None else len(subject.changes.lesions.radii_mm),
            "sharpness": round(subject.changes.sharpness, 4),
            "thickness_sd": None if subject.changes.thickness is None
            else round(float(subject.changes.thickness.values.std()), 4),
            "segmentation_weight": None if subject.changes.segmentation is None
            else round(subject.changes.segmentation.weight, 4)},
        "mprage_grid": {"shape": list(mprage_grid.shape), "spacing_mm": np.round(mprage_grid.spacing_mm, 4).tolist()},
        "pose": {"rotation": np.round(w.rotation, 6).tolist(), "scale": np.round(w.scale, 6).tolist(),
                 "translation_mm": np.round(w.translation_mm, 4).tolist()},
        "patient_id": subject.identity.patient_id,
        "study_instance_uid": subject.identity.study_uid,
        "series_instance_uid": subject.identity.series_uid,
        "frame_of_reference_uid": subject.identity.frame_of_reference_uid,
    }
    tmp = out_dir / f".{ENTRY}.partial"
    tmp.write_text(json.dumps(entry, indent=1, default=str))
    tmp.replace(out_dir / ENTRY)
    return entry
