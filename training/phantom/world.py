"""Phantom world v2: every modelling choice and population/scanner variable drawn per subject.

World v1 (``PhantomOptions.world = "v1"``) is one setting: the paper's protocol at 3 T, narrow
literature priors, signal-domain partial volume, one warped template. World v2 draws, per subject
(ranges and sources; U = uniform):

- **Field strength**: 3 T (p 0.6) or 1.5 T.
- **Tissue values** (subject means; T1 and T2 drawn independently; within-subject modulation
  amplitudes U(0.02, 0.08) for T1 and T2, U(0.01, 0.03) for PD):
  3 T: WM T1 U(750, 1100) ms (Marques 2010 810; Wansapura 1999 832; Bojorquez 2017 940; Stanisz 2005
  1084; "0.6-1.1 s" across methods, Asslander 2024), cortical GM T1 U(1200, 1800) with GM/WM in
  [1.35, 1.95] (Marques 1350, Bojorquez 1425, Wansapura 1331, Stanisz 1820); T2 WM U(55, 85), GM
  U(70, 115) (Stanisz 69/99, Wansapura 80/110; FISP-MRF lower, Kato 2019).
  1.5 T: WM T1 U(560, 820) (Rooney 2007 656), GM T1 U(1000, 1450) (Rooney 1188), GM/WM in
  [1.35, 2.1]; T2 WM U(60, 95), GM U(75, 120) (similar or slightly longer than 3 T).
  Deep GM: T1 = WM + U(0.25, 0.75) x (GM - WM), T2 U(55, 90) (iron). CSF: T1 U(3300, 4500) ms, T2
  U(500, 2000) ms (`--csf-t2-range` moves it). Scalp fat: T1 U(300, 450) at 3 T, U(230, 350) at
  1.5 T, T2 U(80, 160).
  WM lesions: T1 = WM x U(1.2, 2.0), T2 = WM x U(1.3, 3.0), PD = WM x U(1.03, 1.2).
  PD: WM U(0.64, 0.74), GM U(0.76, 0.86), deep GM U(0.74, 0.84), CSF 1, fat U(0.8, 1.0) (Neeb 2006).
- **Partial volume**: signal-domain (p 1/3), fast exchange (p 1/3) or a mix lambda ~ U(0, 1)
  (:mod:`training.phantom.mixing`).
- **Protocol** (qsynth's MPRAGE ranges, Chalcroft 2025, and vendor headers in the shared notes):
  family MPRAGE (p 0.5), GE IR-FSPGR (p 0.25), Philips TFE (p 0.25). MPRAGE: time between inversions
  U(1800, 2700) ms, TI (to the centre line) U(750, 1150) ms, flip U(7, 12) deg, echo spacing
  U(6, 8.5) ms; IR-FSPGR: prep time (inversion to the first readout) U(400, 650) ms, flip U(10, 13),
  echo spacing U(6, 9) ms, a delay after the train U(0, 600) ms; TFE: time between inversions
  U(2000, 3000) ms, TI U(700, 1100) ms, flip U(7, 10), echo spacing U(6.5, 9) ms, InversionTime not
  written in half of the headers. All: readouts per shot U(150, 256), centre line at U(0.35, 0.55) of
  the train (IR-FSPGR U(0, 0.5): often near-centric), inversion efficiency U(0.8, 1.0), TE U(2.2, 4.6)
  ms by family, T2* = U(0.5, 0.95) x T2.
- **Acquisition grid**: sagittal (p 0.6), axial, coronal or oblique; in-plane pixel U(0.9, 1.3) mm
  over a 240-256 mm field of view, slice thickness U(0.9, 1.5) mm covering 170-190 mm.
- **Bias and noise**: log receive bias SD U(0.05, 0.35), correlation U(50, 120) mm; MPRAGE SNR
  U(12, 45); MRF SNR U(25, 60).
- **Anatomy**: brain size x U(0.88, 1.12) on top of the per-axis scale (SD 0.05); displacement SD
  U(1.5, 3.5) mm; atrophy (p 0.5): a fraction U(0, 0.4) of cortical GM next to CSF becomes CSF;
  enlarged ventricles (p 0.5): a radial pull toward the ventricles (strength U(0, 0.3), 30 mm
  Gaussian); WM lesions (p 0.5): 1-15 blobs of radius U(2, 8) mm in white matter, half of them within
  25 mm of the ventricles.

World v3 is v2 plus an individual cortex, drawn from a stream of its own (a v3 subject is the v2 subject of
the same seed and index with these changes). The template is a population average: its cortex is smoother,
its tissue boundaries blurrier and its folds in the same place in every subject, and models trained on it
read an individual brain's grey matter low (the README's anatomy ablation; a fine-tune of 0.5 on v3 did not
change that, so v3's variation is not yet the cure). Per subject:
boundary sharpness (p 0.8): brain tissue fractions raised to a power U(1, 2.5) and renormalised (1 keeps the
average's blur; an individual's boundaries are about one voxel wide); fold-scale displacement: each
component SD U(0.5, 2) mm, correlation U(5, 10) mm (a gyrus is about 10 mm across), so sulci sit
elsewhere than in the template; cortical thickness: a smooth field (SD U(0, 0.4), correlation 20 mm)
moves the grey/white boundary by turning white matter next to grey into grey (> 0) or back (< 0); open
sulci: averaging blurs the sulci shut (under 5 % of the template's CSF voxels are pure, against about 20 %
in an individual's Colin27 segmentation), so a further U(0, 0.25) of cortical GM bordering CSF becomes CSF
(added to v2's atrophy).

World v4 is v3 plus an individual segmentation, from one more stream (a v4 subject is its v3 namesake with it).
Sharpening cannot make a voxel pure where the average is a tie, and the average's cingulate and insular
cortex are such ties: models trained on v2 or v3 read those cortices 13-17 % low on Colin27, where a lookup of
the voxel's own intensity is within 3 %. v4 re-segments the brain per subject: each voxel becomes its most
likely tissue after a smooth random offset U(0.5, 1.5) (SD, log units, correlation 15 mm) is added to grey
matter's log-fraction (so the GM/WM and GM/CSF boundaries move), the hard map is blurred by a Gaussian of
sigma U(0.3, 0.8) mm (an individual's partial volume), and the voxel's fractions become
(1 - w) x template's + w x re-segmented, w ~ U(0.5, 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from pipeline.protocol import Family
from training.phantom.anatomy import TISSUES, RenderedAnatomy, Template, Warp, random_warp
from training.phantom.fields import SmoothField, random_smooth_field
from training.phantom.geometry import Orientation
from training.phantom.mprage import MprageProtocol
from training.phantom.tissues import TissueModel, TissueValues

BRAIN_TISSUES = [TISSUES.index(n) for n in ("wm", "gm", "deep_gm", "csf")]
"""Indices (in :data:`TISSUES`) of the brain's compartments, which v3 sharpens and v4 re-segments."""
T2_RANGES_MS = {
    3.0: {"wm": (55.0, 85.0), "gm": (70.0, 115.0), "deep_gm": (55.0, 90.0), "csf": (500.0, 2000.0),
          "scalp": (80.0, 160.0)},
    1.5: {"wm": (60.0, 95.0), "gm": (75.0, 120.0), "deep_gm": (55.0, 90.0), "csf": (500.0, 2000.0),
          "scalp": (80.0, 160.0)},
}
"""World v2's T2 priors (uniform, ms) per field strength; lesions are WM x U(:data:`LESION_T2_FACTOR`)."""
LESION_T2_FACTOR = (1.3, 3.0)
EXPECTED_EXCHANGE = 0.5
"""The mean of v2's partial-volume lambda: 0 (p 1/3), 1 (p 1/3) or U(0, 1)."""
VENTRICLE_CENTRE_MNI = np.array([0.0, -12.0, 14.0])
VENTRICLE_SIGMA_MM = 30.0


