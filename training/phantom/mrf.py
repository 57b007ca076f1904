"""Simulated MRF acquisition on the MRF grid: partial volume, coil phase, noise.

Coefficients = the subject's partial-volume mixture (:mod:`training.phantom.mixing`) of
``simulate_coefficients`` atoms (the existing EPG physics, evaluated once per distinct (T1, T2) pair),
times a smooth unit-magnitude coil phase exp(i phi(x)), plus circular complex Gaussian noise, then
phase renormalisation (SV1 real and >= 0). SNR is defined on SV1: sigma = |SV1| of pure WM at the
subject's values / SNR. Voxels outside the head support (the head dilated by 8 mm) are zero, as after a
reconstruction's background mask, which keeps the files small.
"""

from __future__ import annotations

import numpy as np

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence
from pipeline.mrf.simulate import simulate_coefficients
from training.phantom.anatomy import RenderedAnatomy
from training.phantom.fields import SmoothField
from training.phantom.mixing import mixed_signal
from training.phantom.tissues import TissueModel


def _pair_atoms(sequence: Sequence, dictionary: Dictionary, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    return simulate_coefficients(sequence, dictionary, t1, t2, np.ones_like(t1), device="cpu")


def noise_free_coefficients(sequence: Sequence, dictionary: Dictionary, model: TissueModel,
                            anatomy: RenderedAnatomy) -> np.ndarray:
    """Coefficients (N, K) complex64 at the anatomy's voxels, before coil phase and noise."""
    def atoms(t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
        return _pair_atoms(sequence, dictionary, t1, t2)

    return mixed_signal(model, anatomy, atoms, dictionary.rank, np.complex64)


def wm_sv1_reference(sequence: Sequence, dictionary: Dictionary, model: TissueModel) -> float:
    """|SV1| of pure WM at the subject's values: the SNR reference."""
    wm = model.values["wm"]
    atom = _pair_atoms(sequence, dictionary, np.array([wm.t1_ms]), np.array([wm.t2_ms]))
    return float(abs(atom[0, 0]) * wm.pd)


def acquire_mrf(sequence: Sequence, dictionary: Dictionary, model: TissueModel, anatomy: RenderedAnatomy, *,
                coil_phase: SmoothField, snr: float, rng: np.random.Generator) -> np.ndarray:
    """Phase-normalised noisy coefficients on ``anatomy.grid``: grid shape + (K,), complex64."""
    if snr <= 0:
        raise ValueError(f"snr: must be > 0, got {snr}")
    coeffs = noise_free_coefficients(sequence, dictionary, model, anatomy)
    phase = coil_phase(anatomy.grid.points_mm(anatomy.index))[0]
    coeffs *= np.exp(1j * phase).astype(np.complex64)[:, None]
    sigma = wm_sv1_reference(sequence, dictionary, model) / snr
    coeffs = phase_normalise(add_complex_noise(coeffs, sigma, rng))
    return anatomy.full(coeffs)
