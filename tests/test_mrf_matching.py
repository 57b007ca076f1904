"""Matching: brute force against an independent reference, the fast method against brute force,
and the simulate -> match round trip (exact on grid, within a step off grid, bias/spread with noise)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.matching import Matcher, match_volume
from pipeline.mrf.sequence import Sequence
from pipeline.mrf.simulate import simulate_coefficients

BRAIN = {"WM": (830.0, 80.0), "GM": (1500.0, 100.0), "deep GM": (1300.0, 90.0), "lesion": (1200.0, 150.0)}


def assert_same_up_to_ties(index: np.ndarray, reference: np.ndarray, voxels: np.ndarray,
                           dictionary: Dictionary) -> tuple[int, float]:
    """Where two argmaxes differ, the atoms must score the same in float64 (a float32 rounding tie)."""
    differ = np.flatnonzero(index != reference)
    atoms = dictionary.atoms.astype(np.float64)
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    v = voxels[differ].astype(np.complex128)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    gap = np.abs(np.abs((v * unit[reference[differ]]).sum(1)) - np.abs((v * unit[index[differ]]).sum(1)))
    assert differ.size <= max(2, len(voxels) * 2e-3), f"{differ.size} of {len(voxels)} differ"
    assert gap.max(initial=0) < 1e-6, f"a non-tie differs: exact score gap {gap.max():.2e}"
    return int(differ.size), float(gap.max(initial=0))


@pytest.fixture(scope="module")
def matcher(default_dictionary: Dictionary) -> Matcher:
    return Matcher(default_dictionary)


@pytest.fixture(scope="module")
def clean_voxels(default_sequence: Sequence, default_dictionary: Dictionary) -> np.ndarray:
    """20,000 noise-free brain-like voxels (WM/GM/CSF, 15-20 % spread): 2,000 (T1, T2) pairs x 10."""
    rng = np.random.default_rng(0)
    n = 2000
    tissue = rng.choice(3, n, p=[0.45, 0.4, 0.15])
    t1 = np.array([830.0, 1500.0, 4000.0])[tissue] * np.exp(rng.normal(0, 0.15, n))
    t2 = np.array([80.0, 100.0, 1200.0])[tissue] * np.exp(rng.normal(0, 0.2, n))
    coeffs = simulate_coefficients(default_sequence, default_dictionary, t1, t2, np.ones(n))
    return np.repeat(coeffs, 10, axis=0)


def with_noise(clean: np.ndarray, snr: float, seed: int) -> np.ndarray:
    """Random coil phase and complex noise at ``snr`` (RMS coefficient over RMS noise magnitude)."""
    rng = np.random.default_rng(seed)
    phased = clean * np.exp(1j * rng.uniform(-np.pi, np.pi, len(clean)))[:, None]
    sigma = np.linalg.norm(clean, axis=1).mean() / (snr * np.sqrt(2 * clean.shape[1]))
    return add_complex_noise(phased, sigma, rng)


def test_brute_force_matches_an_independent_numpy_reference(clean_voxels: np.ndarray,
                                                           default_dictionary: Dictionary, matcher: Matcher) -> None:
    voxels = with_noise(clean_voxels[::50], snr=10, seed=1)
    atoms = default_dictionary.atoms.astype(np.float64)
    unit = atoms / np.linalg.norm(atoms, axis=1, keepdims=True)
    inner = np.abs(voxels.astype(np.complex128) @ unit.T)  # |<a, d>| for real atoms
    ref_index = inner.argmax(axis=1)
    result = matcher.brute_force(voxels)
    assert_same_up_to_ties(result.index, ref_index, voxels, default_dictionary)
    expected_pd = inner.max(axis=1) / np.linalg.norm(atoms[result.index], axis=1)
    assert np.allclose(result.pd, expected_pd, rtol=1e-5)
    assert np.allclose(result.score, inner.max(axis=1) / np.linalg.norm(voxels, axis=1), atol=1e-6)


@pytest.mark.parametrize("snr", [5.0, 20.0, 100.0])
def test_fast_match_gives_the_brute_force_answer(clean_voxels: np.ndarray, default_dictionary: Dictionary,
                                                 matcher: Matcher, snr: float) -> None:
    voxels = with_noise(clean_voxels, snr=snr, seed=2)
    fast = matcher.match(voxels, chunk=4096)
    brute = matcher.brute_force(voxels)
    differ, gap = assert_same_up_to_ties(fast.index, brute.index, voxels, default_dictionary)
    print(f"SNR {snr}: {differ} of {len(voxels)} indices differ, all float32 ties (exact gap <= {gap:.1e})")
    assert np.allclose(fast.score, brute.score, atol=1e-6)


def test_round_trip_recovers_grid_values_exactly(default_sequence: Sequence, default_dictionary: Dictionary,
                                                 matcher: Matcher) -> None:
    rng = np.random.default_rng(4)
    pick = rng.choice(default_dictionary.n_atoms, 2000, replace=False)
    t1, t2 = default_dictionary.t1_ms[pick], default_dictionary.t2_ms[pick]
    pd = rng.uniform(0.3, 1.2, pick.size)
    coeffs = simulate_coefficients(default_sequence, default_dictionary, t1, t2, pd, lattice_step=1e-5)
    result = matcher.match(phase_normalise(coeffs * np.exp(1j * rng.uniform(0, 6, pick.size))[:, None]))
    assert np.array_equal(result.t1_ms, t1) and np.array_equal(result.t2_ms, t2)
    assert np.allclose(result.pd, pd, rtol=1e-4)


def test_round_trip_off_grid_lands_within_one_grid_step(default_sequence: Sequence,
                                                        default_dictionary: Dictionary, matcher: Matcher) -> None:
    """Brain range (T1 300-3000 ms, T2 20-300 ms): every value within one 2 % step in T1 and T2."""
    rng = np.random.default_rng(5)
    t1 = np.exp(rng.uniform(np.log(300), np.log(3000), 3000))
    t2 = np.minimum(np.exp(rng.uniform(np.log(20), np.log(300), 3000)), t1 * 0.5)
    coeffs = simulate_coefficients(default_sequence, default_dictionary, t1, t2, np.ones_like(t1), lattice_step=1e-5)
    result = matcher.match(coeffs)
    step = np.log1p(default_dictionary.grid.step)
    t1_steps = np.abs(np.log(result.t1_ms / t1)) / step
    t2_steps = np.abs(np.log(result.t2_ms / t2)) / step
    print(f"off grid, brain range: max |error| {t1_steps.max():.2f} T1 steps, {t2_steps.max():.2f} T2 steps")
    assert t1_steps.max() <= 1.0 and t2_steps.max() <= 1.0
    # Long-T2 fluid is poorly conditioned for any FISP schedule: report it, bound it loosely.
    fluid_t1, fluid_t2 = np.array([3500.0, 4000.0, 4500.0]), np.array([1000.0, 1500.0, 2000.0])
    fluid = matcher.match(simulate_coefficients(default_sequence, default_dictionary, fluid_t1, fluid_t2,
                                                np.ones(3), lattice_step=1e-5))
    print(f"fluid T1 {fluid.t1_ms.round()} (truth {fluid_t1}), T2 {fluid.t2_ms.round()} (truth {fluid_t2})")
    assert np.all(np.abs(np.log(fluid.t1_ms / fluid_t1)) < np.log(1.03))
    assert np.all(np.abs(np.log(fluid.t2_ms / fluid_t2)) < np.log(1.10))


def test_noise_at_snr_20_bias_and_spread(default_sequence: Sequence, default_dictionary: Dictionary,
                                         matcher: Matcher) -> None:
    rng = np.random.default_rng(6)
    n = 4000
    lines = []
    for name, (t1, t2) in BRAIN.items():
        coeffs = simulate_coefficients(default_sequence, default_dictionary, np.full(n, t1), np.full(n, t2),
                                       np.ones(n))
        sigma = np.linalg.norm(coeffs[0]) / (20 * np.sqrt(2 * default_dictionary.rank))
        result = matcher.match(phase_normalise(add_complex_noise(coeffs, sigma, rng)))
        b1, s1 = np.mean(result.t1_ms / t1 - 1), np.std(result.t1_ms / t1)
        b2, s2 = np.mean(result.t2_ms / t2 - 1), np.std(result.t2_ms / t2)
        lines.append(f"{name:8s} T1 bias {100 * b1:+5.1f}% sd {100 * s1:4.1f}%  T2 bias {100 * b2:+5.1f}% "
                     f"sd {100 * s2:4.1f}%")
        assert abs(b1) < 0.03 and abs(b2) < 0.05
        assert s1 < 0.10 and s2 < 0.20
    print("SNR 20:\n" + "\n".join(lines))


def test_match_volume_respects_the_mask_and_geometry(default_sequence: Sequence, default_dictionary: Dictionary,
                                                     matcher: Matcher) -> None:
    t1 = np.full((4, 5, 3), 900.0, np.float32)
    t2 = np.full((4, 5, 3), 70.0, np.float32)
    pd = np.ones((4, 5, 3), np.float32)
    coeffs = simulate_coefficients(default_sequence, default_dictionary, t1, t2, pd)
    mask = np.zeros((4, 5, 3), bool)
    mask[1:3, 2:, 1] = True
    maps = match_volume(coeffs, mask, matcher)
    assert set(maps) == {"T1", "T2", "PD"}
    assert np.all(maps["T1"][~mask] == 0) and np.all(np.abs(maps["T1"][mask] / 900 - 1) < 0.02)
    with pytest.raises(ValueError, match=r"mask: shape \(4, 5\) does not match"):
        match_volume(coeffs, mask[:, :, 0], matcher)
