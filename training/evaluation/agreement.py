"""Agreement of paired regional values: Lin's CCC, mean difference and SD ratio with a clustered bootstrap.

Pairs are (reference, other) regional values laid out as ``(n_subjects, n_regions)`` arrays; NaN marks
a region missing in a subject. Subjects are the clusters: a resample draws subjects with replacement
and takes all of their regions. Each statistic is a function of per-subject sums (count, sums, sums of
squares and products), so the resamples are one matrix product of resample counts and those sums.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Columns of the per-subject sums.
_N, _SX, _SY, _SXX, _SYY, _SXY, _NR, _SR = range(8)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Agreement:
    """Agreement of reference and other regional values (difference = reference - other).

    ``sd_difference`` is the sample SD of the pairwise differences (Bland-Altman limits: mean
    difference +- 1.96 SD); ``sd_ratio`` is the mean over pairs of reference SD / other SD (None when
    no SDs were given).
    """

    n_subjects: int
    n_pairs: int
    ccc: Estimate
    mean_difference: Estimate
    sd_difference: float
    sd_ratio: Estimate | None

    @property
    def limits_of_agreement(self) -> tuple[float, float]:
        """Bland-Altman 95 % limits of agreement: mean difference -+ 1.96 SD of the differences."""
        d, s = self.mean_difference.value, self.sd_difference
        return d - 1.96 * s, d + 1.96 * s


def _as_matrix(name: str, values: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name}: must be 2-D (subjects, regions), got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name}: shape {array.shape} differs from reference {shape}")
    return array


def _cluster_sums(reference: np.ndarray, other: np.ndarray, reference_sd: np.ndarray | None,
                  other_sd: np.ndarray | None) -> np.ndarray:
    """Per-subject sums (n_subjects, 8) over valid pairs, values shifted by a common constant."""
    valid = np.isfinite(reference) & np.isfinite(other)
    if not valid.any():
        raise ValueError("reference, other: no pair where both are finite")
    shift = 0.5 * (reference[valid].mean() + other[valid].mean())  # CCC and differences are shift-invariant
    x = np.where(valid, reference - shift, 0.0)
    y = np.where(valid, other - shift, 0.0)
    sums = np.zeros((reference.shape[0], 8))
    sums[:, _N] = valid.sum(axis=1)
    sums[:, _SX], sums[:, _SY] = x.sum(axis=1), y.sum(axis=1)
    sums[:, _SXX], sums[:, _SYY], sums[:, _SXY] = (x * x).sum(axis=1), (y * y).sum(axis=1), (x * y).sum(axis=1)
    if reference_sd is not None and other_sd is not None:
        ok = valid & np.isfinite(reference_sd) & np.isfinite(other_sd) & (other_sd > 0)
        sums[:, _NR] = ok.sum(axis=1)
        sums[:, _SR] = np.where(ok, reference_sd / np.where(ok, other_sd, 1.0), 0.0).sum(axis=1)
    return sums


def _statistics(weights: np.ndarray, sums: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics for each row of cluster ``weights`` (m, n_subjects); NaN where undefined."""
    total = weights @ sums
    with np.errstate(invalid="ignore", divide="ignore"):
        n = total[:, _N]
        mx, my = total[:, _SX] / n, total[:, _SY] / n
        sxx = total[:, _SXX] / n - mx * mx
        syy = total[:, _SYY] / n - my * my
        sxy = total[:, _SXY] / n - mx * my
        ccc = 2 * sxy / (sxx + syy + (mx - my) ** 2)
        var_d = np.maximum(sxx + syy - 2 * sxy, 0.0) * n / (n - 1)
        sd_ratio = total[:, _SR] / total[:, _NR]
    return {"ccc": ccc, "mean_difference": mx - my, "sd_difference": np.sqrt(var_d), "sd_ratio": sd_ratio}