@dataclass(frozen=True)
class Lesions:
    """White-matter lesion blobs in template mm: centres (L, 3) and radii (L,)."""

    centres_mm: np.ndarray
    radii_mm: np.ndarray

    def fraction(self, template_mm: np.ndarray) -> np.ndarray:
        """Lesion fraction (0..1) at template points (3, N): a soft-edged ball per blob."""
        out = np.zeros(template_mm.shape[1], dtype=np.float32)
        for c, r in zip(self.centres_mm, self.radii_mm, strict=True):
            d = np.linalg.norm(template_mm - c[:, None].astype(np.float32), axis=0)
            out = np.maximum(out, np.clip((r + 1.0 - d) / 2.0, 0, 1))
        return out


@dataclass(frozen=True)
class Segmentation:
    """World v4: an individual's hard segmentation of the brain in place of the average's soft fractions."""

    weight: float  # 0: the template's fractions; 1: the re-segmented ones
    offset: SmoothField  # added to grey matter's log-fraction before the most likely tissue is taken
    blur_mm: float  # Gaussian sigma of the re-segmented map

    def apply(self, anatomy: RenderedAnatomy, fractions: np.ndarray) -> np.ndarray:
        """``fractions`` (tissues, N) of ``anatomy``'s voxels, re-segmented; each voxel keeps its brain total."""
        f = fractions.copy()
        total = f[BRAIN_TISSUES].sum(axis=0)
        logit = np.log(f[BRAIN_TISSUES] / np.maximum(total, 1e-6) + 1e-4)
        logit[BRAIN_TISSUES.index(TISSUES.index("gm"))] += self.offset(anatomy.template_mm)[0]
        winner = np.argmax(logit, axis=0)
        sigma = self.blur_mm / np.linalg.norm(anatomy.grid.affine[:3, :3], axis=0)
        blurred = np.stack([ndimage.gaussian_filter(anatomy.full(np.where(winner == c, total, 0).astype(np.float32)),
                                                    sigma).reshape(-1)[anatomy.index]
                            for c in range(len(BRAIN_TISSUES))])
        hard = blurred * (total / np.maximum(blurred.sum(axis=0), 1e-12))
        f[BRAIN_TISSUES] = (1 - self.weight) * f[BRAIN_TISSUES] + self.weight * hard
        return f


