"""Match quality Q and the study verdict: Q against known misfit angles, simulated tissue against
implausible vectors, and verdicts on studies built with known fractions of poor or bounded voxels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import Dictionary, Grid
from pipeline.mrf.matching import Matcher, match_volume
from pipeline.mrf.sequence import Sequence
from pipeline.mrf.simulate import simulate_coefficients
from pipeline.qc_figure import qc_figure
from pipeline.quality import at_grid_bounds, match_volume_with_quality, quality_map, study_verdict

TISSUES = {"WM": (850.0, 75.0, 0.69), "GM": (1450.0, 100.0, 0.8), "deep GM": (1200.0, 80.0, 0.75),
           "CSF": (4100.0, 1200.0, 1.0)}  # T1, T2 (ms), PD as in the phantom


@pytest.fixture(scope="module")
def matcher(default_dictionary: Dictionary) -> Matcher:
    return Matcher(default_dictionary, device="cpu")


def _tissue(sequence: Sequence, dictionary: Dictionary, name: str, n: int) -> np.ndarray:
    t1, t2, pd = TISSUES[name]
    return simulate_coefficients(sequence, dictionary, np.full(n, t1), np.full(n, t2), np.full(n, pd), device="cpu")


def _as_volume(voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) voxels as an (N, 2, 1, K) volume whose second column is outside the mask."""
    volume = np.zeros((len(voxels), 2, 1, voxels.shape[1]), np.complex64)
    volume[:, 0, 0] = voxels
    volume[:, 1, 0] = voxels[::-1]
    mask = np.zeros(volume.shape[:-1], bool)
    mask[:, 0] = True
    return volume, mask


def test_quality_follows_the_misfit_angle(default_dictionary: Dictionary) -> None:
    """Two orthogonal atoms; voxels at angle theta from one of them, in a third direction: NIP = cos theta,
    so Q ~ 1 - (theta / 15 deg)^2, 0 from 15 degrees on, whatever the voxel's phase and scale."""
    atoms = np.eye(4, dtype=np.float32)[:2]
    tiny = Dictionary(np.array([900.0, 1500.0]), np.array([70.0, 100.0]), atoms,
                      default_dictionary.basis[:, :4], default_dictionary.singular_values, "0" * 16, Grid(), 1)
    theta = np.deg2rad(np.array([0.0, 5.0, 7.5, 10.0, 14.0, 15.0, 30.0, 60.0]))
    voxels = np.zeros((theta.size, 4), np.complex64)
    voxels[:, 1], voxels[:, 2] = np.cos(theta), np.sin(theta)
    voxels *= (3.0 * np.exp(0.7j)).astype(np.complex64)
    volume, mask = _as_volume(voxels)
    maps = match_volume_with_quality(volume, mask, Matcher(tiny, device="cpu"))
    q = maps["Q"][:, 0, 0]
    np.testing.assert_allclose(q[:5], 1 - (np.rad2deg(theta[:5]) / 15.0) ** 2, atol=0.01)
    assert q[0] == pytest.approx(1.0, abs=1e-5) and np.all(q[5:] < 1e-4)
    assert np.all(maps["T1"][:, 0, 0] == 1500.0) and np.allclose(maps["PD"][:, 0, 0], 3.0 * np.cos(theta), atol=1e-5)
    assert not np.any([m[:, 1] for m in maps.values()])  # nothing outside the mask


@pytest.mark.parametrize("name", list(TISSUES))
def test_simulated_tissue_at_snr_30_has_high_quality(default_sequence: Sequence, default_dictionary: Dictionary,
                                                     matcher: Matcher, name: str) -> None:
    """SNR as the phantom defines it: noise sigma = |SV1| of pure WM / 30, after a random coil phase."""
    rng = np.random.default_rng(3)
    n = 2000
    sigma = abs(_tissue(default_sequence, default_dictionary, "WM", 1)[0, 0]) / 30.0
    clean = _tissue(default_sequence, default_dictionary, name, n)
    noisy = phase_normalise(add_complex_noise(clean * np.exp(1j * rng.uniform(-np.pi, np.pi, (n, 1))), sigma, rng))
    volume, mask = _as_volume(noisy)
    q = match_volume_with_quality(volume, mask, matcher)["Q"][mask]
    print(f"{name} at SNR 30: median Q {np.median(q):.3f}, 1st percentile {np.percentile(q, 1):.3f}")
    assert np.median(q) > 0.9 and np.percentile(q, 1) > 0.6


