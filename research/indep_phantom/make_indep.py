"""Independent MPRAGE-family phantom generator (not synthmrf's simulator ``training/phantom``).

Anatomy: Colin27 (Debian mricron-data ch2/ch2bet/aal, MNI space, 1 mm), segmented here by a 3-class
1-D Gaussian mixture on ch2bet intensities + linear intensity unmixing for partial-volume fractions.
Readout: whole-echo-train MPRAGE steady state with per-tissue k-space weighting along the in-train
(partition) axis. Headers: vendor-style classic MR Image Storage written with pydicom.

From the synthmrf repository only the region-label definition (training.phantom.regions) and, after
writing, the repository's header reader (pipeline.acquisition.protocol_from_dicom, to fill the manifest's
"acquisition" = what a reader of the header learns) are used. See README.md.

Usage (from the repository root): ``python -m research.indep_phantom.make_indep OUT [--per-protocol N]
[--seed S] [--only I ...] [--no-kspace-weighting] [--template-cache PATH] [--scale TISSUE.QTY=FACTOR ...]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from scipy import fft as sfft
from scipy import ndimage

from pipeline.acquisition import protocol_from_dicom
from training.phantom.regions import LABEL_NAMES, region_labels

TEMPLATES = Path("/usr/share/mricron/templates")
# Built on first use (~220 MB); var/ is git-ignored.
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / "var" / "indep_phantom" / "template_cache.npz"
log = logging.getLogger("indep")

# ----------------------------------------------------------------------------------------------- tissues
# Index order of the compartments in every fraction stack.
COMPARTMENTS = ("wm", "gm", "deep_gm", "csf", "fat", "muscle")
BRAIN = ("wm", "gm", "deep_gm", "csf")

# Population means (T1 ms, T2 ms, PD) per field strength; sources in README.md.
TISSUE_MEANS = {
    3.0: {"wm": (880.0, 68.0, 0.69), "gm": (1420.0, 96.0, 0.80), "deep_gm": (1150.0, 70.0, 0.77),
          "csf": (4300.0, 1800.0, 1.00), "fat": (370.0, 130.0, 0.90), "muscle": (1410.0, 40.0, 0.72)},
    1.5: {"wm": (660.0, 74.0, 0.69), "gm": (1180.0, 98.0, 0.80), "deep_gm": (980.0, 76.0, 0.77),
          "csf": (4200.0, 1800.0, 1.00), "fat": (290.0, 160.0, 0.90), "muscle": (1010.0, 44.0, 0.72)},
}
T1_SD, T2_SD, PD_SD, T1T2_RHO = 0.04, 0.06, 0.02, 0.5  # between-subject relative SDs
T2STAR_FACTOR = {3.0: 0.60, 1.5: 0.80}  # T2* = factor * T2 (brain, muscle); CSF and fat see README
MOD_T1, MOD_T2, MOD_PD = 0.03, 0.03, 0.01  # within-tissue smooth spatial variation (relative SD)


# ------------------------------------------------------------------------------------------ protocols
@dataclass(frozen=True)
class Protocol:
    """An MPRAGE-family protocol: what its header says and how it physically runs."""

    key: str
    vendor: str  # siemens, ge, philips
    family_label: str
    field_t: float
    header_tr_ms: float  # what RepetitionTime says
    header_ti_ms: float | None  # what InversionTime says (None: not written)
    ti_to_centre: bool  # True: TI runs inversion -> k-space centre; False: inversion -> first readout
    shot_interval_ms: float  # physical time between inversions
    echo_spacing_ms: float
    flip_deg: float
    te_ms: float
    n_train: int  # readouts per inversion = partitions (slice axis)
    orientation: str  # sagittal / axial
    pixel_mm: float
    matrix: int  # in-plane rows = cols
    slice_mm: float
    inversion_efficiency: float
    ordering: str = "linear"  # linear (centre at n_train // 2)


PROTOCOLS = [
    Protocol("siemens-mprage-3t", "siemens", "MPRAGE", 3.0, 2300.0, 900.0, True, 2300.0, 7.0, 9.0, 2.98,
             176, "sagittal", 1.0, 256, 1.0, 0.96),
    Protocol("siemens-mprage-1.5t", "siemens", "MPRAGE", 1.5, 2400.0, 1000.0, True, 2400.0, 8.6, 8.0, 3.55,
             160, "sagittal", 1.0, 240, 1.2, 0.96),
    Protocol("ge-bravo-3t", "ge", "IR-FSPGR", 3.0, 8.0, 450.0, False, 450.0 + 168 * 8.0 + 600.0, 8.0, 12.0, 3.2,
             168, "axial", 0.9375, 256, 1.2, 0.97),
    Protocol("ge-bravo-1.5t", "ge", "IR-FSPGR", 1.5, 9.0, 500.0, False, 500.0 + 156 * 9.0 + 600.0, 9.0, 12.0, 3.9,
             156, "sagittal", 0.9375, 256, 1.2, 0.97),
    Protocol("philips-tfe-3t", "philips", "T1TFE", 3.0, 8.0, 1000.0, True, 2500.0, 8.0, 8.0, 3.7,
             180, "sagittal", 1.0, 240, 1.0, 0.95),
    Protocol("ge-mprage-paper-3t", "ge-mprage", "MPRAGE", 3.0, 2130.0, 900.0, True, 2130.0, 7.0, 8.0, 2.6,
             176, "sagittal", 1.0, 256, 1.0, 0.96),
]


# ------------------------------------------------------------------------------------------ template
def load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI-1 image (TypeError for anything else)."""
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image):
        raise TypeError(f"{path}: expected a NIfTI-1 image, got {type(img).__name__}")
    return img