def lin_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's (1989) concordance correlation coefficient with population (1/n) moments.

    CCC = 2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2). NaN when undefined (x and y both constant
    and equal, 0/0); 0 when only one of them is constant.
    """
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.ndim != 1:
        raise ValueError(f"x: must be 1-D, got shape {xa.shape}")
    if ya.shape != xa.shape:
        raise ValueError(f"y: shape {ya.shape} differs from x {xa.shape}")
    if xa.size < 2:
        raise ValueError(f"x: need at least 2 pairs, got {xa.size}")
    if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
        raise ValueError("x, y: must be finite")
    sums = _cluster_sums(xa[None, :], ya[None, :], None, None)
    return float(_statistics(np.ones((1, 1)), sums)["ccc"][0])


def bootstrap_counts(n_clusters: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """How often each cluster is drawn in each resample: (n_boot, n_clusters) ints, rows sum to n_clusters."""
    if n_clusters < 1:
        raise ValueError(f"n_clusters: must be >= 1, got {n_clusters}")
    if n_boot < 1:
        raise ValueError(f"n_boot: must be >= 1, got {n_boot}")
    draws = rng.integers(0, n_clusters, size=(n_boot, n_clusters))
    flat = (draws + n_clusters * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def _prepare(reference: np.ndarray, other: np.ndarray, reference_sd: np.ndarray | None,
             other_sd: np.ndarray | None) -> np.ndarray:
    ref = _as_matrix("reference", reference)
    oth = _as_matrix("other", other, ref.shape)
    if (reference_sd is None) != (other_sd is None):
        raise ValueError("reference_sd, other_sd: give both or neither")
    ref_sd = None if reference_sd is None else _as_matrix("reference_sd", reference_sd, ref.shape)
    oth_sd = None if other_sd is None else _as_matrix("other_sd", other_sd, ref.shape)
    sums = _cluster_sums(ref, oth, ref_sd, oth_sd)
    return sums[sums[:, _N] > 0]  # subjects without a valid pair take no part


def resample_statistics(reference: np.ndarray, other: np.ndarray, *, reference_sd: np.ndarray | None = None,
                        other_sd: np.ndarray | None = None, n_boot: int = 10_000,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Clustered-bootstrap distributions (n_boot each) of ``ccc``, ``mean_difference``, ``sd_difference``
    and ``sd_ratio``. The resamples depend only on (seed, number of subjects with data)."""
    return _bootstrap(_prepare(reference, other, reference_sd, other_sd), n_boot, seed)


def _bootstrap(sums: np.ndarray, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    counts = bootstrap_counts(sums.shape[0], n_boot, np.random.default_rng(seed))
    return _statistics(counts.astype(np.float64), sums)


def _interval(name: str, samples: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < samples.size:
        logger.warning("%s: %d of %d resamples undefined, left out of the interval", name,
                       samples.size - finite.size, samples.size)
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 50 * (1 - confidence)
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def agreement(reference: np.ndarray, other: np.ndarray, *, reference_sd: np.ndarray | None = None,
              other_sd: np.ndarray | None = None, n_boot: int = 10_000, seed: int = 0,
              confidence: float = 0.95) -> Agreement:
    """CCC, mean difference (reference - other) and SD ratio of regional values, with percentile
    intervals from a clustered bootstrap (subjects resampled with replacement, all their regions kept).

    ``reference``, ``other`` (and the optional regional SDs): (n_subjects, n_regions), NaN = missing.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    sums = _prepare(reference, other, reference_sd, other_sd)
    point = {k: float(v[0]) for k, v in _statistics(np.ones((1, sums.shape[0])), sums).items()}
    boot = _bootstrap(sums, n_boot, seed)

    def estimate(key: str) -> Estimate:
        return Estimate(point[key], *_interval(key, boot[key], confidence))

    has_sd = reference_sd is not None and sums[:, _NR].sum() > 0
    return Agreement(n_subjects=int(sums.shape[0]), n_pairs=int(sums[:, _N].sum()), ccc=estimate("ccc"),
                     mean_difference=estimate("mean_difference"), sd_difference=point["sd_difference"],
                     sd_ratio=estimate("sd_ratio") if has_sd else None)
