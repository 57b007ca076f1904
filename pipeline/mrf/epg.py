"""Extended phase graph (EPG) simulation of inversion-prepared FISP, vectorised over atoms (torch).

Model (Weigel 2015; Hargreaves' epg_* conventions): perfect inversion, free T1 recovery for TI, then
for every frame an instantaneous ideal RF pulse (angle x B1, phase 90 deg, i.e. about y), the signal
F0 sampled at TE, T1/T2 relaxation over the TR and one unit of unbalanced gradient dephasing at the
end of the TR. With a fixed RF phase every EPG state stays real, so we simulate in real arithmetic.

Internally F+ and F- states live in long buffers whose window slides by one element per TR: the
dephasing shift then costs nothing. States beyond ``n_states`` are dropped (truncation); the error
this causes is measured in the tests against an untruncated simulation.
"""

from __future__ import annotations

import math

import torch

from pipeline.mrf.sequence import Sequence

DEFAULT_N_STATES = 48


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def simulate_fisp(
    sequence: Sequence,
    t1_ms: torch.Tensor,
    t2_ms: torch.Tensor,
    *,
    b1: torch.Tensor | float = 1.0,
    n_states: int = DEFAULT_N_STATES,
) -> torch.Tensor:
    """Signals (atoms x frames, real, M0 = 1) for 1-D tensors of T1 and T2 in ms.

    Runs on the device and in the floating dtype of ``t1_ms``. ``b1`` scales every flip angle (scalar
    or one value per atom). ``n_states`` bounds the number of dephasing orders kept.
    """
    if t1_ms.ndim != 1 or t2_ms.shape != t1_ms.shape:
        raise ValueError(f"t1_ms, t2_ms: expected two 1-D tensors of equal length, got {t1_ms.shape}, {t2_ms.shape}")
    if n_states < 1:
        raise ValueError(f"n_states: must be >= 1, got {n_states}")
    if torch.any(t1_ms <= 0) or torch.any(t2_ms <= 0):
        raise ValueError("t1_ms, t2_ms: relaxation times must be > 0")
    device, dtype = t1_ms.device, t1_ms.dtype
    n_atoms, n_frames = t1_ms.shape[0], sequence.n_frames
    r1 = (1.0 / t1_ms).unsqueeze(1)
    r2 = (1.0 / t2_ms).unsqueeze(1)
    b1_t = torch.as_tensor(b1, dtype=dtype, device=device).reshape(-1, 1)
    alpha = torch.as_tensor(sequence.flip_angle_deg, dtype=dtype, device=device) * (math.pi / 180)
    # Per-frame, per-atom rotation coefficients (atoms x frames); cheap compared with the state update.
    angles = alpha.unsqueeze(0) * b1_t
    cos_a = torch.cos(angles).expand(n_atoms, n_frames)
    half_cos_m1 = (cos_a - 1.0) / 2
    sin_a = torch.sin(angles).expand(n_atoms, n_frames)
    half_sin = sin_a / 2

    tr = torch.as_tensor(sequence.tr_ms, dtype=dtype, device=device)
    te = torch.as_tensor(sequence.te_ms, dtype=dtype, device=device)
    e2_te = torch.exp(-te.unsqueeze(0) * r2)
    e1_tr = torch.exp(-tr.unsqueeze(0) * r1)
    e2_tr = torch.exp(-tr.unsqueeze(0) * r2)

    # Sliding windows: F+ occupies fp_buf[:, p : p + S] (p decreases), F- occupies fm_buf[:, m : m + S].
    s = n_states
    fp_buf = torch.zeros(n_atoms, n_frames + s, dtype=dtype, device=device)
    fm_buf = torch.zeros(n_atoms, n_frames + s, dtype=dtype, device=device)
    z = torch.zeros(n_atoms, s, dtype=dtype, device=device)
    ti = sequence.inversion_ti_ms
    if ti is None:
        z[:, 0] = 1.0
    else:
        z[:, 0] = 1.0 - 2.0 * torch.exp(-ti * r1[:, 0])
    signal = torch.empty(n_atoms, n_frames, dtype=dtype, device=device)
    p, m = n_frames, 0
    for n in range(n_frames):
        fp = fp_buf[:, p : p + s]
        fm = fm_buf[:, m : m + s]
        # RF about y: (F+ + F-) and Z rotate, (F+ - F-) is untouched.
        u = fp + fm
        delta = u * half_cos_m1[:, n : n + 1] + z * sin_a[:, n : n + 1]
        z.mul_(cos_a[:, n : n + 1]).sub_(u * half_sin[:, n : n + 1])
        fp.add_(delta)
        fm.add_(delta)
        signal[:, n] = fp[:, 0] * e2_te[:, n]
        # Relaxation over the whole TR (F decays, Z recovers towards 1 in order 0 only).
        fp.mul_(e2_tr[:, n : n + 1])
        fm.mul_(e2_tr[:, n : n + 1])
        z.mul_(e1_tr[:, n : n + 1])
        z[:, 0] += 1.0 - e1_tr[:, n]
        # Dephasing: F+_k <- F+_{k-1}, F-_k <- F-_{k+1}, F+_0 <- conj(F-_1) (real here).
        # The slot entering F-'s window at the top was never written, so it is already zero.
        p -= 1
        m += 1
        fp_buf[:, p] = fm_buf[:, m]
    return signal
