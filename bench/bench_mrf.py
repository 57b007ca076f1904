"""MRF physics benchmarks (run on demand): dictionary generation and whole-brain matching.

    .venv/bin/python bench/bench_mrf.py [--voxels 1500000] [--skip-brute-force]

Prints a table. Matching compares the exact branch-and-bound method with the brute-force GEMM on the
same voxels in the same run (the ratio is what to quote; absolute seconds depend on the machine).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import Grid, build_dictionary
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, load_sequence
from pipeline.mrf.simulate import simulate_coefficients


def brain_voxels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(T1, T2) of a whole brain's worth of voxels: WM/GM/CSF with 15-20 % spread."""
    rng = np.random.default_rng(seed)
    tissue = rng.choice(3, n, p=[0.45, 0.40, 0.15])
    t1 = np.array([830.0, 1500.0, 4000.0])[tissue] * np.exp(rng.normal(0, 0.15, n))
    t2 = np.array([80.0, 100.0, 1200.0])[tissue] * np.exp(rng.normal(0, 0.20, n))
    return t1, t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voxels", type=int, default=1_500_000)
    parser.add_argument("--snr", type=float, default=20.0)
    parser.add_argument("--skip-brute-force", action="store_true")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows.append(("device / torch threads", f"{device} / {torch.get_num_threads()}"))

    seq = load_sequence(DEFAULT_SEQUENCE)
    grid = Grid()
    n_atoms = grid.pairs()[0].size
    start = time.perf_counter()
    dictionary = build_dictionary(seq, grid, progress=True)
    build_s = time.perf_counter() - start
    rows.append(("dictionary atoms x frames", f"{n_atoms} x {seq.n_frames}"))
    rows.append(("dictionary build (EPG + SVD), s", f"{build_s:.1f}"))
    rows.append(("atom-frames per second", f"{n_atoms * seq.n_frames / build_s / 1e6:.2f} M"))

    t1, t2 = brain_voxels(args.voxels, seed=0)
    coeffs = simulate_coefficients(seq, dictionary, t1, t2, np.ones_like(t1), lattice_step=0.005)
    rng = np.random.default_rng(1)
    sigma = float(np.linalg.norm(coeffs, axis=1).mean()) / (args.snr * np.sqrt(2 * dictionary.rank))
    voxels = phase_normalise(add_complex_noise(coeffs * np.exp(1j * rng.uniform(-3, 3, args.voxels))[:, None],
                                               sigma, rng))
    start = time.perf_counter()
    matcher = Matcher(dictionary)
    rows.append(("matcher preparation (k-means), s", f"{time.perf_counter() - start:.1f}"))
    start = time.perf_counter()
    fast = matcher.match(voxels)
    fast_s = time.perf_counter() - start
    rows.append((f"match {args.voxels} voxels, exact branch and bound, s", f"{fast_s:.2f}"))
    if not args.skip_brute_force:
        start = time.perf_counter()
        brute = matcher.brute_force(voxels)
        brute_s = time.perf_counter() - start
        rows.append((f"match {args.voxels} voxels, brute-force GEMM, s", f"{brute_s:.2f}"))
        rows.append(("speed-up (same run)", f"{brute_s / fast_s:.1f}x"))
        differ = int(np.sum(fast.index != brute.index))
        rows.append(("indices differing (float32 ties)", f"{differ} ({np.abs(fast.score - brute.score).max():.1e})"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
