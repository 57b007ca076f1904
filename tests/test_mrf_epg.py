"""EPG against an independent isochromat Bloch simulation and against analytic limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.mrf.epg import DEFAULT_N_STATES, simulate_fisp
from pipeline.mrf.sequence import Sequence

TISSUES = [(830.0, 80.0), (1500.0, 100.0), (300.0, 30.0), (4000.0, 1500.0), (2000.0, 2000.0)]


def short_schedule(n: int = 120, seed: int = 3, ti_ms: float | None = 20.0) -> Sequence:
    rng = np.random.default_rng(seed)
    return Sequence("short", np.full(n, 9.3) + rng.uniform(0, 3, n), rng.uniform(0.5, 2.5, n),
                    rng.uniform(0, 90, n), ti_ms)


def bloch_isochromats(seq: Sequence, t1: float, t2: float, b1: float = 1.0, n_spins: int = 2048) -> np.ndarray:
    """Reference: spins spread evenly over 2 pi of dephasing, rotated and relaxed one by one (numpy).

    Same model as the EPG (RF about y, sample at TE, relax over TR, one cycle of dephasing per TR),
    computed in the spatial domain; the mean transverse magnetisation is the signal.
    """
    theta = 2 * np.pi * np.arange(n_spins) / n_spins
    mx, my = np.zeros(n_spins), np.zeros(n_spins)
    mz0 = 1.0 if seq.inversion_ti_ms is None else 1 - 2 * np.exp(-seq.inversion_ti_ms / t1)
    mz = np.full(n_spins, mz0)
    out = np.empty(seq.n_frames, dtype=complex)
    for n in range(seq.n_frames):
        a = np.deg2rad(seq.flip_angle_deg[n]) * b1
        mx, mz = np.cos(a) * mx + np.sin(a) * mz, -np.sin(a) * mx + np.cos(a) * mz
        out[n] = np.mean(mx + 1j * my) * np.exp(-seq.te_ms[n] / t2)
        e1, e2 = np.exp(-seq.tr_ms[n] / t1), np.exp(-seq.tr_ms[n] / t2)
        mt = (mx + 1j * my) * e2 * np.exp(1j * theta)
        mx, my, mz = mt.real, mt.imag, mz * e1 + 1 - e1
    return out


@pytest.mark.parametrize(("t1", "t2"), TISSUES)
@pytest.mark.parametrize("b1", [1.0, 0.8])
def test_epg_matches_isochromat_bloch_simulation(t1: float, t2: float, b1: float) -> None:
    seq = short_schedule()
    ref = bloch_isochromats(seq, t1, t2, b1)
    epg = simulate_fisp(seq, torch.tensor([t1], dtype=torch.float64), torch.tensor([t2], dtype=torch.float64),
                        b1=b1, n_states=seq.n_frames + 1)[0].numpy()
    error = np.linalg.norm(epg - ref) / np.linalg.norm(ref)
    assert error < 1e-3, f"normalised error {error:.2e}"
    assert np.abs(ref.imag).max() < 1e-9  # RF about y keeps the signal real


def test_single_pulse_gives_sin_alpha() -> None:
    angles = np.array([5.0, 30.0, 90.0, 150.0])
    for alpha in angles:
        seq = Sequence("one", np.array([10.0]), np.array([0.0]), np.array([alpha]), None)
        s = simulate_fisp(seq, torch.tensor([1000.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64))
        assert s[0, 0].item() == pytest.approx(np.sin(np.deg2rad(alpha)), abs=1e-12)


def test_zero_flip_without_relaxation_changes_nothing() -> None:
    seq = Sequence("zero", np.full(50, 9.3), np.full(50, 2.0), np.zeros(50), None)
    huge = torch.tensor([1e15], dtype=torch.float64)
    assert torch.all(simulate_fisp(seq, huge, huge) == 0)


def test_small_flip_follows_analytic_inversion_recovery() -> None:
    """A 0.01 degree pulse barely perturbs Mz, so signal / sin(alpha) = 1 - 2 exp(-t / T1)."""
    n, tr, ti = 400, 9.3, 20.0
    seq = Sequence("ir", np.full(n, tr), np.zeros(n), np.full(n, 0.01), ti)
    t1 = 900.0
    s = simulate_fisp(seq, torch.tensor([t1], dtype=torch.float64), torch.tensor([80.0], dtype=torch.float64))
    t = ti + tr * np.arange(n)
    expected = np.sin(np.deg2rad(0.01)) * (1 - 2 * np.exp(-t / t1))
    assert np.allclose(s[0].numpy(), expected, rtol=0, atol=1e-8)


def test_b1_scales_flip_angles() -> None:
    seq = short_schedule(60)
    scaled = Sequence("scaled", seq.tr_ms, seq.te_ms, seq.flip_angle_deg * 0.7, seq.inversion_ti_ms)
    t1, t2 = torch.tensor([1000.0, 700.0]), torch.tensor([90.0, 50.0])
    assert torch.allclose(simulate_fisp(seq, t1, t2, b1=torch.tensor([0.7, 0.7])), simulate_fisp(scaled, t1, t2),
                          atol=1e-6)


def test_state_truncation_error_on_default_schedule(default_sequence: Sequence) -> None:
    """Dropping dephasing orders above DEFAULT_N_STATES: measured against an untruncated run."""
    t1 = torch.tensor([t for t, _ in TISSUES], dtype=torch.float64)
    t2 = torch.tensor([t for _, t in TISSUES], dtype=torch.float64)
    full = simulate_fisp(default_sequence, t1, t2, n_states=default_sequence.n_frames + 1).numpy()
    cut = simulate_fisp(default_sequence, t1, t2, n_states=DEFAULT_N_STATES).numpy()
    error = np.linalg.norm(cut - full, axis=1) / np.linalg.norm(full, axis=1)
    print("truncation error per tissue:", dict(zip(TISSUES, np.round(error, 5), strict=True)))
    brain = error[:3]
    assert brain.max() < 1e-4  # WM, GM, short T2: truncation is invisible
    assert error.max() < 0.02  # long-T2 fluid: below 2 % (it does not move the match: see test_mrf_matching)


def test_float32_and_float64_agree() -> None:
    seq = short_schedule(200)
    t1, t2 = torch.tensor([800.0, 3000.0]), torch.tensor([70.0, 800.0])
    s32 = simulate_fisp(seq, t1, t2)
    s64 = simulate_fisp(seq, t1.double(), t2.double())
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s64, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t1_ms": torch.tensor([[1.0]]), "t2_ms": torch.tensor([[1.0]])}, r"t1_ms, t2_ms: expected two 1-D"),
        ({"t1_ms": torch.tensor([0.0]), "t2_ms": torch.tensor([1.0])}, r"relaxation times must be > 0"),
        ({"t1_ms": torch.tensor([1.0]), "t2_ms": torch.tensor([1.0]), "n_states": 0}, r"n_states: must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate_fisp(short_schedule(5), **kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu() -> None:
    seq = short_schedule(100)
    t1, t2 = torch.tensor([800.0, 3000.0]), torch.tensor([70.0, 800.0])
    assert torch.allclose(simulate_fisp(seq, t1.cuda(), t2.cuda()).cpu(), simulate_fisp(seq, t1, t2), atol=1e-5)