@dataclass(frozen=True)
class AnatomyChanges:
    """Per-subject changes to the rendered template, applied in this order: the individual segmentation (v4),
    sharpening and cortical thickness (v3), atrophy, lesions (v2)."""

    atrophy: float  # fraction of cortical GM bordering CSF that becomes CSF
    lesions: Lesions | None
    sharpness: float = 1.0  # world v3: power applied to the brain tissue fractions (1: the template's blur)
    thickness: SmoothField | None = None  # world v3: > 0 grows cortical GM into WM, < 0 shrinks it
    segmentation: Segmentation | None = None  # world v4

    def apply(self, anatomy: RenderedAnatomy) -> RenderedAnatomy:
        f = anatomy.fractions.copy()
        if self.segmentation is not None:
            f = self.segmentation.apply(anatomy, f)
        wm, gm, csf, lesion = (TISSUES.index(n) for n in ("wm", "gm", "csf", "lesion"))
        if self.sharpness != 1:
            total = f[BRAIN_TISSUES].sum(axis=0)
            powered = np.clip(f[BRAIN_TISSUES] / np.maximum(total, 1e-6), 0, 1) ** np.float32(self.sharpness)
            f[BRAIN_TISSUES] = powered * (total / np.maximum(powered.sum(axis=0), 1e-12))
        if self.thickness is not None:
            t = np.clip(self.thickness(anatomy.template_mm)[0], -0.5, 0.5)
            grown = np.clip(t, 0, None) * np.clip(4.0 * f[gm], 0, 1) * f[wm]
            shrunk = np.clip(-t, 0, None) * np.clip(4.0 * f[wm], 0, 1) * f[gm]
            f[wm] += shrunk - grown
            f[gm] += grown - shrunk
        if self.atrophy > 0:
            # GM that shares its voxel with CSF (the cortical surface, sulci) loses tissue to CSF.
            border = np.clip(4.0 * f[csf], 0, 1)
            lost = self.atrophy * border * f[gm]
            f[gm] -= lost
            f[csf] += lost
        if self.lesions is not None:
            carved = self.lesions.fraction(anatomy.template_mm) * f[wm]
            f[wm] -= carved
            f[lesion] += carved
        return replace(anatomy, fractions=f)


@dataclass(frozen=True)
class VentricleWarp(Warp):
    """A :class:`Warp` whose template points are also pulled toward the ventricles (enlarging them)."""

    strength: float = 0.0

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        p = super().to_template(points_mm)
        c = VENTRICLE_CENTRE_MNI.astype(np.float32)[:, None]
        d = p - c
        pull = self.strength * np.exp(-(d**2).sum(axis=0) / (2 * VENTRICLE_SIGMA_MM**2))
        return (p - pull * d).astype(np.float32)


