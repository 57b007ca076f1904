"""Partial-volume conventions: what a voxel's T1 and T2 *are* when two tissues share it, and how far apart they lie.

For a voxel of two compartments a and b with proton-density-weighted shares (1 - s, s):

- **rate**: the weighted average of the relaxation rates, 1/T = (1 - s)/T_a + s/T_b (fast exchange; the truth the
  independent simulator in ``research/indep_phantom`` writes);
- **geometric**: the weighted geometric mean, log T = (1 - s) log T_a + s log T_b (world v1's truth, lambda = 0);
- **match**: the dictionary match of (1 - s) S(T1_a, T2_a) + s S(T1_b, T2_b), the weighted sum of the compartments'
  MRF signals (slow exchange: what an MRF acquisition of that voxel reports).

``python -m research.pv_conventions DATASET`` reads each subject's truth maps (written in the rate convention, as
``research/indep_phantom`` does) and tissue values, recovers each voxel's share from its truth T1 (two-class mixing:
CSF/GM below grey matter's rate, GM/WM above it), and prints the mean over the GM and WM regions' voxels under each
convention, from the same shares.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.mrf.dictionary import Dictionary, load_or_build_dictionary
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import Sequence, load_sequence
from pipeline.mrf.simulate import simulate_coefficients
from pipeline.volume_io import load_volume
from training.evaluation.subjects import tissue_of_region
from training.phantom.regions import LABEL_NAMES

SHARES = np.linspace(0.0, 1.0, 201)
"""Share grid on which the matched mixture is tabulated (0.5 % steps; voxels interpolate linearly)."""


@dataclass(frozen=True)
class Tissue:
    """A compartment's relaxation times in ms."""

    t1_ms: float
    t2_ms: float


