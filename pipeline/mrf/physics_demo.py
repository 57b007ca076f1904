"""The physics round trip on a numerical head phantom: truth -> EPG/SVD -> noise -> match -> compare."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.matching import Matcher, match_volume
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, load_sequence
from pipeline.mrf.simulate import simulate_coefficients
from pipeline.volume_io import save_volume

# name: (T1 ms, T2 ms, PD, T1 tolerance, T2 tolerance); 3T values after Stanisz 2005 / Wansapura 1999.
REGIONS: dict[str, tuple[float, float, float, float, float]] = {
    "white matter": (830.0, 80.0, 0.70, 0.05, 0.08),
    "grey matter": (1500.0, 100.0, 0.80, 0.05, 0.08),
    "deep grey": (1300.0, 90.0, 0.80, 0.05, 0.08),
    "lesion": (1200.0, 150.0, 0.85, 0.05, 0.08),
    "CSF": (4000.0, 1500.0, 1.00, 0.10, 0.30),
}
DEMO_SNR = 20.0


@dataclass
class DemoReport:
    """Regional medians of the recovered maps against the truth."""

    rows: list[tuple[str, float, float, float, float, bool]] = field(default_factory=list)
    figure: Path | None = None

    @property
    def plausible(self) -> bool:
        return bool(self.rows) and all(ok for *_, ok in self.rows)

    def table(self) -> str:
        lines = [f"{'region':<14}{'T1 true':>9}{'T1 found':>10}{'T2 true':>9}{'T2 found':>10}  ok"]
        for name, t1, t1_found, t2, t2_found, ok in self.rows:
            lines.append(f"{name:<14}{t1:>9.0f}{t1_found:>10.0f}{t2:>9.0f}{t2_found:>10.0f}  {'yes' if ok else 'NO'}")
        return "\n".join(lines)


def head_phantom(size: int = 160) -> np.ndarray:
    """Region labels (0 = air, 1.. in REGIONS order) of an axial slice of ellipses."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]

    def inside(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1

    names = list(REGIONS)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[inside(0, 0, 0.80, 0.92)] = names.index("CSF") + 1
    labels[inside(0, 0, 0.74, 0.86)] = names.index("grey matter") + 1
    labels[inside(0, 0, 0.62, 0.74)] = names.index("white matter") + 1
    for side in (-1, 1):
        labels[inside(0.22 * side, 0.05, 0.10, 0.14)] = names.index("deep grey") + 1
        labels[inside(0.09 * side, -0.15, 0.06, 0.22)] = names.index("CSF") + 1
    labels[inside(0.35, -0.45, 0.07, 0.07)] = names.index("lesion") + 1
    return labels


def run_physics_demo(workdir: Path, *, device: str = "auto", seed: int = 0) -> DemoReport:
    """Simulate, compress, add noise at SNR 20, match, write maps and a QC figure, report."""
    seq = load_sequence(DEFAULT_SEQUENCE)
    dictionary = load_or_build_dictionary(seq, device=device, progress=True)
    labels = head_phantom()[:, :, None]
    truth = {name: np.zeros(labels.shape, np.float32) for name in ("T1", "T2", "PD")}
    for i, (t1, t2, pd, *_tol) in enumerate(REGIONS.values(), start=1):
        truth["T1"][labels == i], truth["T2"][labels == i], truth["PD"][labels == i] = t1, t2, pd
    coeffs = simulate_coefficients(seq, dictionary, truth["T1"], truth["T2"], truth["PD"], device=device)
    mask = labels > 0
    rng = np.random.default_rng(seed)
    level = float(np.linalg.norm(coeffs[mask], axis=-1).mean())
    coil_phase = np.exp(1j * rng.uniform(-np.pi, np.pi))
    noisy = add_complex_noise(coeffs * coil_phase, level / (DEMO_SNR * np.sqrt(2 * dictionary.rank)), rng)
    maps = match_volume(phase_normalise(noisy), mask, Matcher(dictionary, device=device))
    affine = np.diag([1.5, 1.5, 5.0, 1.0])
    workdir.mkdir(parents=True, exist_ok=True)
    for name, values in maps.items():
        save_volume(workdir / f"{name}.nii.gz", values, affine)
    report = DemoReport()
    for i, (name, (t1, t2, _pd, tol1, tol2)) in enumerate(REGIONS.items(), start=1):
        sel = labels == i
        t1_found, t2_found = float(np.median(maps["T1"][sel])), float(np.median(maps["T2"][sel]))
        ok = abs(t1_found / t1 - 1) <= tol1 and abs(t2_found / t2 - 1) <= tol2
        report.rows.append((name, t1, t1_found, t2, t2_found, ok))
    report.figure = _qc_figure(workdir / "qc.png", truth, maps)
    return report


def _qc_figure(path: Path, truth: dict[str, np.ndarray], found: dict[str, np.ndarray]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = {"T1": (0, 2000), "T2": (0, 120), "PD": (0, 1.2)}
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for col, (name, (lo, hi)) in enumerate(windows.items()):
        for row, (title, maps) in enumerate((("truth", truth), ("matched", found))):
            ax = axes[row, col]
            im = ax.imshow(maps[name][:, :, 0], cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"{name} {title}")
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
