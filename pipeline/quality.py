"""How well each voxel's synthesised MRF signal fits the dictionary, and a per-study verdict.

Quality measure. The match score is the normalised inner product NIP = |<a/|a|, d/|d|>| of the voxel's
coefficients d and the best atom a, i.e. cos(theta) with theta the misfit angle between the signal and
the dictionary manifold. NIP is close to 1 for almost any vector near the dictionary's cone, so it is
rescaled against a tolerance angle ``TOLERANCE_DEG`` (15 degrees, 1 - cos = 0.0341):

    Q = clip(1 - (1 - NIP) / (1 - cos 15 deg), 0, 1)  ~  1 - (theta / 15 deg)^2

Q = 1: the signal lies on the manifold; Q = 0.5: theta is 10.6 degrees; Q = 0: 15 degrees or more.

Measured (rank-4 dictionary of the default sequence, 4,000 voxels per row; "1-NIP" median / worst 1 %):

- Simulated tissue (``simulate_coefficients`` + ``add_complex_noise``, sigma = |SV1| of WM / SNR, as the
  phantom defines SNR): WM, cortical GM, deep GM, CSF at SNR 30: 1.8e-3 / 6.8e-3, 1.7e-3 / 6.6e-3,
  2.0e-3 / 7.2e-3, 0.7e-3 / 2.9e-3 (median Q 0.94-0.98, worst 1 % Q about 0.79); at SNR 20: WM 3.9e-3 /
  1.5e-2, deep GM 4.3e-3 / 1.7e-2 (median Q 0.87); at SNR 60: WM 4.6e-4 / 1.8e-3. Noise-free partial volume:
  WM/GM mixtures <= 2e-5, GM/CSF <= 2.5e-3, WM/CSF <= 7.1e-3 (Q >= 0.79).
- The shipped model on an in-distribution phantom MPRAGE (seed 21; 2.07 M voxels in the brain mask):
  1-NIP median 6.8e-5, 99th percentile 6.8e-3, 99.9th 1.5e-2; median Q 0.998, 0.09 % of voxels with
  Q < 0.5, 0.19 % at the dictionary's T1/T2 bounds (CSF at T1 4946 ms or T2 2998 ms). The same brain
  given as implausible input: contrast inverted (1 - intensity in the mask): median Q 0.882, 4.3 % with
  Q < 0.5, 0.19 % at bounds; contrast compressed (intensity cubed): median Q 0.963, 8.1 % with Q < 0.5,
  9.9 % at bounds. The study limits below flag both and leave a 20-fold margin to the phantom.
- Implausible vectors: complex Gaussian 1-NIP median 0.28 (>= 95 % have Q = 0); real Gaussian median
  0.21 (5 % reach 1-NIP < 0.011: the dictionary's cone is wide); two random atoms mixed 30-70 %: median
  3.2e-4 but worst 5 % 1.7e-2; tissue with SV2..SV4 multiplied by i: 2.5e-2 (WM) to 0.16 (CSF), Q <= 0.26.
  A single channel's sign flipped is often not detectable: WM SV3 4.6e-5, WM SV2 5.8e-4, WM SV4 1.6e-2,
  CSF SV2 0.22.

Q tests physical consistency only: a network can synthesise a plausible signal for the wrong tissue, so a
high Q does not prove the maps right, while a low Q shows they cannot be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.mrf.dictionary import Grid
from pipeline.mrf.matching import Matcher

TOLERANCE_DEG = 15.0
TOLERANCE = float(1.0 - np.cos(np.deg2rad(TOLERANCE_DEG)))  # on 1 - NIP
LOW_QUALITY = 0.5  # a voxel with Q below this (misfit > 10.6 degrees) counts as poorly fitted
# Study limits, between the shipped model's output for an in-distribution phantom and for implausible inputs
# (module docstring). Calibrated on phantoms only: revisit with the first real studies.
MIN_MEDIAN_QUALITY = 0.95
MAX_LOW_FRACTION = 0.02
MAX_BOUND_FRACTION = 0.05
DEFAULT_GRID = Grid()  # the dictionaries' default (T1 100-5000 ms, T2 10-3000 ms)


def quality_from_score(score: np.ndarray) -> np.ndarray:
    """Q in [0, 1] (float32) of match scores (NIP in [0, 1]); see the module docstring."""
    return np.clip(1.0 - (1.0 - np.asarray(score, np.float64)) / TOLERANCE, 0.0, 1.0).astype(np.float32)


def quality_map(score_volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Q of a volume of match scores, zero outside ``mask``."""
    if score_volume.shape != mask.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match the scores {score_volume.shape}")
    return np.where(mask, quality_from_score(score_volume), np.float32(0.0))


