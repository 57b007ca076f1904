"""Dictionary matching: maximum normalised inner product in the K-dimensional subspace.

For a voxel's coefficients d (complex) and atoms a (real), the match is argmax_a |<a/|a|, d>|, the
proton density is |<a/|a|, d>| / |a|. Two implementations give the same answer:

* :func:`match_brute_force`: every voxel against every atom, chunked GEMMs (the reference);
* :func:`match`: exact branch and bound. Atoms are clustered (k-means on the unit sphere); for a unit
  voxel vector d, the Cauchy-Schwarz inequality bounds every atom a of cluster g by
  |<a, d>| <= |<c_g, d>| + r_g, with c_g the cluster centre and r_g = max |a - c_g|. Each voxel is
  matched exactly within its most promising cluster, then only against clusters whose bound beats
  that score. Nothing that could win is skipped, so the argmax is the brute-force argmax (up to
  exact ties within float32 rounding).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.vq import kmeans2

from pipeline.mrf.dictionary import Dictionary, cache_dir
from pipeline.mrf.epg import resolve_device
from pipeline.npz_cache import read_cached, write_cached
from pipeline.parallel import map_chunks

logger = logging.getLogger(__name__)
CLUSTER_CACHE_FORMAT = 1

# Slack on every bound so that float32 rounding in the scores can never prune the winner.
BOUND_SLACK = 1e-5
ANGLE_SLACK = 1e-3


@dataclass(frozen=True)
class MatchResult:
    """Per-voxel match: the atom index, its T1/T2 (ms), PD (projection scale) and the score in [0, 1]."""

    index: np.ndarray
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    pd: np.ndarray
    score: np.ndarray


def _as_real_pair(coeffs: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-normalised voxels as stacked real and imaginary parts (2V x K), and the voxel norms.

    |<a, d>| does not change when d is multiplied by a unit phase, so each voxel is first rotated to
    put as much of its energy as possible into the real part (phase -arg(sum d_k^2) / 2). For real
    atoms this leaves only noise in the imaginary part, which keeps the cluster bounds tight.
    """
    c = torch.as_tensor(np.ascontiguousarray(coeffs), device=device).to(torch.complex64)
    norm = torch.linalg.vector_norm(c, dim=1)
    phase = torch.exp(-0.5j * torch.angle((c * c).sum(dim=1)))
    unit = c * (phase / torch.where(norm > 0, norm, 1)).unsqueeze(1)
    return torch.cat([unit.real, unit.imag], dim=0), norm


