"""Tissue relaxation times and proton densities: literature priors, per-subject draws, spatial modulation.

Priors at 3 T (mean, SD; draws clipped to mean +- 2.5 SD):

- WM: T1 850 ms, T2 75 ms (Wansapura et al. 1999, JMRI 9:531: frontal WM T1 832, T2 80; Stanisz et
  al. 2005, MRM 54:507: T2 69); PD 0.69 (water content, Neeb et al. 2006, NeuroImage 31:1156).
- Cortical GM: T1 1450 ms, T2 100 ms (Wansapura: T1 1331, T2 110; Stanisz: T1 1820, T2 99); PD 0.80
  (Neeb 2006).
- Deep GM (caudate, lentiform nucleus, thalamus): T1 1200 ms (Wansapura: putamen 1084, caudate
  1271), T2 75 ms (shortened by iron), PD 0.78.
- CSF: T1 4100 ms (Lu et al. 2005, MRM 54:1403: 4163), T2 1200 ms (SD 300, clipped to 500..2000: values
  reported at 3 T range from ~500 ms with flow to ~2000 ms), PD 1.0 (reference).
- Scalp fat: T1 380 ms, T2 133 ms (Gold et al. 2004, AJR 183:343: subcutaneous fat 371, 133), PD 0.9.

Spatial modulation: two smooth fields in template space (correlation 25 mm, unit SD) move with the
anatomy. ``g`` scales T1 and PD (water content raises both), ``h`` scales T2: value(x) = value x
exp(a x g(x)) with a per tissue (relative SD, below). Both fields are quantised to 25 levels (steps
of 0.2 SD over +-2.5 SD) so that a tissue has at most 625 distinct (T1, T2) pairs: the MRF and MPRAGE
signals are computed once per pair, not per voxel.

Ground truth at a partial-volume voxel: weights w_t = fraction_t x PD_t(x); PD = sum w_t (what the
MRF projection scale measures: the signal is linear in M0); T1 and T2 are the w-weighted *geometric*
means of the tissue values, exp(sum w_t log T_t / sum w_t). Justification: it is the first-order
(small-difference) limit of a single-compartment fit of the signal-domain mixture expanded in log T,
the natural coordinate of relaxation signals (and of the log-spaced dictionary); it lies between the
arithmetic mean of times and the fast-exchange mean of rates; it equals the tissue value in pure voxels
and is continuous (no label-shaped steps). Measured on a phantom (2 mm grid, heavy partial volume),
dictionary matching of the simulated MRF agrees with it to a median 3 % (T1) and 4 % (T2) in WM and
4 % / 7 % in cortex, where the arithmetic mean is 33 % off for cortical T2 (CSF's long T2 dominates
it). The dominant tissue of a voxel is in the label map for analyses that want pure tissue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from training.phantom.anatomy import TISSUES, RenderedAnatomy, Template
from training.phantom.fields import SmoothField, random_smooth_field

N_LEVELS = 25
LEVEL_SPAN_SD = 2.5


@dataclass(frozen=True)
class Prior:
    """Mean and SD of a tissue's T1, T2 (ms) and PD, and relative modulation amplitudes."""

    t1_ms: tuple[float, float]
    t2_ms: tuple[float, float]
    pd: tuple[float, float]
    t1_modulation: float = 0.05
    t2_modulation: float = 0.05
    pd_modulation: float = 0.02


PRIORS: dict[str, Prior] = {
    "wm": Prior((850.0, 50.0), (75.0, 5.0), (0.69, 0.03)),
    "gm": Prior((1450.0, 120.0), (100.0, 7.0), (0.80, 0.03)),
    "deep_gm": Prior((1200.0, 80.0), (75.0, 5.0), (0.78, 0.03)),
    "csf": Prior((4100.0, 120.0), (1200.0, 300.0), (1.0, 0.0), 0.02, 0.15, 0.0),
    "scalp": Prior((380.0, 20.0), (133.0, 8.0), (0.9, 0.04), 0.03, 0.03, 0.02),
}
V1_TISSUES = tuple(PRIORS)
"""The tissues world v1 draws (in this order: the draws of a seed must not change)."""
CLIP_RANGES = {"csf": {"t2_ms": (500.0, 2000.0)}}


@dataclass(frozen=True)
class TissueValues:
    """One subject's tissue values (the field-free centre of its modulation)."""

    t1_ms: float
    t2_ms: float
    pd: float