def match_volume_with_quality(coeffs: np.ndarray, mask: np.ndarray, matcher: Matcher) -> dict[str, np.ndarray]:
    """T1, T2 (ms), PD and Q maps of a coefficient volume (X, Y, Z, K), or of the coefficients of ``mask``'s
    voxels in C order (V, K), which spares building the whole volume; zero outside ``mask``.

    The same matching as :func:`pipeline.mrf.matching.match_volume`, keeping each voxel's score.
    """
    voxels = coeffs.ndim == 2 and coeffs.shape[0] == int(np.count_nonzero(mask))
    if not voxels and mask.shape != coeffs.shape[:-1]:
        raise ValueError(f"mask: shape {mask.shape} does not match coefficients {coeffs.shape[:-1]}")
    k = matcher.dictionary.rank
    if coeffs.shape[-1] < k:
        raise ValueError(f"coeffs: {coeffs.shape[-1]} components, dictionary needs {k}")
    result = matcher.match((coeffs if voxels else coeffs[mask])[:, :k])
    maps = {}
    for name, values in (("T1", result.t1_ms), ("T2", result.t2_ms), ("PD", result.pd),
                         ("Q", quality_from_score(result.score))):
        out = np.zeros(mask.shape, dtype=np.float32)
        out[mask] = values
        maps[name] = out
    return maps


def at_grid_bounds(t1: np.ndarray, t2: np.ndarray, grid: Grid = DEFAULT_GRID) -> np.ndarray:
    """Where matched T1 or T2 sits on the first or last value of ``grid``'s axis (within half a step)."""
    half = 1.0 + grid.step / 2
    t1_axis, t2_axis = grid.t1_axis(), grid.t2_axis()
    return ((t1 <= t1_axis[0] * half) | (t1 >= t1_axis[-1] / half)
            | (t2 <= t2_axis[0] * half) | (t2 >= t2_axis[-1] / half))


@dataclass(frozen=True)
class StudyVerdict:
    """Whether a study's maps can be trusted as far as this node can tell, and why not."""

    ok: bool
    reasons: list[str]  # human-readable, each naming the measure and its limit
    median_quality: float  # in the brain mask
    low_quality_fraction: float  # brain voxels with Q < LOW_QUALITY
    bound_fraction: float  # brain voxels with T1 or T2 on the dictionary grid's bounds
    protocol_reasons: list[str]  # the input protocol outside the model's training

    def summary(self) -> str:
        """One line for the QC figure."""
        head = "OK" if self.ok else "FLAGGED: " + "; ".join(self.reasons)
        return f"{head} | median Q {self.median_quality:.3f}, Q<{LOW_QUALITY:g} {self.low_quality_fraction:.1%}, " \
               f"at T1/T2 bounds {self.bound_fraction:.1%}"

    def to_dict(self) -> dict[str, object]:
        """For provenance.json: the numbers, the verdict and the limits it used."""
        doc = asdict(self)
        for key in ("median_quality", "low_quality_fraction", "bound_fraction"):
            doc[key] = round(float(doc[key]), 5)
        doc["limits"] = {"quality": f"clip(1 - (1 - NIP) / (1 - cos {TOLERANCE_DEG:g} deg), 0, 1)",
                         "low_quality": LOW_QUALITY, "min_median_quality": MIN_MEDIAN_QUALITY,
                         "max_low_quality_fraction": MAX_LOW_FRACTION, "max_bound_fraction": MAX_BOUND_FRACTION}
        return doc


def study_verdict(quality: np.ndarray, mask: np.ndarray, t1: np.ndarray, t2: np.ndarray, *,
                  protocol_reasons: list[str], grid: Grid = DEFAULT_GRID) -> StudyVerdict:
    """The verdict for one study from its Q, T1 and T2 maps (same shape as ``mask``) and the input
    protocol's out-of-range reasons (:func:`pipeline.protocol.out_of_range`); ``grid``: the dictionary's."""
    for name, volume in (("quality", quality), ("t1", t1), ("t2", t2)):
        if volume.shape != mask.shape:
            raise ValueError(f"{name}: shape {volume.shape} does not match the mask {mask.shape}")
    inside = mask.astype(bool)
    if not inside.any():
        raise ValueError("mask: empty, no brain voxels to judge")
    q = quality[inside]
    median = float(np.median(q))
    low = float(np.mean(q < LOW_QUALITY))
    bounds = float(np.mean(at_grid_bounds(t1[inside], t2[inside], grid)))
    reasons = []
    if median < MIN_MEDIAN_QUALITY:
        reasons.append(f"median match quality {median:.2f} in the brain (expected >= {MIN_MEDIAN_QUALITY:g})")
    if low > MAX_LOW_FRACTION:
        reasons.append(f"{low:.1%} of brain voxels with match quality < {LOW_QUALITY:g} "
                       f"(expected <= {MAX_LOW_FRACTION:.0%})")
    if bounds > MAX_BOUND_FRACTION:
        reasons.append(f"{bounds:.1%} of brain voxels at the dictionary's T1/T2 bounds "
                       f"(expected <= {MAX_BOUND_FRACTION:.0%})")
    reasons += [f"protocol: {r}" for r in protocol_reasons]
    return StudyVerdict(not reasons, reasons, median, low, bounds, list(protocol_reasons))
