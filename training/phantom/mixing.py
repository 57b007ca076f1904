"""Partial volume: how a voxel's tissues combine into one signal, and what its ground truth is.

Two limits, and a subject-level mix of them (``TissueModel.exchange`` = lambda in [0, 1]):

- **signal-domain mixing** (lambda = 0, world v1): compartments do not exchange water on the time scale
  of the sequence, so the voxel signal is sum_t w_t S(T1_t, T2_t), w_t = fraction_t x PD_t;
- **fast exchange** (lambda = 1): one pool with the w-weighted mean *rates*, 1/T1 = sum_t w_t / T1_t / W
  (and the same for T2), signal W S(T1_fx, T2_fx), W = sum_t w_t (Zimmerman-Brittin limit);
- in between: (1 - lambda) x signal-domain + lambda x fast-exchange signal.

Signals are evaluated once per distinct (T1, T2) pair: a tissue's values take 25 x 25 quantised levels
(:mod:`training.phantom.tissues`); fast-exchange values are quantised to 0.1 % steps of log T, far finer
than the 2 % dictionary grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.phantom.anatomy import TISSUES, RenderedAnatomy
from training.phantom.tissues import N_LEVELS, TissueModel

LOG_STEP = 0.001  # quantisation of fast-exchange log T1 and log T2

SignalFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(T1 (M,), T2 (M,)) in ms -> signals (M, width) for unit proton density."""


def fast_exchange(model: TissueModel, anatomy: RenderedAnatomy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per voxel: total weight W = sum_t fraction_t PD_t, and the fast-exchange T1 and T2 (ms; 0 where W = 0)."""
    g, h = model.level_indices(anatomy)
    n = anatomy.index.size
    w_sum, r1, r2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for t, name in enumerate(TISSUES):
        t1_tab, t2_tab, pd_tab = model.level_tables(name)
        w = anatomy.fractions[t] * pd_tab[g]
        w_sum += w
        r1 += w / t1_tab[g]
        r2 += w / t2_tab[h]
    present = w_sum > 0
    safe = np.where(present, w_sum, 1)
    t1 = np.where(present, safe / np.where(present, r1, 1), 0)
    t2 = np.where(present, safe / np.where(present, r2, 1), 0)
    return w_sum, t1, t2


def _signal_domain(model: TissueModel, anatomy: RenderedAnatomy, signal: SignalFn, width: int,
                   dtype: type[np.generic]) -> np.ndarray:
    g, h = model.level_indices(anatomy)
    pair = g.astype(np.int32) * N_LEVELS + h
    out: np.ndarray = np.zeros((anatomy.index.size, width), dtype=dtype)
    for t, name in enumerate(TISSUES):
        present = np.flatnonzero(anatomy.fractions[t] > 0)
        if present.size == 0:
            continue
        t1_tab, t2_tab, pd_tab = model.level_tables(name)
        used, inverse = np.unique(pair[present], return_inverse=True)
        atoms: np.ndarray = signal(t1_tab[used // N_LEVELS], t2_tab[used % N_LEVELS]).astype(dtype)
        weight = anatomy.fractions[t, present] * pd_tab[g[present]]
        out[present] += atoms[inverse] * weight[:, None].astype(np.float32)
    return out


def _fast_exchange_signal(model: TissueModel, anatomy: RenderedAnatomy, signal: SignalFn, width: int,
                          dtype: type[np.generic]) -> np.ndarray:
    w_sum, t1, t2 = fast_exchange(model, anatomy)
    out: np.ndarray = np.zeros((anatomy.index.size, width), dtype=dtype)
    present = np.flatnonzero(w_sum > 0)
    if present.size == 0:
        return out
    keys = np.stack([np.rint(np.log(t1[present]) / LOG_STEP), np.rint(np.log(t2[present]) / LOG_STEP)], axis=1)
    used, inverse = np.unique(keys.astype(np.int64), axis=0, return_inverse=True)
    atoms: np.ndarray = signal(np.exp(used[:, 0] * LOG_STEP), np.exp(used[:, 1] * LOG_STEP)).astype(dtype)
    out[present] = atoms[inverse.ravel()] * w_sum[present, None].astype(np.float32)
    return out


def mixed_signal(model: TissueModel, anatomy: RenderedAnatomy, signal: SignalFn, width: int,
                 dtype: type[np.generic]) -> np.ndarray:
    """The partial-volume signal (N, width) at the anatomy's voxels under the subject's exchange mix."""
    lam = model.exchange
    out = _signal_domain(model, anatomy, signal, width, dtype) if lam < 1 else None
    if lam <= 0:
        assert out is not None
        return out
    fx = _fast_exchange_signal(model, anatomy, signal, width, dtype)
    return fx if out is None else ((1 - lam) * out + lam * fx).astype(dtype)