def rate_average(a: Tissue, b: Tissue, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1, T2 of the fast-exchange mixture with share ``share`` of ``b``."""
    s = np.asarray(share, dtype=np.float64)
    return 1 / ((1 - s) / a.t1_ms + s / b.t1_ms), 1 / ((1 - s) / a.t2_ms + s / b.t2_ms)


def geometric_mean(a: Tissue, b: Tissue, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1, T2 as the weighted geometric mean with share ``share`` of ``b``."""
    s = np.asarray(share, dtype=np.float64)
    return a.t1_ms ** (1 - s) * b.t1_ms ** s, a.t2_ms ** (1 - s) * b.t2_ms ** s


def matched_mixture(sequence: Sequence, dictionary: Dictionary, matcher: Matcher, a: Tissue, b: Tissue,
                    share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1, T2 of the dictionary match of the signal sum (1 - s) S(a) + s S(b) (exhaustive search)."""
    atoms = simulate_coefficients(sequence, dictionary, np.array([a.t1_ms, b.t1_ms]), np.array([a.t2_ms, b.t2_ms]),
                                  np.ones(2), device="cpu")
    s = np.asarray(share, dtype=np.float64).reshape(-1, 1)
    result = matcher.brute_force(((1 - s) * atoms[0] + s * atoms[1]).astype(np.complex64))
    return np.asarray(result.t1_ms, np.float64).reshape(np.shape(share)), \
        np.asarray(result.t2_ms, np.float64).reshape(np.shape(share))


def shares_from_t1(t1_ms: np.ndarray, gm: Tissue, csf: Tissue, wm: Tissue) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel: whether it mixes GM with CSF (else with WM), and the other tissue's share, from a rate-convention T1
    (the inverse of :func:`rate_average` for T1, clipped to [0, 1])."""
    r1 = 1 / np.asarray(t1_ms, dtype=np.float64)
    with_csf = r1 <= 1 / gm.t1_ms
    csf_share = (1 / gm.t1_ms - r1) / (1 / gm.t1_ms - 1 / csf.t1_ms)
    wm_share = (r1 - 1 / gm.t1_ms) / (1 / wm.t1_ms - 1 / gm.t1_ms)
    return with_csf, np.clip(np.where(with_csf, csf_share, wm_share), 0, 1)


def _tissue(values: Mapping[str, Mapping[str, float]], key: str) -> Tissue:
    return Tissue(float(values[key]["t1_ms"]), float(values[key]["t2_ms"]))


def subject_table(subject_dir: Path, entry: Mapping[str, object], sequence: Sequence, dictionary: Dictionary,
                  matcher: Matcher, slice_step: int = 4) -> pd.DataFrame:
    """One row per GM or WM region: voxel means of the truth and of each convention's T1 and T2, the mean CSF share."""
    tissues = entry.get("tissues")
    if not isinstance(tissues, Mapping) or not {"gm", "csf", "wm"} <= set(tissues):
        raise ValueError(f"{subject_dir.name}: the manifest entry has no gm, csf and wm tissue values")
    gm, csf, wm = (_tissue(tissues, k) for k in ("gm", "csf", "wm"))
    matched = {k: matched_mixture(sequence, dictionary, matcher, gm, other, SHARES) for k, other in
               (("csf", csf), ("wm", wm))}
    t1, _ = load_volume(subject_dir / "T1.nii.gz")
    t2, _ = load_volume(subject_dir / "T2.nii.gz")
    labels = load_volume(subject_dir / "labels.nii.gz")[0].astype(np.int32)
    brain = load_volume(subject_dir / "brain_mask.nii.gz")[0] > 0
    with_brain = np.where(brain.any(axis=(0, 1)))[0]
    keep = np.zeros(brain.shape[2], bool)
    keep[with_brain[::slice_step]] = True
    mask = brain & keep[None, None, :] & (labels > 0) & (t1 > 0)
    with_csf, share = shares_from_t1(t1[mask], gm, csf, wm)
    conventions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, fn in (("rate", rate_average), ("geometric", geometric_mean)):
        c, w = fn(gm, csf, share), fn(gm, wm, share)
        conventions[name] = (np.where(with_csf, c[0], w[0]), np.where(with_csf, c[1], w[1]))
    m1, m2 = (np.where(with_csf, np.interp(share, SHARES, matched["csf"][q]),
                       np.interp(share, SHARES, matched["wm"][q])) for q in (0, 1))
    conventions["match"] = (m1, m2)
    lab, truth = labels[mask], (t1[mask], t2[mask])
    rows: list[dict[str, object]] = []
    for label, name in enumerate(LABEL_NAMES, start=1):
        tissue, sel = tissue_of_region(name), lab == label
        if tissue not in ("GM", "WM") or not sel.any():
            continue
        row: dict[str, object] = {"subject": subject_dir.name, "region": name, "tissue": tissue,
                                  "n_voxels": int(sel.sum()),
                                  "csf_share": float(np.where(with_csf, share, 0)[sel].mean())}
        for q, quantity in enumerate(("T1", "T2")):
            row[f"truth_{quantity}"] = float(truth[q][sel].mean())
            for convention, maps in conventions.items():
                row[f"{convention}_{quantity}"] = float(maps[q][sel].mean())
        rows.append(row)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per tissue: the mean over regions of the truth and each convention, and each convention's % from the truth."""
    out = table.groupby("tissue")[[c for c in table.columns if c.endswith(("_T1", "_T2")) or c == "csf_share"]].mean()
    for quantity in ("T1", "T2"):
        for convention in ("rate", "geometric", "match"):
            out[f"{convention}_{quantity}_%"] = 100 * (out[f"{convention}_{quantity}"] / out[f"truth_{quantity}"] - 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", type=Path, help="dataset folder (manifest.json with subjects and tissue values)")
    parser.add_argument("--slice-step", type=int, default=4, help="every N-th axial slice with brain (as evaluate)")
    parser.add_argument("--csv", type=Path, default=None, help="write the per-region table here")
    args = parser.parse_args(argv)
    manifest = json.loads((args.dataset / "manifest.json").read_text())
    sequence = load_sequence(manifest.get("sequence", {}).get("name", "fisp_ir_tr9.3_1000"))
    dictionary = load_or_build_dictionary(sequence, rank=4, device="cpu")
    matcher = Matcher(dictionary, device="cpu")
    tables = [subject_table(args.dataset / e["id"], e, sequence, dictionary, matcher, args.slice_step)
              for e in manifest["subjects"]]
    table = pd.concat(tables, ignore_index=True)
    if args.csv:
        table.to_csv(args.csv, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(summary(table).round(1).to_string())


if __name__ == "__main__":
    main()
