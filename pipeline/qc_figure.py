"""The per-study QC figure: mid-brain axial MPRAGE, T1, T2 and PD on the working grid (PNG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (low, high) display range; T1/T2 as in the paper (window/level 2000/1000 and 120/60 ms)
DISPLAY_RANGES = {"T1": (0.0, 2000.0), "T2": (0.0, 120.0), "PD": (0.0, 1.2)}
UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u."}


def qc_figure(path: Path, mprage: np.ndarray, maps: dict[str, np.ndarray], mask: np.ndarray, *, title: str) -> Path:
    """Write the figure for volumes on the working grid (axial slices along axis 2) and return ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("mask: empty, no brain to show")
    k = int(slices[slices.size // 2])
    panels = [("MPRAGE (input)", mprage[:, :, k], (0.0, float(np.percentile(mprage[mask], 99.5))), "gray", "")]
    panels += [(f"{q} ({UNITS[q]})", maps[q][:, :, k], DISPLAY_RANGES[q], "gray" if q == "PD" else "magma", UNITS[q])
               for q in ("T1", "T2", "PD") if q in maps]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (label, image, (lo, hi), cmap, unit) in zip(np.atleast_1d(axes), panels, strict=True):
        # Working grid: i runs to the patient's left, j to posterior: show radiological view (left on right).
        shown = ax.imshow(image.T, cmap=cmap, vmin=lo, vmax=hi, origin="upper", interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
        if unit:
            fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
