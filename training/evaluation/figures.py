"""Evaluation figures (PNG, Agg, no pyplot state): regional scatter, Bland-Altman, mid-brain axial maps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from training.evaluation.agreement import Agreement
from training.evaluation.subjects import SubjectMaps

WINDOWS_MS: dict[str, tuple[float, float]] = {"T1": (2000.0, 1000.0), "T2": (120.0, 60.0)}
"""Display window and level (ms) per quantity, as in the paper: T1 0-2000 ms, T2 0-120 ms."""

_DPI = 120


def _display_range(quantity: str, image: np.ndarray) -> tuple[float, float]:
    if quantity in WINDOWS_MS:
        window, level = WINDOWS_MS[quantity]
        return level - window / 2, level + window / 2
    finite = image[np.isfinite(image)]
    return (0.0, float(np.percentile(finite, 99))) if finite.size else (0.0, 1.0)


def _ci_text(name: str, value: float, low: float, high: float, digits: int, unit: str = "") -> str:
    return f"{name} {value:.{digits}f}{unit} ({low:.{digits}f} to {high:.{digits}f})"


def scatter_figure(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], agreements: Mapping[str, Agreement],
                   reference: str, other: str, path: Path) -> Path:
    """Regional means, ``other`` against ``reference``, one panel per quantity, identity line, CCC (95 % CI)."""
    fig = Figure(figsize=(5.0 * len(pairs), 5.0), dpi=_DPI, layout="constrained")
    for ax, (quantity, (x, y)) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs.items(), strict=True):
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter(x[ok], y[ok], s=8, alpha=0.6, edgecolors="none")
        lo, hi = float(min(x[ok].min(), y[ok].min())), float(max(x[ok].max(), y[ok].max()))
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=1, label="identity")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{reference} {quantity} (ms)")
        ax.set_ylabel(f"{other} {quantity} (ms)")
        a = agreements[quantity]
        ax.set_title(f"{quantity}: regional means, n = {a.n_pairs}")
        ax.text(0.03, 0.97, _ci_text("CCC", a.ccc.value, a.ccc.low, a.ccc.high, 4) + "\n"
                + _ci_text("mean diff", a.mean_difference.value, a.mean_difference.low, a.mean_difference.high,
                           2, " ms"), transform=ax.transAxes, va="top", fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path)
    return path


def bland_altman_figure(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], agreements: Mapping[str, Agreement],
                        reference: str, other: str, path: Path) -> Path:
    """Mean of the pair against difference (reference - other), mean difference and 1.96 SD limits."""
    fig = Figure(figsize=(5.5 * len(pairs), 4.5), dpi=_DPI, layout="constrained")
    for ax, (quantity, (x, y)) in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs.items(), strict=True):
        ok = np.isfinite(x) & np.isfinite(y)
        ax.scatter((x[ok] + y[ok]) / 2, x[ok] - y[ok], s=8, alpha=0.6, edgecolors="none")
        a = agreements[quantity]
        low, high = a.limits_of_agreement
        ax.axhline(a.mean_difference.value, color="black", lw=1,
                   label=f"mean {a.mean_difference.value:.2f} ms")
        for limit in (low, high):
            ax.axhline(limit, color="black", lw=1, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        ax.plot([], [], color="black", ls="--", label=f"1.96 SD: {low:.2f} to {high:.2f} ms")
        ax.set_xlabel(f"mean of {reference} and {other} {quantity} (ms)")
        ax.set_ylabel(f"{reference} - {other} {quantity} (ms)")
        ax.set_title(f"{quantity}: Bland-Altman of regional means")
        ax.legend(loc="best", fontsize=8)
    fig.savefig(path)
    return path


def axial_slices(subject: SubjectMaps, map_sets: Sequence[str], quantities: Sequence[str],
                 *, margin: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """Mid-brain axial slices (last array axis, the slice with brain nearest the brain mask's centroid),
    cropped to the brain with ``margin`` voxels, NaN outside the mask, transposed for display (rows =
    second array axis)."""
    if subject.labels.ndim != 3:
        raise ValueError(f"subject.labels: must be 3-D, got shape {subject.labels.shape}")
    subject.require(map_sets, quantities)
    mask = subject.brain_mask
    if not mask.any():
        raise ValueError(f"subject.brain_mask: empty for subject {subject.subject_id}")
    with_brain = np.flatnonzero(mask.any(axis=(0, 1)))  # a mask of every n-th slice has gaps
    k = int(with_brain[np.argmin(np.abs(with_brain - np.nonzero(mask)[2].mean()))])
    plane = mask[:, :, k]
    ii, jj = np.nonzero(plane)
    crop = (slice(max(ii.min() - margin, 0), ii.max() + margin + 1),
            slice(max(jj.min() - margin, 0), jj.max() + margin + 1))
    return {m: {q: np.where(plane, np.asarray(subject.maps[m][q])[:, :, k], np.nan)[crop].T for q in quantities}
            for m in map_sets}


def maps_figure(slices: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str) -> Path:
    """Map sets side by side (columns), one row per quantity, at the paper's window/level."""
    map_sets = list(slices)
    quantities = list(next(iter(slices.values())))
    first = slices[map_sets[0]][quantities[0]]
    aspect = first.shape[0] / first.shape[1]
    fig = Figure(figsize=(3.2 * len(map_sets) + 1.2, 3.2 * aspect * len(quantities) + 0.6), dpi=_DPI,
                 layout="constrained")
    axes = fig.subplots(len(quantities), len(map_sets), squeeze=False)
    for row, quantity in enumerate(quantities):
        vmin, vmax = _display_range(quantity, first)
        for col, map_set in enumerate(map_sets):
            ax = axes[row, col]
            image = ax.imshow(slices[map_set][quantity], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(map_set)
            if col == 0:
                ax.set_ylabel(quantity)
        unit = f"{quantity} (ms)" if quantity in WINDOWS_MS else quantity
        fig.colorbar(image, ax=axes[row, :].tolist(), shrink=0.8, label=unit)
    fig.suptitle(title)
    fig.savefig(path)
    return path
