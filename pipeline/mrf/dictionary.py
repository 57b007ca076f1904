"""The MRF dictionary: a (T1, T2) grid, its EPG signals, their SVD basis and the compressed atoms.

The full dictionary (atoms x frames) is simulated once, its Gram matrix gives the temporal SVD basis
(McGivney 2014), and only the compressed atoms (atoms x ``STORED_RANK``) are kept and cached on disk,
keyed by the sequence hash, the grid and the EPG settings. A dictionary of any rank K <= STORED_RANK
is a slice of the cached one, so a second run, with any K, is instant.

Basis convention: the singular vectors are real (the signals are real); each is signed so that its
entry of largest magnitude is positive (as scikit-learn's ``svd_flip``). Compressed atoms are stored
unnormalised (M0 = 1), so the proton density of a voxel is its projection scale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.mrf.epg import DEFAULT_N_STATES, resolve_device, simulate_fisp
from pipeline.mrf.sequence import DEFAULT_RANK, STORED_RANK, Sequence
from pipeline.npz_cache import read_cached, write_cached
from pipeline.parallel import map_chunks

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class Grid:
    """Log-spaced (T1, T2) grid in ms; only pairs with T2 < T1 are kept."""

    t1_min_ms: float = 100.0
    t1_max_ms: float = 5000.0
    t2_min_ms: float = 10.0
    t2_max_ms: float = 3000.0
    step: float = 0.02  # relative step between neighbouring values (2 %)

    def __post_init__(self) -> None:
        if not 0 < self.t1_min_ms < self.t1_max_ms:
            raise ValueError(f"t1 range: need 0 < min < max, got {self.t1_min_ms}..{self.t1_max_ms}")
        if not 0 < self.t2_min_ms < self.t2_max_ms:
            raise ValueError(f"t2 range: need 0 < min < max, got {self.t2_min_ms}..{self.t2_max_ms}")
        if not 0 < self.step < 1:
            raise ValueError(f"step: relative step must be in (0, 1), got {self.step}")

    @staticmethod
    def _axis(lo: float, hi: float, step: float) -> np.ndarray:
        n = int(np.floor(np.log(hi / lo) / np.log1p(step) + 1e-9)) + 1
        return lo * (1 + step) ** np.arange(n)

    def t1_axis(self) -> np.ndarray:
        return self._axis(self.t1_min_ms, self.t1_max_ms, self.step)

    def t2_axis(self) -> np.ndarray:
        return self._axis(self.t2_min_ms, self.t2_max_ms, self.step)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All (T1, T2) pairs with T2 < T1, T1-major order."""
        t1, t2 = np.meshgrid(self.t1_axis(), self.t2_axis(), indexing="ij")
        keep = t2 < t1
        return t1[keep], t2[keep]

    def key(self) -> str:
        return f"t1{self.t1_min_ms:g}-{self.t1_max_ms:g}_t2{self.t2_min_ms:g}-{self.t2_max_ms:g}_s{self.step:g}"


@dataclass(frozen=True)
class Dictionary:
    """Compressed dictionary of rank K: atoms (A x K, real, M0 = 1) in the basis (frames x K)."""

    t1_ms: np.ndarray
    t2_ms: np.ndarray
    atoms: np.ndarray
    basis: np.ndarray
    singular_values: np.ndarray  # all of them, for energy bookkeeping
    sequence_hash: str
    grid: Grid
    n_states: int

    @property
    def rank(self) -> int:
        return int(self.atoms.shape[1])

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.shape[0])

    def energy_fraction(self, rank: int) -> float:
        """Fraction of the dictionary's energy (sum of squared singular values) in the first ``rank``."""
        power = self.singular_values.astype(np.float64) ** 2
        return float(power[:rank].sum() / power.sum())

    def truncated(self, rank: int) -> Dictionary:
        """The same dictionary with only the first ``rank`` singular components."""
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank: must be in 1..{self.rank}, got {rank}")
        return Dictionary(self.t1_ms, self.t2_ms, self.atoms[:, :rank], self.basis[:, :rank],
                          self.singular_values, self.sequence_hash, self.grid, self.n_states)

    def compress(self, signals: np.ndarray) -> np.ndarray:
        """Project time signals (..., frames) onto the basis: (..., K)."""
        return signals @ self.basis


