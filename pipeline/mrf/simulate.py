"""Compressed MRF coefficients for given T1/T2/PD maps (``synthmrf mrf simulate``).

Every voxel's (T1, T2) is snapped to a fine log lattice (default 0.25 % steps, i.e. at most 0.125 %
off, far below the dictionary's 2 % grid), each distinct lattice point is simulated once with EPG, and
the signals are projected on the dictionary's SVD basis. Smooth maps have few distinct points, so a
whole brain takes seconds. Partial-volume voxels should be built by the caller as sums of tissue
coefficients (signal-domain mixing), which this function makes easy: it is linear in ``pd``.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.mrf.dictionary import Dictionary, simulate_signals
from pipeline.mrf.sequence import Sequence

DEFAULT_LATTICE_STEP = 0.0025


def simulate_coefficients(
    sequence: Sequence,
    dictionary: Dictionary,
    t1_ms: np.ndarray,
    t2_ms: np.ndarray,
    pd: np.ndarray,
    *,
    lattice_step: float = DEFAULT_LATTICE_STEP,
    device: str | torch.device = "auto",
) -> np.ndarray:
    """Noise-free coefficients (map shape + (K,), complex64, real-valued phase) for M0 = ``pd``.

    Voxels with ``pd == 0`` are not simulated and get zeros. ``dictionary`` supplies the basis and
    the EPG settings and must belong to ``sequence``.
    """
    if dictionary.sequence_hash != sequence.hash():
        raise ValueError(
            f"dictionary: built for sequence hash {dictionary.sequence_hash[:12]}, "
            f"not {sequence.hash()[:12]} ({sequence.name})"
        )
    if not (t1_ms.shape == t2_ms.shape == pd.shape):
        raise ValueError(f"t1_ms, t2_ms, pd: shapes differ: {t1_ms.shape}, {t2_ms.shape}, {pd.shape}")
    out = np.zeros(pd.shape + (dictionary.rank,), dtype=np.complex64)
    active = pd != 0
    if not active.any():
        return out
    t1, t2 = t1_ms[active].astype(np.float64), t2_ms[active].astype(np.float64)
    if np.any(~np.isfinite(t1)) or np.any(~np.isfinite(t2)) or np.any(t1 <= 0) or np.any(t2 <= 0):
        raise ValueError("t1_ms, t2_ms: must be finite and > 0 wherever pd != 0")
    scale = np.log1p(lattice_step)
    keys = np.stack([np.round(np.log(t1) / scale), np.round(np.log(t2) / scale)], axis=1).astype(np.int64)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    lattice = np.exp(unique * scale)
    signals = simulate_signals(sequence, lattice[:, 0], lattice[:, 1], n_states=dictionary.n_states,
                               device=device)
    atoms = signals @ dictionary.basis
    out[active] = atoms[inverse.ravel()] * pd[active, None]
    return out