def test_implausible_vectors_have_low_quality(default_sequence: Sequence, default_dictionary: Dictionary,
                                              matcher: Matcher) -> None:
    rng = np.random.default_rng(4)
    gaussian = (rng.standard_normal((2000, 4)) + 1j * rng.standard_normal((2000, 4))).astype(np.complex64)
    volume, mask = _as_volume(gaussian)
    q = match_volume_with_quality(volume, mask, matcher)["Q"][mask]
    print(f"complex Gaussian vectors: median Q {np.median(q):.3f}, {np.mean(q == 0):.1%} at 0")
    assert np.median(q) == 0.0 and np.mean(q < 0.5) > 0.9
    # Tissue whose SV2..SV4 are a quarter period out of phase with SV1: no real atom is near it.
    rotated = np.concatenate([_tissue(default_sequence, default_dictionary, name, 1) for name in TISSUES])
    rotated[:, 1:] *= 1j
    volume, mask = _as_volume(rotated)
    q = match_volume_with_quality(volume, mask, matcher)["Q"][mask]
    print(f"SV2..SV4 times i: Q {np.round(q, 3).tolist()}")
    assert np.all(q < 0.5)


def test_maps_are_match_volumes(default_sequence: Sequence, default_dictionary: Dictionary, matcher: Matcher) -> None:
    """T1, T2 and PD as match_volume gives them; Q of the voxels' scores, zero outside the mask."""
    voxels = np.concatenate([_tissue(default_sequence, default_dictionary, name, 5) for name in TISSUES])
    rng = np.random.default_rng(5)
    volume, mask = _as_volume(add_complex_noise(voxels, 0.002, rng))
    ours = match_volume_with_quality(volume, mask, matcher)
    theirs = match_volume(volume, mask, matcher)
    assert sorted(ours) == ["PD", "Q", "T1", "T2"]
    for name, values in theirs.items():
        np.testing.assert_array_equal(ours[name], values)
    scores = matcher.match(volume[mask]).score
    score_volume = np.zeros(mask.shape, np.float32)
    score_volume[mask] = scores
    np.testing.assert_array_equal(quality_map(score_volume, mask), ours["Q"])
    # the mask's voxels alone (as the pipeline passes them) give the same maps
    from_voxels = match_volume_with_quality(volume[mask], mask, matcher)
    for name, values in ours.items():
        np.testing.assert_array_equal(from_voxels[name], values)
    with pytest.raises(ValueError, match=r"mask: shape"):
        match_volume_with_quality(volume, mask[:, :1], matcher)


def test_grid_bounds() -> None:
    """The default grid runs T1 100..~4946 ms and T2 10..~2998 ms (2 % steps below 5000 and 3000)."""
    t1 = np.array([100.0, 100.5, 850.0, 4850.0, 4945.8, 5000.0, 850.0, 4000.0])
    t2 = np.array([50.0, 50.0, 70.0, 70.0, 70.0, 70.0, 10.0, 2998.1])
    assert at_grid_bounds(t1, t2).tolist() == [True, True, False, False, True, True, True, True]


# ---- study verdict ------------------------------------------------------------------------------------


def _study(n: int = 10_000, *, poor: float = 0.0, bounded: float = 0.0) -> tuple[np.ndarray, ...]:
    """A brain of ``n`` voxels (plus as many outside the mask, all poor) with Q 0.98 except ``poor`` of them
    at Q 0.2, and WM T1/T2 except ``bounded`` of them at T1 = 100 ms."""
    mask = np.zeros((n, 2), bool)
    mask[:, 0] = True
    quality = np.full(mask.shape, 0.98, np.float32)
    quality[:, 1] = 0.0
    quality[: int(poor * n), 0] = 0.2
    t1, t2 = np.full(mask.shape, 850.0, np.float32), np.full(mask.shape, 75.0, np.float32)
    t1[n - int(bounded * n):, 0] = 100.0
    t1[:, 1] = 5000.0
    return quality, mask, t1, t2