def cache_dir() -> Path:
    """Where dictionaries are cached: ``SYNTHMRF_CACHE_DIR`` or ``~/.cache/synthmrf``."""
    return Path(os.environ.get("SYNTHMRF_CACHE_DIR", Path.home() / ".cache" / "synthmrf"))


def _cache_path(sequence: Sequence, grid: Grid, n_states: int) -> Path:
    ident = json.dumps([CACHE_FORMAT, sequence.hash(), grid.key(), n_states, STORED_RANK])
    return cache_dir() / f"dictionary-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.npz"


def _signed_basis(eigvecs: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive."""
    rows = np.argmax(np.abs(eigvecs), axis=0)
    signs = np.sign(eigvecs[rows, np.arange(eigvecs.shape[1])])
    return eigvecs * signs


def simulate_signals(sequence: Sequence, t1_ms: np.ndarray, t2_ms: np.ndarray, *,
                     n_states: int = DEFAULT_N_STATES, device: str | torch.device = "auto",
                     chunk: int = 2048, progress: bool = False) -> np.ndarray:
    """EPG signals (atoms x frames, float32): chunks that fit the cache, one per CPU thread (or one GPU)."""
    dev = resolve_device(device)
    out = np.empty((t1_ms.size, sequence.n_frames), dtype=np.float32)

    def run(start: int) -> None:
        t1 = torch.as_tensor(t1_ms[start : start + chunk], dtype=torch.float32, device=dev)
        t2 = torch.as_tensor(t2_ms[start : start + chunk], dtype=torch.float32, device=dev)
        out[start : start + chunk] = simulate_fisp(sequence, t1, t2, n_states=n_states).cpu().numpy()

    if dev.type == "cuda":
        chunk = max(chunk, 65536)
    map_chunks(run, range(0, t1_ms.size, chunk), dev, desc="EPG", progress=progress)
    return out


def build_dictionary(sequence: Sequence, grid: Grid = Grid(), *, n_states: int = DEFAULT_N_STATES,
                     device: str | torch.device = "auto", progress: bool = False) -> Dictionary:
    """Simulate the grid, compute the SVD basis and the compressed atoms (no cache involved)."""
    t1, t2 = grid.pairs()
    signals = simulate_signals(sequence, t1, t2, n_states=n_states, device=device, progress=progress)
    gram = np.zeros((sequence.n_frames, sequence.n_frames), dtype=np.float64)
    for s in range(0, signals.shape[0], 8192):
        block = signals[s : s + 8192].astype(np.float64)
        gram += block.T @ block
    eigvals, eigvecs = np.linalg.eigh(gram)
    order = np.argsort(eigvals)[::-1]
    singular_values = np.sqrt(np.clip(eigvals[order], 0, None))
    rank = min(STORED_RANK, sequence.n_frames)
    basis = _signed_basis(eigvecs[:, order[:rank]]).astype(np.float32)
    atoms = signals @ basis
    return Dictionary(t1, t2, atoms, basis, singular_values.astype(np.float32), sequence.hash(), grid, n_states)


def load_or_build_dictionary(sequence: Sequence, grid: Grid = Grid(), *, rank: int = DEFAULT_RANK,
                             n_states: int = DEFAULT_N_STATES, device: str | torch.device = "auto",
                             progress: bool = False) -> Dictionary:
    """The rank-``rank`` dictionary, from the on-disk cache when present, else built and cached."""
    if not 1 <= rank <= STORED_RANK:
        raise ValueError(f"rank: must be in 1..{STORED_RANK}, got {rank}")
    path = _cache_path(sequence, grid, n_states)
    f = read_cached(path, ("t1_ms", "t2_ms", "atoms", "basis", "singular_values", "sequence_hash", "n_states"))
    if f is not None:
        full = Dictionary(f["t1_ms"], f["t2_ms"], f["atoms"], f["basis"], f["singular_values"],
                          str(f["sequence_hash"]), grid, int(f["n_states"]))
        logger.debug("dictionary loaded from cache %s", path)
    else:
        logger.info("building dictionary for sequence %s (%s)", sequence.name, grid.key())
        full = build_dictionary(sequence, grid, n_states=n_states, device=device, progress=progress)
        write_cached(path, {"t1_ms": full.t1_ms, "t2_ms": full.t2_ms, "atoms": full.atoms, "basis": full.basis,
                            "singular_values": full.singular_values, "sequence_hash": full.sequence_hash,
                            "n_states": full.n_states})
    return full.truncated(rank)