def _clusters(unit: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means centres and labels of the unit atoms; cached on disk beside the dictionaries (keyed by the
    atoms' bytes), since clustering costs ~15 s per dictionary and matching starts with it."""
    key = hashlib.sha256(unit.tobytes() + f"{CLUSTER_CACHE_FORMAT}/{k}/{seed}".encode()).hexdigest()[:20]
    path = cache_dir() / f"clusters-{key}.npz"
    stored = read_cached(path, ("centres", "labels"))
    if stored is not None:
        return stored["centres"], stored["labels"]
    centres, labels = kmeans2(unit.astype(np.float64), k, seed=seed, minit="++", iter=20)
    write_cached(path, {"centres": centres, "labels": labels})
    return centres, labels


class Matcher:
    """Matching against one dictionary, with the per-dictionary preparation done once."""

    def __init__(self, dictionary: Dictionary, *, device: str | torch.device = "auto",
                 n_clusters: int | None = None, seed: int = 0) -> None:
        self.dictionary = dictionary
        self.device = resolve_device(device)
        atoms = dictionary.atoms.astype(np.float32)
        self.atom_norm = np.linalg.norm(atoms, axis=1)
        if np.any(self.atom_norm <= 0):
            raise ValueError("dictionary: contains an atom with zero norm")
        unit = atoms / self.atom_norm[:, None]
        # Matching is sign-invariant for real atoms: put all atoms in the half-space SV1 >= 0.
        unit = unit * np.where(unit[:, :1] < 0, -1.0, 1.0).astype(np.float32)
        self._unit = torch.as_tensor(unit, device=self.device)
        k = n_clusters or int(np.clip(np.sqrt(unit.shape[0]) * 1.25, 1, 1024))
        centres, labels = _clusters(unit, k, seed)
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=k)
        keep = counts > 0
        centres, counts = centres[keep], counts[keep]
        labels_sorted = np.repeat(np.arange(centres.shape[0]), counts)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        cos = np.clip(np.einsum("ak,ak->a", unit[order].astype(np.float64), centres[labels_sorted]), -1, 1)
        angle = np.zeros(centres.shape[0])
        np.maximum.at(angle, labels_sorted, np.arccos(cos))
        self._order = torch.as_tensor(order, device=self.device)
        self._sorted_unit = self._unit[self._order]
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._centres = torch.as_tensor(centres, dtype=torch.float32, device=self.device)
        angle = angle + ANGLE_SLACK
        self._cos_sin_angle = torch.as_tensor(np.stack([np.cos(angle), np.sin(angle)]), dtype=torch.float32,
                                              device=self.device)

    @property
    def n_clusters(self) -> int:
        return int(self._centres.shape[0])

    def _result(self, index: torch.Tensor, score: torch.Tensor, norm: torch.Tensor) -> MatchResult:
        idx = index.cpu().numpy()
        s = score.cpu().numpy()
        d = self.dictionary
        return MatchResult(idx, d.t1_ms[idx], d.t2_ms[idx], s * norm.cpu().numpy() / self.atom_norm[idx], s)

    def brute_force(self, coeffs: np.ndarray, *, chunk: int = 2048) -> MatchResult:
        """Reference: all voxels (V x K complex) against all atoms, in chunks of ``chunk`` voxels."""
        return self._run(coeffs, chunk, self._brute_force_chunk, sorted_atoms=False)

    def match(self, coeffs: np.ndarray, *, chunk: int = 16384) -> MatchResult:
        """Exact branch-and-bound match of voxels (V x K complex); same argmax as brute force."""
        return self._run(coeffs, chunk, self._match_chunk, sorted_atoms=True)

    def _run(self, coeffs: np.ndarray, chunk: int,
             method: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
             *, sorted_atoms: bool) -> MatchResult:
        pair, norm = _as_real_pair(coeffs, self.device)
        n = norm.shape[0]
        index = torch.empty(n, dtype=torch.int64, device=self.device)
        score = torch.empty(n, dtype=torch.float32, device=self.device)

        def run(s: int) -> None:
            e = min(s + chunk, n)
            index[s:e], score[s:e] = method(pair[s:e], pair[n + s : n + e])

        if self.device.type == "cuda":
            chunk = max(chunk, 262144)
        with torch.inference_mode():
            map_chunks(run, range(0, n, chunk), self.device)
        return self._result(self._order[index] if sorted_atoms else index, score, norm)

    def _brute_force_chunk(self, re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = (re @ self._unit.T).square_().add_((im @ self._unit.T).square_())
        best, arg = sq.max(dim=1)
        return arg, best.sqrt_()

    def _scores_in_cluster(self, re: torch.Tensor, im: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        atoms = self._sorted_unit[self._offsets[g] : self._offsets[g + 1]]
        sq = (re @ atoms.T).square_() + (im @ atoms.T).square_()
        best, arg = sq.max(dim=1)
        return best.sqrt_(), arg + int(self._offsets[g])

    def _match_chunk(self, re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Branch and bound for one chunk of unit voxels d = x + iy (x = ``re``, y = ``im``).

        With a real, |<a, d>|^2 = (a.x)^2 + (a.y)^2. An atom within angle theta_g of the unit centre
        c_g is at least phi - theta_g away from x (phi = angle(c_g, +-x)), so
        |a.x| <= |x| cos(max(0, phi - theta_g)), and the same for y. A cheap necessary test on all
        clusters uses |a.y| <= |y|: cluster g can only beat a score s if
        cos(phi) > cos(theta_g + psi), with cos(psi) = sqrt(s^2 - |y|^2) / |x|; the pairs that pass
        are checked against the full bound before their atoms are scored.
        """
        rows = torch.arange(re.shape[0], device=re.device)
        x_len = torch.linalg.vector_norm(re, dim=1)
        y_len = torch.linalg.vector_norm(im, dim=1)
        cos_phi = (re / torch.where(x_len > 0, x_len, 1).unsqueeze(1)) @ self._centres.T
        cos_phi.abs_()
        first = cos_phi.argmax(dim=1)
        best = torch.full(first.shape, -1.0, dtype=torch.float32, device=re.device)
        arg = torch.zeros_like(first)
        self._score_pairs(re, im, first, rows, best, arg)
        # Pass 2: every other cluster that could still hold a better atom.
        cos_psi = (best.square() - y_len.square()).clamp_(min=0.0).sqrt_()
        cos_psi = (cos_psi / x_len).clamp_(max=1.0).nan_to_num_(1.0)
        sin_psi = (1.0 - cos_psi.square()).clamp_(min=0.0).sqrt_()
        threshold = torch.stack([cos_psi, -sin_psi], dim=1) @ self._cos_sin_angle
        candidates = cos_phi > threshold.sub_(BOUND_SLACK)
        candidates[rows, first] = False
        g, v = candidates.nonzero().T.flip(0)
        cos_x = cos_phi[v, g]
        cos_y = ((im[v] * self._centres[g]).sum(dim=1).abs_() / torch.where(y_len[v] > 0, y_len[v], 1))
        bound = (self._cap_bound(cos_x, g) * x_len[v]).square_() + (self._cap_bound(cos_y, g) * y_len[v]).square_()
        keep = bound.sqrt_().add_(BOUND_SLACK) > best[v]
        self._score_pairs(re, im, g[keep], v[keep], best, arg)
        return arg, best

    def _cap_bound(self, cos_phi: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        """cos(max(0, phi - theta_g)): the largest |cos| between a direction and any atom of cluster g."""
        cos_t, sin_t = self._cos_sin_angle[0, cluster], self._cos_sin_angle[1, cluster]
        cos_phi = cos_phi.clamp(max=1.0)
        sin_phi = (1.0 - cos_phi.square()).clamp_(min=0.0).sqrt_()
        return torch.where(cos_phi >= cos_t, 1.0, cos_phi * cos_t + sin_phi * sin_t)

    def _score_pairs(self, re: torch.Tensor, im: torch.Tensor, clusters: torch.Tensor, voxels: torch.Tensor,
                     best: torch.Tensor, arg: torch.Tensor) -> None:
        """Score each voxel against all atoms of its paired cluster, updating ``best``/``arg`` in place."""
        order = torch.argsort(clusters, stable=True)
        counts = torch.bincount(clusters, minlength=self.n_clusters).tolist()
        for g, v in enumerate(voxels[order].split(counts)):
            if v.numel() == 0:
                continue
            sc, at = self._scores_in_cluster(re[v], im[v], g)
            better = sc > best[v]
            best[v] = torch.where(better, sc, best[v])
            arg[v] = torch.where(better, at, arg[v])


def match_volume(coeffs: np.ndarray, mask: np.ndarray | None, matcher: Matcher, *,
                 brute_force: bool = False) -> dict[str, np.ndarray]:
    """T1, T2 (ms) and PD maps for a coefficient volume (X, Y, Z, K); zero outside ``mask``.

    Without a mask, every voxel with a non-zero coefficient vector is matched.
    """
    if mask is None:
        mask = np.any(coeffs != 0, axis=-1)
    if mask.shape != coeffs.shape[:-1]:
        raise ValueError(f"mask: shape {mask.shape} does not match coefficients {coeffs.shape[:-1]}")
    k = matcher.dictionary.rank
    if coeffs.shape[-1] < k:
        raise ValueError(f"coeffs: {coeffs.shape[-1]} components, dictionary needs {k}")
    voxels = coeffs[mask][:, :k]
    result = matcher.brute_force(voxels) if brute_force else matcher.match(voxels)
    maps = {}
    for name, values in (("T1", result.t1_ms), ("T2", result.t2_ms), ("PD", result.pd)):
        out = np.zeros(mask.shape, dtype=np.float32)
        out[mask] = values
        maps[name] = out
    return maps