def test_a_good_study_passes() -> None:
    verdict = study_verdict(*_study(poor=0.01, bounded=0.01), protocol_reasons=[])
    assert verdict.ok and verdict.reasons == []
    assert verdict.median_quality == pytest.approx(0.98)
    assert verdict.low_quality_fraction == pytest.approx(0.01) and verdict.bound_fraction == pytest.approx(0.01)
    assert "OK" in verdict.summary()


def test_poor_quality_is_flagged() -> None:
    verdict = study_verdict(*_study(poor=0.6), protocol_reasons=[])
    assert not verdict.ok
    assert verdict.median_quality == pytest.approx(0.2) and verdict.low_quality_fraction == pytest.approx(0.6)
    assert verdict.reasons == ["median match quality 0.20 in the brain (expected >= 0.95)",
                               "60.0% of brain voxels with match quality < 0.5 (expected <= 2%)"]
    verdict = study_verdict(*_study(poor=0.08), protocol_reasons=[])
    assert verdict.reasons == ["8.0% of brain voxels with match quality < 0.5 (expected <= 2%)"]


def test_voxels_at_the_grid_bounds_are_flagged() -> None:
    verdict = study_verdict(*_study(bounded=0.1), protocol_reasons=[])
    assert not verdict.ok and verdict.reasons == ["10.0% of brain voxels at the dictionary's T1/T2 bounds "
                                                  "(expected <= 5%)"]


def test_protocol_reasons_are_flagged_and_recorded() -> None:
    reasons = ["MagneticFieldStrength 1.5 T (trained on 3 T)"]
    verdict = study_verdict(*_study(), protocol_reasons=reasons)
    assert not verdict.ok and verdict.reasons == ["protocol: MagneticFieldStrength 1.5 T (trained on 3 T)"]
    doc = json.loads(json.dumps(verdict.to_dict()))
    assert doc["ok"] is False and doc["protocol_reasons"] == reasons and doc["median_quality"] == 0.98
    assert doc["limits"]["min_median_quality"] == 0.95
    assert verdict.summary().startswith("FLAGGED: protocol: MagneticFieldStrength 1.5 T")


def test_verdict_rejects_bad_input() -> None:
    quality, mask, t1, t2 = _study(n=10)
    with pytest.raises(ValueError, match=r"t2: shape \(10, 1\) does not match the mask \(10, 2\)"):
        study_verdict(quality, mask, t1, t2[:, :1], protocol_reasons=[])
    with pytest.raises(ValueError, match=r"mask: empty"):
        study_verdict(quality, np.zeros_like(mask), t1, t2, protocol_reasons=[])


def test_qc_figure_shows_quality_and_verdict(tmp_path: Path) -> None:
    """A fifth panel (80 dpi, 3.2 inch each) for Q; the title grows by the wrapped verdict."""
    import matplotlib.image

    quality, mask, t1, t2 = _study(n=400, poor=0.6)
    shape = (20, 20, 2)
    volumes = {name: v.reshape(shape) for name, v in (("Q", quality), ("T1", t1), ("T2", t2))}
    mask = mask.reshape(shape)
    verdict = study_verdict(volumes["Q"], mask, volumes["T1"], volumes["T2"], protocol_reasons=["TI 1300 ms"])
    maps = {"T1": volumes["T1"], "T2": volumes["T2"], "PD": np.ones(shape, np.float32)}
    plain = matplotlib.image.imread(qc_figure(tmp_path / "plain.png", volumes["T1"], maps, mask, title="s"))
    with_q = matplotlib.image.imread(qc_figure(tmp_path / "q.png", volumes["T1"], maps, mask, title="s",
                                               quality=volumes["Q"], verdict=verdict))
    assert plain.shape[:2] == (288, 1024) and with_q.shape[:2] == (288, 1280)