@dataclass(frozen=True)
class FoldWarp(VentricleWarp):
    """A :class:`VentricleWarp` plus a fold-scale displacement (template mm) that moves sulci and gyri."""

    folds: SmoothField | None = None

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        p = super().to_template(points_mm)
        return p if self.folds is None else (p + self.folds(p)).astype(np.float32)


@dataclass(frozen=True)
class WorldDraw:
    """Everything world v2 draws for one subject beyond v1's draw."""

    field_strength_t: float
    protocol: MprageProtocol
    tissues: TissueModel
    warp: Warp
    changes: AnatomyChanges
    bias: SmoothField
    mprage_snr: float
    mrf_snr: float
    orientation: Orientation
    pixel_mm: float
    slice_mm: float
    matrix: tuple[int, int, int]
    oblique_deg: float


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def t2_priors(field_t: float) -> dict[str, tuple[float, float]]:
    """World v2's uniform T2 priors (ms) per tissue at ``field_t`` (:data:`T2_RANGES_MS`)."""
    return T2_RANGES_MS[3.0 if field_t > 2 else 1.5]


def draw_tissue_values(rng: np.random.Generator, field_t: float) -> dict[str, TissueValues]:
    """Subject-mean tissue values from the field-specific priors of the module docstring."""
    three = field_t > 2
    while True:
        wm_t1 = _u(rng, 750, 1100) if three else _u(rng, 560, 820)
        gm_t1 = _u(rng, 1200, 1800) if three else _u(rng, 1000, 1450)
        if 1.35 <= gm_t1 / wm_t1 <= (1.95 if three else 2.1):
            break
    t2 = t2_priors(field_t)
    wm_t2 = _u(rng, *t2["wm"])
    gm_t2 = _u(rng, *t2["gm"])
    wm = TissueValues(wm_t1, wm_t2, _u(rng, 0.64, 0.74))
    return {
        "wm": wm,
        "gm": TissueValues(gm_t1, gm_t2, _u(rng, 0.76, 0.86)),
        "deep_gm": TissueValues(wm_t1 + _u(rng, 0.25, 0.75) * (gm_t1 - wm_t1), _u(rng, *t2["deep_gm"]),
                                _u(rng, 0.74, 0.84)),
        "csf": TissueValues(_u(rng, 3300, 4500), _u(rng, *t2["csf"]), 1.0),
        "scalp": TissueValues(_u(rng, 300, 450) if three else _u(rng, 230, 350), _u(rng, *t2["scalp"]),
                              _u(rng, 0.8, 1.0)),
        "lesion": TissueValues(wm_t1 * _u(rng, 1.2, 2.0), wm_t2 * _u(rng, *LESION_T2_FACTOR),
                               min(1.0, wm.pd * _u(rng, 1.03, 1.2))),
    }


def scale_grey_t2(model: TissueModel, factor: float) -> TissueModel:
    """``model`` with cortical grey matter's T2 multiplied by ``factor`` (``--grey-t2-scale``: the prior
    U(lo, hi) becomes U(factor lo, factor hi); everything else, its within-tissue field included, unchanged)."""
    gm = model.values["gm"]
    return replace(model, values={**model.values, "gm": replace(gm, t2_ms=gm.t2_ms * factor)})


def remap_csf_t2(model: TissueModel, field_t: float, csf_t2_range: tuple[float, float]) -> TissueModel:
    """``model`` with CSF's drawn T2 carried to the same quantile of U(``csf_t2_range``) (``--csf-t2-range``:
    the prior U(500, 2000) ms becomes that range; everything else, CSF's T2 field amplitude included,
    unchanged)."""
    lo, hi = t2_priors(field_t)["csf"]
    new_lo, new_hi = csf_t2_range
    csf = model.values["csf"]
    t2 = new_lo + (csf.t2_ms - lo) * (new_hi - new_lo) / (hi - lo)
    return replace(model, values={**model.values, "csf": replace(csf, t2_ms=t2)})