def _gmm_1d(x: np.ndarray, means: np.ndarray, n_iter: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3-class 1-D Gaussian mixture by EM (means sorted ascending: CSF, GM, WM)."""
    k = means.size
    sd = np.full(k, x.std() / k)
    w = np.full(k, 1.0 / k)
    for _ in range(n_iter):
        ll = -0.5 * ((x[:, None] - means) / sd) ** 2 - np.log(sd) + np.log(w)
        ll -= ll.max(axis=1, keepdims=True)
        r = np.exp(ll)
        r /= r.sum(axis=1, keepdims=True)
        nk = r.sum(axis=0)
        w = nk / nk.sum()
        means = (r * x[:, None]).sum(0) / nk
        sd = np.sqrt((r * (x[:, None] - means) ** 2).sum(0) / nk) + 1e-3
    order = np.argsort(means)
    return means[order], sd[order], w[order]


def _mni152_brain(bet: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WM, GM and CSF fractions and the brain mask of synthmrf's own template (nilearn's MNI152 2009, which world v2
    warps) on the Colin27 grid, as world v2 reads it: CSF = mask - GM - WM, GM + WM renormalised where above 1. For
    the anatomy ablation only: with it, only the brain's anatomy is no longer independent of our simulator."""
    from nilearn import datasets, image

    ref = nib.Nifti1Image(bet, affine)
    gm, wm = (np.clip(image.resample_to_img(t, ref, interpolation="linear").get_fdata(), 0, 1)
              for t in (datasets.load_mni152_gm_template(resolution=1), datasets.load_mni152_wm_template(resolution=1)))
    brain = image.resample_to_img(datasets.load_mni152_brain_mask(resolution=1), ref,
                                  interpolation="nearest").get_fdata() > 0
    scale = np.maximum(gm + wm, 1.0)
    wm, gm = (np.where(brain, f / scale, 0).astype(np.float32) for f in (wm, gm))
    csf = np.where(brain, np.clip(1 - wm - gm, 0, 1), 0).astype(np.float32)
    return wm, gm, csf, brain


def build_template(cache: Path, anatomy: str = "colin27") -> dict[str, np.ndarray]:
    """Colin27 compartment fractions, brain mask, depth and pose centre (MNI grid); cached in ``cache``.
    ``anatomy="mni152"``: the brain's WM / GM / CSF from our own template instead (:func:`_mni152_brain`)."""
    if cache.is_file():
        return dict(np.load(cache))
    t0 = time.time()
    ch2_img = load_nifti(TEMPLATES / "ch2.nii.gz")
    affine = ch2_img.affine.astype(np.float64)
    head = ch2_img.get_fdata(dtype=np.float32)
    bet = load_nifti(TEMPLATES / "ch2bet.nii.gz").get_fdata(dtype=np.float32)
    aal = np.asarray(load_nifti(TEMPLATES / "aal.nii.gz").dataobj).astype(np.int16)
    brain = ndimage.binary_fill_holes(bet > 0)
    brain = ndimage.binary_opening(brain, iterations=1)
    lab, _ = ndimage.label(brain)
    brain = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    vals = bet[brain]
    rng = np.random.default_rng(0)
    sample = rng.choice(vals, 300_000, replace=False).astype(np.float64)
    means, sds, weights = _gmm_1d(sample, np.percentile(sample, [10, 50, 90]))
    log.info("GMM on ch2bet: means %s sd %s w %s", np.round(means, 1), np.round(sds, 1), np.round(weights, 3))
    mu_csf, mu_gm, mu_wm = means
    i = ndimage.gaussian_filter(bet, 0.5)  # a little smoothing before unmixing (noise, 1-voxel jitter)
    # Linear unmixing between neighbouring classes (CSF-GM below mu_gm, GM-WM above).
    a = np.clip((i - mu_csf) / (mu_gm - mu_csf), 0, 1)
    b = np.clip((i - mu_gm) / (mu_wm - mu_gm), 0, 1)
    low = i < mu_gm
    wm = np.where(low, 0, b)
    gm = np.where(low, a, 1 - b)
    csf = np.where(low, 1 - a, 0)
    wm, gm, csf = (np.where(brain, f, 0).astype(np.float32) for f in (wm, gm, csf))
    if anatomy == "mni152":
        wm, gm, csf, brain = _mni152_brain(bet, affine)
    # Deep grey nuclei from AAL (caudate 71-72, putamen 73-74, pallidum 75-76, thalamus 77-78).
    deep_mask = np.isin(aal, np.arange(71, 79))
    deep_w = np.clip(ndimage.gaussian_filter(deep_mask.astype(np.float32), 1.0) * 1.5, 0, 1)
    tissue = gm + wm
    deep = tissue * deep_w
    gm, wm = gm * (1 - deep_w), wm * (1 - deep_w)
    # Non-brain head tissue from ch2 outside the brain: bright = fat, intermediate = muscle/soft tissue,
    # dark = skull/air (no signal).
    wm_level = float(np.median(head[brain & (wm > 0.9)]))
    r = ndimage.gaussian_filter(head, 0.7) / wm_level
    head_mask = ndimage.binary_fill_holes(ndimage.binary_closing(head > 0.1 * wm_level, iterations=3))
    outside = head_mask & ~ndimage.binary_dilation(brain, iterations=1)
    fat = np.clip((r - 0.80) / 0.35, 0, 1)
    muscle = np.clip((r - 0.12) / 0.30, 0, 1) * (1 - fat)
    fat, muscle = (np.where(outside, f, 0).astype(np.float32) for f in (fat, muscle))
    fractions = np.stack([wm, gm, deep, csf, fat, muscle]).astype(np.float32)
    depth = ndimage.distance_transform_edt(brain).astype(np.float32)
    idx = np.argwhere(brain)
    centre = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    out = {"fractions": fractions, "brain": brain.astype(np.uint8), "depth": depth, "affine": affine,
           "centre": centre, "gmm": np.stack([means, sds, weights])}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    log.info("template built in %.0f s", time.time() - t0)
    return out


def region_labels_for(fr: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The repository's region definition (format only), on Colin27 fractions in MNI space."""
    gm = fr[COMPARTMENTS.index("gm")] + fr[COMPARTMENTS.index("deep_gm")]
    return region_labels(gm, fr[COMPARTMENTS.index("wm")], fr[COMPARTMENTS.index("csf")],
                         brain.astype(np.float32), affine)


# ---------------------------------------------------------------------------------------- per subject
def rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx (angles in radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


@dataclass
class SubjectDraw:
    """Everything drawn at random for one subject."""

    sid: str
    protocol: Protocol
    rot: np.ndarray
    scale: float
    shift: np.ndarray
    atrophy: float
    tissues: dict[str, tuple[float, float, float]]
    mod_waves: np.ndarray  # (J, 3) wave vectors (rad/mm) in template space
    mod_phase: np.ndarray
    bias_coef: np.ndarray
    snr: float
    oblique_deg: float
    fov_offset: np.ndarray
    seed: int
    age: int = 0
    sex: str = "O"


def draw_subject(i: int, protocol: Protocol, master: int) -> SubjectDraw:
    """Subject ``i`` (0-based) of a dataset with master seed ``master``."""
    rng = np.random.default_rng(np.random.SeedSequence(master, spawn_key=(i,)))
    ang = np.radians(rng.uniform(-8, 8, 3))
    rot = rotation(*ang)
    scale = float(rng.uniform(0.92, 1.08))
    shift = rng.uniform(-6, 6, 3)
    atrophy = float(rng.uniform(0.15, 0.35)) if rng.random() < 0.4 else 0.0
    means = TISSUE_MEANS[protocol.field_t]
    tissues = {}
    cov = np.array([[T1_SD ** 2, T1T2_RHO * T1_SD * T2_SD], [T1T2_RHO * T1_SD * T2_SD, T2_SD ** 2]])
    for name, (t1, t2, pd) in means.items():
        z = rng.multivariate_normal([0, 0], cov)
        sd_scale = 0.5 if name in ("csf",) else 1.0
        t1s = t1 * np.exp(z[0] * sd_scale)
        t2s = t2 * np.exp(z[1] * (2.0 if name == "csf" else 1.0))
        pds = 1.0 if name == "csf" else float(np.clip(pd * (1 + PD_SD * rng.standard_normal()), 0.5, 1.0))
        tissues[name] = (float(t1s), float(t2s), pds)
    n_waves = 10
    dirs = rng.standard_normal((n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    wavelength = rng.uniform(50, 140, n_waves)
    waves = dirs * (2 * np.pi / wavelength)[:, None]
    phase = rng.uniform(0, 2 * np.pi, n_waves)
    bias = rng.normal(0, 0.10, 9)
    snr = float(rng.uniform(20, 40))
    oblique = float(rng.uniform(4, 10)) * (1 if i % 2 else 0) * rng.choice([-1, 1])
    fov_offset = rng.uniform(-8, 8, 3)
    return SubjectDraw(f"sub-{i + 1:03d}", protocol, rot, scale, shift, atrophy, tissues, waves, phase, bias,
                       snr, oblique, fov_offset, int(rng.integers(2 ** 31)), int(rng.integers(25, 80)),
                       str(rng.choice(["F", "M"])))


def parse_scale(text: str) -> tuple[str, int, float]:
    """``wm.t1=1.15`` -> ("wm", 0, 1.15): a tissue, which of (t1, t2, pd), and its factor."""
    try:
        key, factor = text.split("=")
        tissue, qty = key.split(".")
        index = ("t1", "t2", "pd").index(qty)
        value = float(factor)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected TISSUE.QTY=FACTOR (e.g. wm.t1=1.15), got {text!r}") from exc
    if tissue not in COMPARTMENTS or not value > 0:
        raise argparse.ArgumentTypeError(
            f"tissue must be one of {', '.join(COMPARTMENTS)} and the factor > 0: {text!r}")
    return tissue, index, value


def scaled(sub: SubjectDraw, scales: list[tuple[str, int, float]]) -> SubjectDraw:
    """The same subject (anatomy, pose, noise, every other draw) with some tissue values multiplied."""
    tissues = dict(sub.tissues)
    for tissue, index, factor in scales:
        values = list(tissues[tissue])
        values[index] *= factor
        tissues[tissue] = (values[0], values[1], values[2])
    return replace(sub, tissues=tissues)


def modulation(sub: SubjectDraw, mni: np.ndarray) -> np.ndarray:
    """Smooth zero-mean unit-SD field of template coordinates (3, N) -> (N,)."""
    arg = sub.mod_waves @ mni + sub.mod_phase[:, None]
    return (np.cos(arg).sum(0) * np.sqrt(2.0 / sub.mod_waves.shape[0])).astype(np.float32)


def patient_to_template(sub: SubjectDraw, centre: np.ndarray, ras: np.ndarray) -> np.ndarray:
    """Patient RAS mm (3, N) -> template MNI mm (3, N); pose: p = R s (m - c) + t."""
    return centre[:, None] + (sub.rot.T @ (ras - sub.shift[:, None])) / sub.scale


def subject_fractions(tpl: dict[str, np.ndarray], sub: SubjectDraw) -> np.ndarray:
    """The template's compartment fractions after the subject's atrophy (if any)."""
    fr = tpl["fractions"].copy()
    if sub.atrophy > 0:
        # Cortical thinning: part of the GM within ~6 mm of the brain surface becomes CSF.
        w = np.clip((8.0 - tpl["depth"]) / 4.0, 0, 1) * sub.atrophy
        moved = fr[1] * w
        fr[1] -= moved
        fr[3] += moved
    return fr


def sample(volume: np.ndarray, vox: np.ndarray, order: int) -> np.ndarray:
    """``volume`` at voxel coordinates ``vox`` (3, N); 0 outside."""
    return ndimage.map_coordinates(volume, vox, order=order, mode="constant", cval=0.0, prefilter=False)


# ------------------------------------------------------------------------------------------- grids
MRF_SHAPE = (256, 256, 256)
MRF_AFFINE = np.array([[-1.0, 0, 0, 127.5], [0, -1.0, 0, 127.5], [0, 0, 1.0, -127.5], [0, 0, 0, 1]])


def grid_points(shape: tuple[int, int, int], affine: np.ndarray, ks: slice | None = None) -> np.ndarray:
    """World coordinates (3, N) of the grid's voxels (optionally only slices ``ks``), C order."""
    ks = ks or slice(0, shape[2])
    ii, jj, kk = np.meshgrid(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32),
                             np.arange(ks.start, ks.stop, dtype=np.float32), indexing="ij")
    idx = np.stack([ii.ravel(), jj.ravel(), kk.ravel()])
    return affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:].astype(np.float32)


@dataclass(frozen=True)
class AcqGrid:
    """The MPRAGE's acquisition grid (DICOM geometry)."""

    shape: tuple[int, int, int]  # (columns i, rows j, slices k)
    row_dir: np.ndarray  # LPS unit vector along a row (i increases)
    col_dir: np.ndarray  # LPS unit vector along a column (j increases)
    slice_dir: np.ndarray
    spacing: tuple[float, float, float]  # (along i, along j, along k)
    origin_lps: np.ndarray

    @property
    def affine_lps(self) -> np.ndarray:
        """Voxel (i, j, k) -> patient LPS mm."""
        a = np.eye(4)
        a[:3, 0] = self.row_dir * self.spacing[0]
        a[:3, 1] = self.col_dir * self.spacing[1]
        a[:3, 2] = self.slice_dir * self.spacing[2]
        a[:3, 3] = self.origin_lps
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        """Voxel (i, j, k) -> patient RAS mm."""
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ self.affine_lps


def acquisition_grid(p: Protocol, sub: SubjectDraw) -> AcqGrid:
    """The protocol's grid, tilted by the subject's oblique angle and shifted by its FOV offset."""
    if p.orientation == "sagittal":
        row, col = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # A->P, S->I
    else:
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])  # R->L, A->P
    th = np.radians(sub.oblique_deg)  # tilt about the patient's left-right axis
    rx = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    row, col = rx @ row, rx @ col
    sl = np.cross(row, col)
    shape = (p.matrix, p.matrix, p.n_train)
    spacing = (p.pixel_mm, p.pixel_mm, p.slice_mm)
    centre = np.array([0.0, -10.0, 15.0]) + sub.fov_offset  # LPS: brain sits a bit anterior/inferior of FOV centre
    origin = centre - ((shape[0] - 1) / 2 * spacing[0] * row + (shape[1] - 1) / 2 * spacing[1] * col
                       + (shape[2] - 1) / 2 * spacing[2] * sl)
    return AcqGrid(shape, row, col, sl, spacing, origin)


# ---------------------------------------------------------------------------------------- physics
def inversion_to_first_readout_ms(p: Protocol) -> float:
    """TD1: time from the inversion to the first readout pulse, from the header's TI and its meaning."""
    if p.header_ti_ms is None:
        raise ValueError(f"{p.key}: no inversion time")
    return p.header_ti_ms - (p.n_train // 2) * p.echo_spacing_ms if p.ti_to_centre else p.header_ti_ms


def train_mz(t1: np.ndarray, p: Protocol) -> np.ndarray:
    """Longitudinal magnetisation (M0 = 1) just before each readout pulse of the periodic steady state,
    (K, N) for T1 values (K,). Inversion (efficiency eta) at t = 0, free recovery TD1, N pulses of flip a
    spaced ES, recovery to the next inversion at the shot interval."""
    t1 = np.asarray(t1, dtype=np.float64)
    n = p.n_train
    td1 = inversion_to_first_readout_ms(p)
    if td1 <= 0:
        raise ValueError(f"{p.key}: TI too short for the train")
    td2 = p.shot_interval_ms - td1 - (n - 1) * p.echo_spacing_ms
    if td2 <= 0:
        raise ValueError(f"{p.key}: shot interval too short")
    ca = np.cos(np.radians(p.flip_deg))
    e1, es, e2 = np.exp(-td1 / t1), np.exp(-p.echo_spacing_ms / t1), np.exp(-td2 / t1)
    # Mz as affine function a*x + b of Mz before the inversion (x), propagated through one period.
    a, b = -p.inversion_efficiency * np.ones_like(t1), np.zeros_like(t1)
    a, b = a * e1, b * e1 + (1 - e1)
    for k in range(n):
        a, b = a * ca, b * ca
        dec = es if k < n - 1 else e2
        a, b = a * dec, b * dec + (1 - dec)
    x = b / (1 - a)
    mz = np.empty((t1.size, n))
    m = -p.inversion_efficiency * x
    m = m * e1 + (1 - e1)
    for k in range(n):
        mz[:, k] = m
        m = m * ca
        m = m * es + (1 - es)
    return mz


def echo_signals(t1: np.ndarray, t2star: np.ndarray, p: Protocol) -> np.ndarray:
    """Signal (M0 = 1) of every echo of the steady-state train, (K, N): sin a x Mz x exp(-TE/T2*)."""
    return (np.sin(np.radians(p.flip_deg)) * train_mz(t1, p)
            * np.exp(-p.te_ms / np.asarray(t2star, dtype=np.float64))[:, None])


def line_of_echo(p: Protocol) -> np.ndarray:
    """k-space line (centred index 0..N-1, centre N//2) acquired at each echo: linear ordering."""
    return np.arange(p.n_train)


def centre_echo(p: Protocol) -> int:
    """The echo that acquires the k-space centre line."""
    return int(np.flatnonzero(line_of_echo(p) == p.n_train // 2)[0])


def partition_weights(sig: np.ndarray, p: Protocol, kspace_weighting: bool = True) -> np.ndarray:
    """Weight of each partition-axis k-space line, in FFT order (index 0 = k = 0), for one compartment's
    echo signals ``sig`` (N,): each line gets the signal of the echo that acquired it; without
    ``kspace_weighting`` every line gets the centre echo's signal (an ablation: no readout blurring)."""
    n = p.n_train
    weight = np.zeros(n, np.float64)
    if kspace_weighting:
        weight[(line_of_echo(p) - n // 2) % n] = sig  # FFT order: line l has frequency l - n//2
    else:
        weight[:] = sig[centre_echo(p)]
    return weight


def t2star_of(name: str, t2: float, field_t: float) -> float:
    """T2* (ms) of a compartment."""
    if name == "csf":
        return 0.3 * t2
    if name == "fat":
        return 0.5 * t2
    return T2STAR_FACTOR[field_t] * t2


def bias_field(sub: SubjectDraw, ras: np.ndarray) -> np.ndarray:
    """exp of a 2nd-order Legendre polynomial in patient coordinates (radius 120 mm)."""
    x, y, z = (ras / 120.0).astype(np.float32)
    terms = [x, y, z, 1.5 * x * x - 0.5, 1.5 * y * y - 0.5, 1.5 * z * z - 0.5, x * y, x * z, y * z]
    return np.exp(sum(c * t for c, t in zip(sub.bias_coef, terms, strict=True))).astype(np.float32)


# ------------------------------------------------------------------------------------------- truth
def truth_maps(sub: SubjectDraw, fr: np.ndarray, mod: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth of a voxel: PD-weighted average of relaxation *rates* over its compartments (fast-exchange
    reading of a mixed voxel); PD = sum of fraction x PD. fr: (6, N); returns T1, T2 (ms), PD."""
    w_sum = np.zeros(fr.shape[1], np.float32)
    r1 = np.zeros_like(w_sum)
    r2 = np.zeros_like(w_sum)
    for c, name in enumerate(COMPARTMENTS):
        t1, t2, pd = sub.tissues[name]
        m1, m2, mp = modulated(name, mod)
        w = fr[c] * pd * mp
        w_sum += w
        r1 += w / (t1 * m1)
        r2 += w / (t2 * m2)
    ok = w_sum > 1e-4
    t1_map = np.where(ok, w_sum / np.where(ok, r1, 1), 0).astype(np.float32)
    t2_map = np.where(ok, w_sum / np.where(ok, r2, 1), 0).astype(np.float32)
    return t1_map, t2_map, w_sum.astype(np.float32)


def modulated(name: str, mod: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | float, np.ndarray | float]:
    """Multiplicative T1, T2, PD factors of the smooth within-tissue field ``mod`` (brain tissue only)."""
    if name in ("wm", "gm", "deep_gm"):
        return (np.exp(MOD_T1 * mod), np.exp(MOD_T2 * mod), np.exp(MOD_PD * mod))
    return 1.0, 1.0, 1.0


# ------------------------------------------------------------------------------------------ DICOM
def uid(rng: np.random.Generator) -> str:
    """A 2.25 UID from 15 random bytes."""
    return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))


def ds_str(x: float, nd: int = 6) -> str:
    """Decimal string with at most ``nd`` decimals, trailing zeros dropped."""
    s = f"{x:.{nd}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def write_dicom(stored: np.ndarray, grid: AcqGrid, p: Protocol, sub: SubjectDraw, out: Path,
                rng: np.random.Generator, slope: float) -> dict[str, str]:
    """One classic MR Image Storage file per slice of ``stored`` (i, j, k) in ``out``; returns the UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = uid(rng), uid(rng), uid(rng)
    date = (dt.date(2023, 1, 1) + dt.timedelta(days=int(rng.integers(0, 600)))).strftime("%Y%m%d")
    gamma = 42.5764
    freq = {("siemens", 3.0): 123.2, ("siemens", 1.5): 63.6}.get((p.vendor, p.field_t), gamma * p.field_t * 0.9995)
    ni, nj, nk = grid.shape
    iop = [*grid.row_dir, *grid.col_dir]
    for k in range(nk):
        ds = Dataset()
        meta = FileMetaDataset()
        sop = uid(rng)
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = UID(sop)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = "101500", "102233", "102233", "102233"
        ds.Modality = "MR"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.PatientName = f"INDEP^{sub.sid.replace('-', '').upper()}"
        ds.PatientID = f"INDEP{sub.sid[-3:]}"
        ds.PatientBirthDate = ""
        ds.PatientSex = sub.sex
        ds.PatientAge = f"{sub.age:03d}Y"
        ds.PatientPosition = "HFS"
        ds.BodyPartExamined = "HEAD" if p.vendor == "siemens" else "BRAIN"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID = "1"
        ds.SeriesNumber = 5
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.StudyDescription = "HEAD" if p.vendor == "siemens" else "BRAIN"
        ds.MagneticFieldStrength = ds_str(p.field_t)
        ds.ImagingFrequency = ds_str(freq, 6)
        ds.ImagedNucleus = "1H"
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = ds_str(p.slice_mm)
        ds.SpacingBetweenSlices = ds_str(p.slice_mm)
        ds.RepetitionTime = ds_str(p.header_tr_ms)
        ds.EchoTime = ds_str(p.te_ms)
        if p.header_ti_ms is not None:
            ds.InversionTime = ds_str(p.header_ti_ms)
        ds.FlipAngle = ds_str(p.flip_deg)
        ds.NumberOfAverages = "1"
        ds.EchoNumbers = "1"
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = "100"
        ds.AcquisitionMatrix = [0, ni, nj, 0]
        ds.InPlanePhaseEncodingDirection = "ROW"
        if p.vendor == "siemens":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
            ds.Manufacturer = "SIEMENS"
            ds.ManufacturerModelName = "Prisma_fit" if p.field_t == 3.0 else "Avanto"
            ds.SoftwareVersions = "syngo MR E11" if p.field_t == 3.0 else "syngo MR B17"
            ds.InstitutionName = "INDEPENDENT PHANTOM"
            ds.StationName = "AWP00001"
            ds.SeriesDescription = ds.ProtocolName = "t1_mprage_sag_p2_iso" if p.field_t == 3.0 else "t1_mpr_sag"
            ds.ScanningSequence = ["GR", "IR"]
            ds.SequenceVariant = ["SP", "MP"]
            ds.ScanOptions = "IR"
            ds.SequenceName = "*tfl3d1_16ns"
            ds.EchoTrainLength = "1"
            ds.PixelBandwidth = "240" if p.field_t == 3.0 else "190"
            ds.TransmitCoilName = "Body"
            ds.ReceiveCoilName = "Head_32" if p.field_t == 3.0 else "HeadMatrix"
            ds.SAR = "0.05"
            ds.dBdt = "0"
        elif p.vendor in ("ge", "ge-mprage"):
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.ManufacturerModelName = "DISCOVERY MR750" if p.field_t == 3.0 else "SIGNA HDxt"
            ds.SoftwareVersions = ["27", "LX", "MR Software release:DV26.0_R03"] if p.field_t == 3.0 else \
                ["24", "LX", "MR Software release:HD16.0_V02"]
            ds.InstitutionName = "INDEPENDENT PHANTOM"
            ds.StationName = "MRGE01"
            ds.EchoTrainLength = "1"
            ds.PixelBandwidth = "244.141" if p.field_t == 3.0 else "122.07"
            ds.ReceiveCoilName = "8HRBRAIN" if p.field_t == 1.5 else "32Ch Head"
            if p.vendor == "ge":
                ds.SeriesDescription = ds.ProtocolName = "Ax 3D BRAVO" if p.orientation == "axial" else "SAG FSPGR 3D"
                ds.ScanningSequence = "GR"
                ds.SequenceVariant = ["SS", "SK"]
                ds.ScanOptions = ["FAST_GEMS", "EDR_GEMS", "IR_GEMS", "ACC_GEMS"]
                ds.SequenceName = "efgre3d"
                internal = "3DFGRE"
            else:  # GE-made MPRAGE (the paper's protocol): written as an MPRAGE
                ds.SeriesDescription = ds.ProtocolName = "Sag MPRAGE"
                ds.ScanningSequence = ["GR", "IR"]
                ds.SequenceVariant = ["SS", "SK", "MP"]
                ds.ScanOptions = ["FAST_GEMS", "EDR_GEMS", "IR_GEMS"]
                ds.SequenceName = "MPRAGE"
                internal = "MPRAGE"
            priv = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            priv.add_new(0x9C, "LO", ds.SequenceName)  # (0019,109C) pulse sequence name
            priv.add_new(0x9E, "LO", internal)  # (0019,109E) internal pulse sequence name
        else:  # Philips
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"]
            ds.Manufacturer = "Philips Medical Systems"
            ds.ManufacturerModelName = "Ingenia"
            ds.SoftwareVersions = ["5.4.1", "5.4.1.0"]
            ds.InstitutionName = "INDEPENDENT PHANTOM"
            ds.StationName = "PHILIPS-01"
            ds.SeriesDescription = ds.ProtocolName = "T1W_3D_TFE"
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "MP"
            ds.ScanOptions = "OTHER"
            ds.SequenceName = ""
            ds.PulseSequenceName = "T1TFE"
            ds.EchoTrainLength = str(p.n_train)
            ds.PixelBandwidth = "191"
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = ds_str(slope, 5)
            ds.RescaleType = "normalized"
            priv = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
            priv.add_new(0x20, "LO", "T1TFE")  # (2001,1020) scanning technique
            priv = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
            priv.add_new(0x0E, "FL", float(1.0 / slope))  # (2005,100E) scale slope
        ds.ImageOrientationPatient = [ds_str(v) for v in iop]
        pos = grid.origin_lps + k * grid.spacing[2] * grid.slice_dir
        ds.ImagePositionPatient = [ds_str(v, 4) for v in pos]
        ds.SliceLocation = ds_str(float(np.dot(pos, grid.slice_dir)), 4)
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = nj, ni
        ds.PixelSpacing = [ds_str(grid.spacing[1]), ds_str(grid.spacing[0])]  # row spacing (along j), col spacing
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if p.vendor == "philips":
            ds.BitsStored, ds.HighBit = 16, 15
        plane = np.ascontiguousarray(stored[:, :, k].T)  # (rows j, cols i)
        ds.WindowCenter, ds.WindowWidth = str(int(np.percentile(stored, 99) / 2)), str(int(np.percentile(stored, 99)))
        ds.PixelData = plane.astype("<u2").tobytes()
        ds.save_as(out / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return {"study_instance_uid": study, "series_instance_uid": series, "frame_of_reference_uid": frame}


# -------------------------------------------------------------------------------------------- main
def save_nii(array: np.ndarray, affine: np.ndarray, path: Path, slope: float | None = None) -> None:
    """NIfTI-1 with qform = sform = ``affine`` (mm), optionally with a scale slope."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    nib.save(img, path)


def make_subject(sub: SubjectDraw, tpl: dict[str, np.ndarray], root: Path,
                 kspace_weighting: bool = True) -> dict[str, object]:
    """Write one subject (truth maps, MPRAGE NIfTI and DICOM) under ``root``; returns its manifest entry."""
    t0 = time.time()
    p = sub.protocol
    out = root / sub.sid
    out.mkdir(parents=True, exist_ok=True)
    centre, t_aff = tpl["centre"], tpl["affine"]
    to_vox = np.linalg.inv(t_aff)
    fr_t = subject_fractions(tpl, sub)
    brain_t = tpl["brain"].astype(np.float32)
    labels_t = region_labels_for(fr_t, tpl["brain"], t_aff) if sub.atrophy > 0 else tpl["labels"]

    def to_template_vox(ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mni = patient_to_template(sub, centre, ras)
        return mni, (to_vox[:3, :3] @ mni + to_vox[:3, 3:]).astype(np.float32)

    # ---- truth on the 256^3 working ("mrf") grid, in slabs
    t1_map = np.zeros(MRF_SHAPE, np.float32)
    t2_map, pd_map = np.zeros_like(t1_map), np.zeros_like(t1_map)
    mask = np.zeros(MRF_SHAPE, np.uint8)
    labels = np.zeros(MRF_SHAPE, np.int16)
    slab = 32
    for k0 in range(0, MRF_SHAPE[2], slab):
        ks = slice(k0, min(k0 + slab, MRF_SHAPE[2]))
        ras = grid_points(MRF_SHAPE, MRF_AFFINE, ks)
        mni, vox = to_template_vox(ras)
        fr = np.stack([sample(f, vox, 1) for f in fr_t]).clip(0, 1)
        mod = modulation(sub, mni)
        t1, t2, pd = truth_maps(sub, fr, mod)
        shp = (MRF_SHAPE[0], MRF_SHAPE[1], ks.stop - ks.start)
        t1_map[:, :, ks], t2_map[:, :, ks], pd_map[:, :, ks] = (a.reshape(shp) for a in (t1, t2, pd))
        mask[:, :, ks] = (sample(brain_t, vox, 1) >= 0.5).reshape(shp)
        labels[:, :, ks] = sample(labels_t.astype(np.float32), vox, 0).astype(np.int16).reshape(shp)
    labels[mask == 0] = 0
    bad = (mask > 0) & (pd_map <= 0)
    if bad.any():
        raise RuntimeError(f"{sub.sid}: {int(bad.sum())} brain voxels without tissue")
    for name, arr in (("T1", t1_map), ("T2", t2_map), ("PD", pd_map)):
        save_nii(arr, MRF_AFFINE, out / f"{name}.nii.gz")
    save_nii(mask, MRF_AFFINE, out / "brain_mask.nii.gz")
    save_nii(labels, MRF_AFFINE, out / "labels.nii.gz")
    # The evaluation's preparation step (training/preprocess.py) opens mrf_svd.nii.gz even with --no-true:
    # an all-zero placeholder of the right shape and grid (no MRF is simulated here).
    save_nii(np.zeros(MRF_SHAPE + (4,), np.complex64), MRF_AFFINE, out / "mrf_svd.nii.gz")
    del t1_map, t2_map, pd_map, labels
    t_truth = time.time() - t0

    # ---- MPRAGE on its acquisition grid
    grid = acquisition_grid(p, sub)
    ni, nj, nk = grid.shape
    ras = grid_points(grid.shape, grid.affine_ras)
    mni, vox = to_template_vox(ras)
    mod = modulation(sub, mni)
    bias = bias_field(sub, ras)
    del mni
    fr = np.stack([sample(f, vox, 1) for f in fr_t]).clip(0, 1)
    del vox, ras
    names = list(COMPARTMENTS)
    t1s = np.array([sub.tissues[n][0] for n in names])
    t2st = np.array([t2star_of(n, sub.tissues[n][1], p.field_t) for n in names])
    sig = echo_signals(t1s, t2st, p)  # (6, N)
    c_echo = centre_echo(p)
    # centre-echo signal vs T1, for the first-order amplitude of within-tissue T1 variation
    t1_table = np.geomspace(100, 8000, 400)
    image_k = np.zeros((ni, nj, nk), np.complex64)
    for c, name in enumerate(names):
        comp = fr[c] * sub.tissues[name][2]
        if name in ("wm", "gm", "deep_gm"):
            m1, _, mp = modulated(name, mod)
            sc_table = echo_signals(t1_table, np.full_like(t1_table, t2st[c]), p)[:, c_echo]
            ratio = np.interp(t1s[c] * m1, t1_table, sc_table) / sig[c, c_echo]
            comp = comp * mp * ratio.astype(np.float32)
        vol = comp.reshape(ni, nj, nk).astype(np.float32)
        weight = partition_weights(sig[c], p, kspace_weighting)
        image_k += sfft.fft(vol, axis=2, workers=1) * weight[None, None, :].astype(np.complex64)
    image = sfft.ifft(image_k, axis=2, workers=1).astype(np.complex64)
    del image_k
    image *= bias.reshape(ni, nj, nk)
    wm_dom = (fr[0] > 0.95).reshape(ni, nj, nk)
    level = float(np.median(np.abs(image[wm_dom])))
    sigma = level / sub.snr
    noise_rng = np.random.default_rng(sub.seed)
    image += (noise_rng.standard_normal(image.shape, dtype=np.float32)
              + 1j * noise_rng.standard_normal(image.shape, dtype=np.float32)) * np.float32(sigma)
    mag = np.abs(image)
    del image
    head = fr.sum(0).reshape(ni, nj, nk) > 0.3
    target = {"siemens": 1600.0, "ge": 1200.0, "ge-mprage": 1200.0, "philips": 900.0}[p.vendor]
    stored = np.clip(np.round(mag / np.percentile(mag[head], 99.5) * target), 0, 4095).astype(np.uint16)
    slope = 2.187 if p.vendor == "philips" else 1.0
    save_nii(stored, grid.affine_ras, out / "mprage.nii.gz", slope=slope if p.vendor == "philips" else None)
    uids = write_dicom(stored, grid, p, sub, out / "mprage_dicom", np.random.default_rng(sub.seed + 1), slope)
    contrast = {n: float(sig[c, c_echo] * sub.tissues[n][2]) for c, n in enumerate(names)}
    log.info("%s %s: truth %.0f s, total %.0f s; centre-echo signal x PD %s", sub.sid, p.key, t_truth,
             time.time() - t0, {k: round(v, 4) for k, v in contrast.items()})
    td1 = inversion_to_first_readout_ms(p)
    entry = {
        "id": sub.sid,
        "files": FILES,
        "tissues": {**{n: {"t1_ms": round(v[0], 3), "t2_ms": round(v[1], 3), "pd": round(v[2], 4)}
                       for n, v in sub.tissues.items() if n in BRAIN},
                    "scalp": {"t1_ms": round(sub.tissues["fat"][0], 3), "t2_ms": round(sub.tissues["fat"][1], 3),
                              "pd": round(sub.tissues["fat"][2], 4)},
                    "lesion": {"t1_ms": round(sub.tissues["wm"][0], 3), "t2_ms": round(sub.tissues["wm"][1], 3),
                               "pd": round(sub.tissues["wm"][2], 4)}},
        "nonbrain_tissues": {"muscle": dict(zip(("t1_ms", "t2_ms", "pd"), sub.tissues["muscle"], strict=True))},
        "mprage_snr": round(sub.snr, 3),
        "vendor": {"ge-mprage": "ge"}.get(p.vendor, p.vendor),
        "protocol_physical": {
            "key": p.key, "family_label": p.family_label, "field_strength_t": p.field_t,
            "header_repetition_time_ms": p.header_tr_ms, "header_inversion_time_ms": p.header_ti_ms,
            "ti_definition": "inversion to k-space centre" if p.ti_to_centre else "inversion to first readout",
            "shot_interval_ms": p.shot_interval_ms, "echo_spacing_ms": p.echo_spacing_ms,
            "flip_angle_deg": p.flip_deg, "te_ms": p.te_ms, "readouts_per_shot": p.n_train,
            "ordering": p.ordering, "centre_echo": p.n_train // 2,
            "inversion_to_first_readout_ms": td1,
            "inversion_to_centre_ms": td1 + (p.n_train // 2) * p.echo_spacing_ms,
            "inversion_efficiency": p.inversion_efficiency,
            "t2star_factor_brain": T2STAR_FACTOR[p.field_t],
        },
        "centre_echo_signal_x_pd": contrast,
        "anatomy": {"source": "Colin27 (mricron ch2/ch2bet/aal)", "atrophy_gm_to_csf": round(sub.atrophy, 3)},
        "pose": {"rotation": np.round(sub.rot, 6).tolist(), "scale": round(sub.scale, 5),
                 "translation_mm": np.round(sub.shift, 4).tolist(),
                 "definition": "patient RAS = R * scale * (MNI - colin_brain_centroid) + t"},
        "oblique_deg": round(sub.oblique_deg, 3),
        "mprage_grid": {"shape": list(grid.shape), "spacing_mm": list(grid.spacing),
                        "affine_ras": np.round(grid.affine_ras, 6).tolist()},
        "mrf_placeholder": True,
        "patient_id": f"INDEP{sub.sid[-3:]}",
        **uids,
        "split": "test",
    }
    (out / "entry.json").write_text(json.dumps(entry, indent=1))
    return entry


FILES = {"mprage_dicom": "mprage_dicom", "mprage": "mprage.nii.gz", "t1": "T1.nii.gz", "t2": "T2.nii.gz",
         "pd": "PD.nii.gz", "brain_mask": "brain_mask.nii.gz", "labels": "labels.nii.gz", "mrf": "mrf_svd.nii.gz"}


def read_acquisition(series_dir: Path) -> dict[str, object]:
    """What synthmrf's header reader learns from the written series (the manifest's ``acquisition``)."""
    first = sorted(series_dir.glob("*.dcm"))[0]
    return protocol_from_dicom(dcmread(first, stop_before_pixels=True)).to_dict()


def label_names() -> dict[str, str]:
    """The manifest's ``labels``: label value -> region name."""
    return {str(i + 1): n for i, n in enumerate(LABEL_NAMES)}


def main() -> None:
    """Command line: write the dataset."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-protocol", type=int, default=2)
    ap.add_argument("--seed", type=int, default=2027)
    ap.add_argument("--only", type=int, nargs="*", help="subject indices (0-based) to (re)make")
    ap.add_argument("--no-kspace-weighting", dest="kspace_weighting", action="store_false",
                    help="ablation: every partition k-space line gets the centre echo's signal (no readout blurring)")
    ap.add_argument("--template-cache", type=Path, default=None,
                    help=f"template cache, built on first use (default: {DEFAULT_CACHE}, with -mni152 before the "
                         "suffix for --anatomy mni152)")
    ap.add_argument("--anatomy", choices=("colin27", "mni152"), default="colin27",
                    help="ablation: mni152 renders the brain from synthmrf's own template's tissue maps (the rest of "
                         "the head stays Colin27's)")
    ap.add_argument("--scale", type=parse_scale, action="append", default=[], metavar="TISSUE.QTY=FACTOR",
                    help="dose-response: multiply a tissue's drawn T1, T2 or PD (e.g. wm.t1=1.15; repeatable); "
                         "every other draw, the noise included, stays the same for the seed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.template_cache is None:
        args.template_cache = (DEFAULT_CACHE if args.anatomy == "colin27" else
                               DEFAULT_CACHE.with_name(DEFAULT_CACHE.stem + "-mni152.npz"))
    tpl = build_template(args.template_cache, args.anatomy)
    if "labels" not in tpl:
        tpl["labels"] = region_labels_for(tpl["fractions"], tpl["brain"], tpl["affine"])
        np.savez(args.template_cache, **tpl)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    draws = [scaled(draw_subject(i, p, args.seed), args.scale) for i, p in
             enumerate(p for p in PROTOCOLS for _ in range(args.per_protocol))]
    entries = []
    for i, sub in enumerate(draws):
        path = root / sub.sid / "entry.json"
        if args.only is not None and i not in args.only and path.is_file():
            entry = json.loads(path.read_text())
        else:
            entry = make_subject(sub, tpl, root, args.kspace_weighting)
        try:
            entry["acquisition"] = read_acquisition(root / sub.sid / "mprage_dicom")
            entry.pop("acquisition_error", None)
        except Exception as exc:  # a finding: the reader refuses the header
            entry["acquisition_error"] = f"{type(exc).__name__}: {exc}"
            log.warning("%s: synthmrf's reader failed: %s", sub.sid, exc)
        (root / sub.sid / "entry.json").write_text(json.dumps(entry, indent=1))
        entries.append(entry)
    manifest = {
        "format": "synthmrf-phantom/1",
        "generator": "indep/make_indep.py (independent of training/phantom)",
        "seed": args.seed,
        "tissue_scale": [f"{t}.{('t1', 't2', 'pd')[i]}={f}" for t, i, f in args.scale],
        "n_subjects": len(entries),
        "mprage_registration": "none",
        "grids": {"mrf": {"shape": list(MRF_SHAPE), "affine_ras": MRF_AFFINE.tolist()}},
        "files": FILES,
        "tissues": ["wm", "gm", "deep_gm", "csf", "scalp", "lesion"],
        "tissue_means": {str(f): v for f, v in TISSUE_MEANS.items()},
        "labels": label_names(),
        "split": {"train": [], "val": [], "test": [e["id"] for e in entries]},
        "subjects": entries,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (root / "settings.json").write_text(json.dumps({"seed": args.seed, "generator": "indep"}, indent=1))


if __name__ == "__main__":
    main()