@dataclass(frozen=True)
class TissueModel:
    """A subject's tissue values and modulation fields (template space)."""

    values: dict[str, TissueValues]
    g_field: SmoothField
    h_field: SmoothField
    exchange: float = 0.0  # partial-volume model: 0 signal-domain mixing, 1 fast exchange (mixing.py)
    modulation: dict[str, tuple[float, float, float]] | None = None  # per tissue (T1, T2, PD); None: PRIORS

    def manifest(self) -> dict[str, dict[str, float]]:
        return {name: {k: round(v, 4) for k, v in asdict(val).items()} for name, val in self.values.items()}

    def level_indices(self, anatomy: RenderedAnatomy) -> tuple[np.ndarray, np.ndarray]:
        """Quantised g and h levels (uint8 in 0..N_LEVELS-1) at the anatomy's voxels."""
        out = []
        for field in (self.g_field, self.h_field):
            sd_units = field(anatomy.template_mm)[0] + LEVEL_SPAN_SD
            level = np.rint(sd_units * (N_LEVELS - 1) / (2 * LEVEL_SPAN_SD))
            out.append(np.clip(level, 0, N_LEVELS - 1).astype(np.uint8))
        return out[0], out[1]

    def level_tables(self, tissue: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """T1 and PD per g level, T2 per h level (each (N_LEVELS,) float64) for ``tissue``."""
        val = self.values[tissue]
        if self.modulation is not None:
            a1, a2, ap = self.modulation[tissue]
        else:
            prior = PRIORS.get(tissue, PRIORS["wm"])
            a1, a2, ap = prior.t1_modulation, prior.t2_modulation, prior.pd_modulation
        x = np.linspace(-LEVEL_SPAN_SD, LEVEL_SPAN_SD, N_LEVELS)
        return val.t1_ms * np.exp(a1 * x), val.t2_ms * np.exp(a2 * x), val.pd * np.exp(ap * x)


def draw_tissues(rng: np.random.Generator, template: Template) -> TissueModel:
    """Draw a subject's tissue values around :data:`PRIORS` and its modulation fields."""
    values: dict[str, TissueValues] = {}
    for name in V1_TISSUES:
        prior = PRIORS[name]
        drawn = {}
        for key in ("t1_ms", "t2_ms", "pd"):
            mean, sd = getattr(prior, key)
            lo, hi = CLIP_RANGES.get(name, {}).get(key, (mean - 2.5 * sd, mean + 2.5 * sd))
            drawn[key] = float(np.clip(rng.normal(mean, sd), lo, hi))
        values[name] = TissueValues(**drawn)
    values["lesion"] = values["wm"]  # world v1 has no lesions (zero fraction everywhere)
    fields = [random_smooth_field(rng, components=1, centre_mm=template.centre_mm, extent_mm=260.0,
                                  correlation_mm=25.0, sd=1.0) for _ in range(2)]
    return TissueModel(values, fields[0], fields[1])


def truth_maps(model: TissueModel, anatomy: RenderedAnatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth T1 (ms), T2 (ms) and PD at the anatomy's voxels (see the module docstring).

    Under a partial fast exchange (``model.exchange`` = lambda > 0) the truth moves with the signal:
    log T = (1 - lambda) x the weighted geometric mean + lambda x log of the fast-exchange value.
    """
    g, h = model.level_indices(anatomy)
    n = anatomy.index.size
    weight_sum, log_t1_sum, log_t2_sum = np.zeros(n), np.zeros(n), np.zeros(n)
    for t, name in enumerate(TISSUES):
        t1_tab, t2_tab, pd_tab = model.level_tables(name)
        w = anatomy.fractions[t] * pd_tab[g]
        weight_sum += w
        log_t1_sum += w * np.log(t1_tab)[g]
        log_t2_sum += w * np.log(t2_tab)[h]
    present = weight_sum > 0
    safe = np.where(present, weight_sum, 1)
    log_t1, log_t2 = log_t1_sum / safe, log_t2_sum / safe
    if model.exchange > 0:
        from training.phantom.mixing import fast_exchange

        _, t1_fx, t2_fx = fast_exchange(model, anatomy)
        lam = model.exchange
        log_t1 = (1 - lam) * log_t1 + lam * np.log(np.where(present, t1_fx, 1))
        log_t2 = (1 - lam) * log_t2 + lam * np.log(np.where(present, t2_fx, 1))
    t1 = np.where(present, np.exp(log_t1), 0)
    t2 = np.where(present, np.exp(log_t2), 0)
    return t1.astype(np.float32), t2.astype(np.float32), weight_sum.astype(np.float32)