def expected_t2_target(model: TissueModel, field_t: float, grey_t2_scale: float = 1.0,
                       csf_t2_range: tuple[float, float] | None = None) -> TissueModel:
    """The tissue model of an MRF training target that keeps only what an MPRAGE can show (``--mrf-target
    expected``): every tissue's T2 at its prior mean for ``field_t`` (no within-subject T2 field) and the
    partial-volume mix at the prior mean lambda = 0.5, so the signal is that mix's expectation (it is linear
    in lambda); T1, PD and anatomy stay the subject's. The subject's own T2 and exchange are drawn
    independently of everything the MPRAGE shows, so the optimum of a squared-error loss is the same; the
    target just loses that noise. Plug-in: the signal at the mean T2, not the mean signal (their matched T2
    differ by up to 1.1 % for the GM and WM priors; CSF's and lesions' wider priors were not checked).
    ``grey_t2_scale`` and ``csf_t2_range`` move grey matter's and CSF's prior means as ``--grey-t2-scale`` and
    ``--csf-t2-range`` move their priors."""
    if model.modulation is None:
        raise ValueError("expected_t2_target: a world v2-v4 tissue model (with per-tissue modulation) is needed")
    t2 = t2_priors(field_t)
    mean = {name: (lo + hi) / 2 for name, (lo, hi) in t2.items()}
    mean["gm"] *= grey_t2_scale
    if csf_t2_range is not None:
        mean["csf"] = sum(csf_t2_range) / 2
    mean["lesion"] = mean["wm"] * sum(LESION_T2_FACTOR) / 2
    values = {name: replace(v, t2_ms=mean[name]) for name, v in model.values.items()}
    modulation = {name: (a1, 0.0, ap) for name, (a1, _, ap) in model.modulation.items()}
    return replace(model, values=values, modulation=modulation, exchange=EXPECTED_EXCHANGE)


def draw_protocol(rng: np.random.Generator, field_t: float) -> MprageProtocol:
    """An MPRAGE-family protocol from the ranges of the module docstring (always physically valid)."""
    family = Family(rng.choice([f.value for f in Family], p=[0.5, 0.25, 0.25]))
    etl = int(rng.integers(150, 257))
    efficiency, t2star = _u(rng, 0.8, 1.0), _u(rng, 0.5, 0.95)
    if family is Family.MPRAGE:
        spacing, flip, te = _u(rng, 6, 8.5), _u(rng, 7, 12), _u(rng, 2.2, 4.0)
        centre = int(etl * _u(rng, 0.35, 0.55))
        ti = max(_u(rng, 750, 1150), centre * spacing + 20)
        shot = max(_u(rng, 1800, 2700), ti - centre * spacing + etl * spacing + 50)
        omit = False
    elif family is Family.IR_FSPGR:
        spacing, flip, te = _u(rng, 6, 9), _u(rng, 10, 13), _u(rng, 2.2, 3.5)
        centre = int(etl * _u(rng, 0.0, 0.5))
        prep = _u(rng, 400, 650)
        ti = prep + centre * spacing
        shot = prep + etl * spacing + _u(rng, 0, 600)
        omit = False
    else:
        spacing, flip, te = _u(rng, 6.5, 9), _u(rng, 7, 10), _u(rng, 3.0, 4.6)
        centre = int(etl * _u(rng, 0.35, 0.55))
        ti = max(_u(rng, 700, 1100), centre * spacing + 20)
        shot = max(_u(rng, 2000, 3000), ti - centre * spacing + etl * spacing + 50)
        omit = bool(rng.random() < 0.5)
    return MprageProtocol(tr_ms=round(shot, 1), ti_ms=round(ti, 1), te_ms=round(te, 2), flip_angle_deg=round(flip, 1),
                          echo_spacing_ms=round(spacing, 2), echo_train_length=etl, centre_echo=centre,
                          inversion_efficiency=efficiency, family=family, field_strength_t=field_t,
                          t2star_factor=t2star, header_omits_ti=omit)


def _lesions(rng: np.random.Generator, template: Template) -> Lesions:
    wm_index = np.argwhere(template.fractions[TISSUES.index("wm")] > 0.9)
    points = template.affine[:3, :3] @ wm_index.T + template.affine[:3, 3:]
    near = np.linalg.norm(points - VENTRICLE_CENTRE_MNI[:, None], axis=0) < 25
    n = int(rng.integers(1, 16))
    centres = []
    for _ in range(n):
        pool = np.flatnonzero(near) if rng.random() < 0.5 and near.any() else np.arange(points.shape[1])
        centres.append(points[:, int(rng.choice(pool))])
    return Lesions(np.array(centres), rng.uniform(2, 8, size=n))


