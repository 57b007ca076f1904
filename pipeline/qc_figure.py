"""The per-study QC figure: mid-brain axial MPRAGE, T1, T2, PD and match quality on the working grid (PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from pipeline.quality import StudyVerdict

# (low, high) display range; T1/T2 as in the paper (window/level 2000/1000 and 120/60 ms)
DISPLAY_RANGES = {"T1": (0.0, 2000.0), "T2": (0.0, 120.0), "PD": (0.0, 1.2)}
UNITS = {"T1": "ms", "T2": "ms", "PD": "a.u."}


def qc_figure(path: Path, mprage: np.ndarray, maps: dict[str, np.ndarray], mask: np.ndarray, *, title: str,
              quality: np.ndarray | None = None, verdict: StudyVerdict | None = None) -> Path:
    """Write the figure for volumes on the working grid (axial slices along axis 2) and return ``path``.

    ``quality``: a Q map (:mod:`pipeline.quality`) shown as a further panel; ``verdict``: its summary
    under the title, in red when the study is flagged.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import Colormap

    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("mask: empty, no brain to show")
    k = int(slices[slices.size // 2])
    top = float(np.percentile(mprage[mask], 99.5))
    panels: list[tuple[str, np.ndarray, tuple[float, float], str | Colormap, str]] = [
        ("MPRAGE (input)", mprage[:, :, k], (0.0, top), "gray", "")]
    panels += [(f"{q} ({UNITS[q]})", maps[q][:, :, k], DISPLAY_RANGES[q], "gray" if q == "PD" else "magma", UNITS[q])
               for q in ("T1", "T2", "PD") if q in maps]
    if quality is not None:
        # outside the mask in black, not in the colour of Q = 0
        panels.append(("match quality Q", np.where(mask[:, :, k], quality[:, :, k], np.nan), (0.0, 1.0),
                       plt.get_cmap("viridis").with_extremes(bad="black"), "Q"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), constrained_layout=True)
    for ax, (label, image, (lo, hi), cmap, unit) in zip(np.atleast_1d(axes), panels, strict=True):
        # Working grid: i runs to the patient's left, j to posterior: show radiological view (left on right).
        shown = ax.imshow(image.T, cmap=cmap, vmin=lo, vmax=hi, origin="upper", interpolation="nearest")
        ax.set_title(label, fontsize=10)
        ax.axis("off")
        if unit:
            fig.colorbar(shown, ax=ax, shrink=0.8)
    if verdict is None:
        fig.suptitle(title, fontsize=9)
    else:
        width = int(32 * len(panels))  # characters per line at font size 9
        lines = textwrap.wrap(verdict.summary(), width)
        fig.suptitle("\n".join([title, *lines]), fontsize=9, color="black" if verdict.ok else "darkred")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
