"""Lin's CCC against hand computation and a second formulation; the clustered bootstrap against known cases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from training.evaluation.agreement import agreement, bootstrap_counts, lin_ccc, resample_statistics

# Worked by hand, population (1/n) moments as in Lin (1989):
#   x = [1, 2, 3, 4], y = [2, 3, 3, 5]
#   mean_x = 2.5, mean_y = 3.25
#   s_x^2  = (2.25 + 0.25 + 0.25 + 2.25) / 4            = 1.25
#   s_y^2  = (1.5625 + 0.0625 + 0.0625 + 3.0625) / 4    = 1.1875
#   s_xy   = (1.875 + 0.125 - 0.125 + 2.625) / 4        = 1.125
#   (mean_x - mean_y)^2                                 = 0.5625
#   CCC    = 2 * 1.125 / (1.25 + 1.1875 + 0.5625) = 2.25 / 3 = 0.75
HAND_X = [1.0, 2.0, 3.0, 4.0]
HAND_Y = [2.0, 3.0, 3.0, 5.0]
HAND_CCC = 0.75


def ccc_from_pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's second form: CCC = r * C_b, C_b = 2 / (v + 1/v + u^2), v = s_x/s_y, u = (mu_x - mu_y)/sqrt(s_x s_y)."""
    r = np.corrcoef(x, y)[0, 1]
    sx, sy = np.std(x), np.std(y)
    v = sx / sy
    u = (np.mean(x) - np.mean(y)) / np.sqrt(sx * sy)
    return float(r * 2 / (v + 1 / v + u**2))


def test_ccc_hand_example() -> None:
    assert lin_ccc(np.array(HAND_X), np.array(HAND_Y)) == pytest.approx(HAND_CCC, abs=1e-12)


def test_ccc_matches_pearson_times_bias_correction() -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.normal(1000, 300, 60)
        y = 0.9 * x + 40 + rng.normal(0, 120, 60)
        assert lin_ccc(x, y) == pytest.approx(ccc_from_pearson(x, y), rel=1e-10)


def test_ccc_edge_cases() -> None:
    x = np.array([800.0, 1200.0, 1500.0, 4000.0])
    assert lin_ccc(x, x) == pytest.approx(1.0, abs=1e-12)
    assert lin_ccc(x, x + 100) < 1.0  # a shift is disagreement, unlike Pearson's r
    assert lin_ccc(x, np.full(4, 1000.0)) == pytest.approx(0.0, abs=1e-12)  # one constant: s_xy = 0
    assert np.isnan(lin_ccc(np.full(4, 7.0), np.full(4, 7.0)))  # both constant and equal: 0/0, documented NaN
    with pytest.raises(ValueError, match=r"y: shape \(3,\) differs from x \(4,\)"):
        lin_ccc(x, x[:3])
    with pytest.raises(ValueError, match="x: need at least 2 pairs"):
        lin_ccc(x[:1], x[:1])
    with pytest.raises(ValueError, match="x, y: must be finite"):
        lin_ccc(x, np.array([1.0, np.nan, 2.0, 3.0]))


def test_agreement_point_estimates_pool_all_pairs() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(1000, 300, (8, 5))
    other = ref - 30 + rng.normal(0, 50, (8, 5))
    other[2, 3] = np.nan  # a region missing in one subject drops that pair only
    ok = np.isfinite(other)
    result = agreement(ref, other, n_boot=200, seed=0)
    assert result.n_pairs == 39
    assert result.n_subjects == 8
    assert result.ccc.value == pytest.approx(ccc_from_pearson(ref[ok], other[ok]), rel=1e-10)
    assert result.mean_difference.value == pytest.approx(np.mean(ref[ok] - other[ok]), rel=1e-10)
    assert result.sd_difference == pytest.approx(np.std(ref[ok] - other[ok], ddof=1), rel=1e-10)
    assert result.ccc.low <= result.ccc.value <= result.ccc.high
    assert result.sd_ratio is None


def test_sd_ratio_is_mean_of_pairwise_ratios() -> None:
    rng = np.random.default_rng(5)
    ref, other = rng.normal(1000, 200, (6, 4)), rng.normal(1000, 200, (6, 4))
    ref_sd, other_sd = rng.uniform(50, 100, (6, 4)), rng.uniform(30, 60, (6, 4))
    result = agreement(ref, other, reference_sd=ref_sd, other_sd=other_sd, n_boot=100, seed=0)
    assert result.sd_ratio is not None
    assert result.sd_ratio.value == pytest.approx(np.mean(ref_sd / other_sd), rel=1e-12)
    with pytest.raises(ValueError, match="reference_sd, other_sd: give both or neither"):
        agreement(ref, other, reference_sd=ref_sd, n_boot=10)