def draw_world(rng: np.random.Generator, template: Template) -> WorldDraw:
    """World v2's draw for one subject (its own stream, so v1 draws of a seed stay as they were)."""
    field_t = 3.0 if rng.random() < 0.6 else 1.5
    values = draw_tissue_values(rng, field_t)
    modulation = {name: (_u(rng, 0.02, 0.08), _u(rng, 0.02, 0.08), _u(rng, 0.01, 0.03)) for name in TISSUES}
    modulation["csf"] = (0.02, _u(rng, 0.05, 0.15), 0.0)
    kind = int(rng.integers(3))
    exchange = (0.0, 1.0, _u(rng, 0, 1))[kind]
    fields = [random_smooth_field(rng, components=1, centre_mm=template.centre_mm, extent_mm=260.0,
                                  correlation_mm=25.0, sd=1.0) for _ in range(2)]
    tissues = TissueModel(values, fields[0], fields[1], exchange=exchange, modulation=modulation)
    size = _u(rng, 0.88, 1.12)
    base = random_warp(rng, template, scale_sd=0.05, displacement_sd_mm=_u(rng, 1.5, 3.5))
    warp = VentricleWarp(base.rotation, base.scale * size, base.translation_mm, base.displacement, base.centre_mm,
                         strength=_u(rng, 0, 0.3) if rng.random() < 0.5 else 0.0)
    atrophy = _u(rng, 0, 0.4) if rng.random() < 0.5 else 0.0
    lesions = _lesions(rng, template) if rng.random() < 0.5 else None
    bias = random_smooth_field(rng, components=1, centre_mm=np.zeros(3), extent_mm=300.0,
                               correlation_mm=_u(rng, 50, 120), sd=_u(rng, 0.05, 0.35), spacing_mm=15.0)
    orientation = Orientation(rng.choice(["sagittal", "axial", "coronal", "oblique"], p=[0.45, 0.2, 0.2, 0.15]))
    pixel, thick = _u(rng, 0.9, 1.3), _u(rng, 0.9, 1.5)
    fov, extent = _u(rng, 240, 256), _u(rng, 170, 190)
    matrix = (int(round(fov / pixel)), int(round(fov / pixel)), int(round(extent / thick)))
    return WorldDraw(field_t, draw_protocol(rng, field_t), tissues, warp, AnatomyChanges(atrophy, lesions), bias,
                     _u(rng, 12, 45), _u(rng, 25, 60), orientation, pixel, thick, matrix, _u(rng, -15, 15))


def individualise(rng: np.random.Generator, template: Template, draw: WorldDraw) -> WorldDraw:
    """World v3: ``draw`` (a v2 draw) with the individual cortex of the module docstring."""
    sharpness = _u(rng, 1, 2.5) if rng.random() < 0.8 else 1.0
    folds = random_smooth_field(rng, components=3, centre_mm=template.centre_mm, extent_mm=260.0,
                                correlation_mm=_u(rng, 5, 10), sd=_u(rng, 0.5, 2.0), spacing_mm=2.5)
    thickness = random_smooth_field(rng, components=1, centre_mm=template.centre_mm, extent_mm=260.0,
                                    correlation_mm=20.0, sd=_u(rng, 0.0, 0.4))
    w = draw.warp
    strength = w.strength if isinstance(w, VentricleWarp) else 0.0
    warp = FoldWarp(w.rotation, w.scale, w.translation_mm, w.displacement, w.centre_mm, strength=strength,
                    folds=folds)
    changes = replace(draw.changes, atrophy=min(1.0, draw.changes.atrophy + _u(rng, 0, 0.25)), sharpness=sharpness,
                      thickness=thickness)
    return replace(draw, warp=warp, changes=changes)


def resegment(rng: np.random.Generator, template: Template, draw: WorldDraw) -> WorldDraw:
    """World v4: ``draw`` (a v3 draw) with the individual segmentation of the module docstring."""
    offset = random_smooth_field(rng, components=1, centre_mm=template.centre_mm, extent_mm=260.0,
                                 correlation_mm=15.0, sd=_u(rng, 0.5, 1.5), spacing_mm=4.0)
    segmentation = Segmentation(weight=_u(rng, 0.5, 1.0), offset=offset, blur_mm=_u(rng, 0.3, 0.8))
    return replace(draw, changes=replace(draw.changes, segmentation=segmentation))
