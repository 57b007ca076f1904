"""Simulated MRF acquisition on the MRF grid: signal-domain partial volume, coil phase, noise.

Coefficients = sum over tissues of ``simulate_coefficients(seq, dict, T1_t, T2_t, fraction_t x PD_t)``
(the existing EPG physics, evaluated once per distinct (T1, T2) pair of a tissue's quantised
modulation), times a smooth unit-magnitude coil phase exp(i phi(x)), plus circular complex Gaussian
noise, then phase renormalisation (SV1 real and >= 0). SNR is defined on SV1: sigma = |SV1| of pure
WM at the subject's values / SNR. Voxels outside the head support (the head dilated by 8 mm) are zero,
as after a reconstruction's background mask, which keeps the files small.
"""

from __future__ import annotations

import numpy as np

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence
from pipeline.mrf.simulate import simulate_coefficients
from training.phantom.anatomy import TISSUES, RenderedAnatomy
from training.phantom.fields import SmoothField
from training.phantom.tissues import N_LEVELS, TissueModel


def _pair_atoms(sequence: Sequence, dictionary: Dictionary, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    return simulate_coefficients(sequence, dictionary, t1, t2, np.ones_like(t1), device="cpu")


def noise_free_coefficients(sequence: Sequence, dictionary: Dictionary, model: TissueModel,
                            anatomy: RenderedAnatomy) -> np.ndarray:
    """Coefficients (N, K) complex64 at the anatomy's voxels, before coil phase and noise."""
    g, h = model.level_indices(anatomy)
    pair = g.astype(np.int32) * N_LEVELS + h
    out = np.zeros((anatomy.index.size, dictionary.rank), dtype=np.complex64)
    for t, name in enumerate(TISSUES):
        present = np.flatnonzero(anatomy.fractions[t] > 0)
        if present.size == 0:
            continue
        t1_tab, t2_tab, pd_tab = model.level_tables(name)
        used, inverse = np.unique(pair[present], return_inverse=True)
        atoms = _pair_atoms(sequence, dictionary, t1_tab[used // N_LEVELS], t2_tab[used % N_LEVELS])
        weight = anatomy.fractions[t, present] * pd_tab[g[present]]
        out[present] += atoms[inverse] * weight[:, None].astype(np.float32)
    return out


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