def test_identical_clusters_collapse_the_interval() -> None:
    # Every subject has the same regional values: any resample holds the same multiset of pairs.
    ref_row = np.array([850.0, 1450.0, 1200.0, 4100.0, 900.0])
    other_row = np.array([820.0, 1400.0, 1250.0, 3900.0, 880.0])
    ref, other = np.tile(ref_row, (10, 1)), np.tile(other_row, (10, 1))
    result = agreement(ref, other, n_boot=1000, seed=1)
    assert result.ccc.value == pytest.approx(lin_ccc(ref_row, other_row), rel=1e-12)
    for estimate in (result.ccc, result.mean_difference):
        assert estimate.low == pytest.approx(estimate.value, rel=1e-9)
        assert estimate.high == pytest.approx(estimate.value, rel=1e-9)


def test_bootstrap_se_of_mean_difference_matches_clustered_analytic_se() -> None:
    # 40 iid subjects x 20 regions, differences = subject effect (SD 20) + region noise (SD 30). All subjects
    # have all regions, so the mean difference is the mean of the subject means d_i and its SE is
    # sd(d_i) / sqrt(n_subjects). An iid-pairs SE (sd of all differences / sqrt(800)) is far smaller.
    rng = np.random.default_rng(6)
    n_subjects, n_regions = 40, 20
    ref = rng.normal(1000, 300, (n_subjects, n_regions))
    diff = rng.normal(0, 20, (n_subjects, 1)) + rng.normal(0, 30, (n_subjects, n_regions))
    samples = resample_statistics(ref, ref - diff, n_boot=10_000, seed=7)["mean_difference"]
    analytic = np.std(diff.mean(axis=1), ddof=1) / np.sqrt(n_subjects)
    naive = np.std(diff, ddof=1) / np.sqrt(diff.size)
    assert np.std(samples) == pytest.approx(analytic, rel=0.10)
    assert np.std(samples) > 1.5 * naive
    assert np.mean(samples) == pytest.approx(diff.mean(), abs=0.1 * analytic)


def test_bootstrap_is_seeded() -> None:
    rng = np.random.default_rng(8)
    ref = rng.normal(1000, 300, (12, 6))
    other = ref + rng.normal(0, 60, (12, 6))
    a = agreement(ref, other, n_boot=500, seed=11)
    assert a == agreement(ref, other, n_boot=500, seed=11)
    assert a.ccc.low != agreement(ref, other, n_boot=500, seed=12).ccc.low


def test_bootstrap_counts_rows_are_resamples() -> None:
    counts = bootstrap_counts(7, 300, np.random.default_rng(0))
    assert counts.shape == (300, 7)
    assert (counts.sum(axis=1) == 7).all()
    assert counts.min() >= 0
    with pytest.raises(ValueError, match="n_boot: must be >= 1, got 0"):
        bootstrap_counts(7, 0, np.random.default_rng(0))


def test_agreement_rejects_bad_input() -> None:
    ref = np.ones((3, 4))
    with pytest.raises(ValueError, match=r"other: shape \(3, 3\) differs from reference \(3, 4\)"):
        agreement(ref, np.ones((3, 3)), n_boot=10)
    with pytest.raises(ValueError, match=r"reference: must be 2-D \(subjects, regions\), got shape \(4,\)"):
        agreement(np.ones(4), np.ones(4), n_boot=10)
    with pytest.raises(ValueError, match="confidence: must be in"):
        agreement(ref, ref, n_boot=10, confidence=95)
    with pytest.raises(ValueError, match="reference, other: no pair where both are finite"):
        agreement(np.full((3, 4), np.nan), ref, n_boot=10)


def test_bootstrap_speed_paper_size() -> None:
    # 35 subjects x 47 regions, 10,000 resamples: the brief asks for well under 1-2 s; allow slack on shared cores.
    rng = np.random.default_rng(9)
    ref = rng.normal(1000, 300, (35, 47))
    other = ref + rng.normal(0, 80, (35, 47))
    sds = rng.uniform(50, 100, (2, 35, 47))
    start = time.perf_counter()
    agreement(ref, other, reference_sd=sds[0], other_sd=sds[1], n_boot=10_000, seed=0)
    assert time.perf_counter() - start < 2.0
