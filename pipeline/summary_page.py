"""The study's summary page for a PACS without SR support: the QC panels and the regional T1/T2 table on one
RGB image, marked "not for diagnosis". No patient identity is drawn on it (the DICOM header carries that)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.quality import StudyVerdict
from pipeline.regions import RegionStats

PAGE_WIDTH_PX = 1600
PAGE_DPI = 100
NOTE_LINE_CHARS = 170  # a model's reading note, wrapped to lines of this length under the model's name
NOTE_LINE_IN = 0.22
NOT_FOR_DIAGNOSIS = "synthMRF summary - NOT FOR DIAGNOSIS: maps synthesised from a T1-weighted series, see the report"


def _table_rows(stats: Sequence[RegionStats]) -> list[list[str]]:
    """One row per structure: T1 and T2 mean +- SD (ms) left | right (or both for unsided), and ml."""
    by_structure: dict[str, dict[str, RegionStats]] = {}
    for s in stats:
        by_structure.setdefault(s.region.structure.name, {})[s.region.side or "both"] = s
    def cell(sides: dict[str, RegionStats], side: str, q: str) -> str:
        s = sides.get(side)
        return "" if s is None or q not in s.values else f"{s.values[q].mean:.0f} ± {s.values[q].sd:.0f}"

    rows = []
    for name, sides in by_structure.items():
        ml = sum(s.volume_ml for s in sides.values())
        if "both" in sides:
            rows.append([f"{name} (midline)", cell(sides, "both", "T1"), "", cell(sides, "both", "T2"), "",
                         f"{ml:.1f}"])
        else:
            rows.append([name, cell(sides, "left", "T1"), cell(sides, "right", "T1"), cell(sides, "left", "T2"),
                         cell(sides, "right", "T2"), f"{ml:.1f}"])
    return rows


def save_png(path: Path, page: np.ndarray) -> Path:
    """Write an RGB page as PNG."""
    import matplotlib.pyplot as plt

    plt.imsave(path, page)
    return path


def summary_page(qc_png: Path, stats: Sequence[RegionStats], *, model_label: str,
                 verdict: StudyVerdict | None = None, reading_note: str = "") -> np.ndarray:
    """The page as an (H, W, 3) uint8 RGB array, ``PAGE_WIDTH_PX`` wide: the header (with the model's
    ``reading_note`` under its name), the QC figure, the regional table (``stats``: per-region statistics of
    :func:`pipeline.regions.region_statistics`)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    qc = plt.imread(str(qc_png))
    rows = _table_rows(stats)
    width_in = PAGE_WIDTH_PX / PAGE_DPI
    qc_height_in = width_in * qc.shape[0] / qc.shape[1]
    table_height_in = 0.28 * (len(rows) + 2) + 0.6
    note_lines = textwrap.wrap(f"How to read these maps: {reading_note}", NOTE_LINE_CHARS) if reading_note else []
    header_in = 0.9 + NOTE_LINE_IN * len(note_lines)
    total = header_in + qc_height_in + table_height_in
    fig = plt.figure(figsize=(width_in, total), dpi=PAGE_DPI)
    fig.text(0.5, 1 - 0.35 / total, NOT_FOR_DIAGNOSIS, ha="center", va="center", fontsize=14, color="darkred",
             weight="bold")
    status = "" if verdict is None else ("  |  quality: ok" if verdict.ok else "  |  FLAGGED: " + verdict.summary())
    fig.text(0.5, 1 - 0.7 / total, f"model {model_label}{status}"[:200], ha="center", va="center", fontsize=10)
    for i, line in enumerate(note_lines):
        fig.text(0.5, 1 - (0.95 + NOTE_LINE_IN * i) / total, line, ha="center", va="center", fontsize=10,
                 color="darkred")
    image_ax = fig.add_axes((0.0, (table_height_in) / total, 1.0, qc_height_in / total))
    image_ax.imshow(qc)
    image_ax.axis("off")
    table_ax = fig.add_axes((0.03, 0.01, 0.94, (table_height_in - 0.1) / total))
    table_ax.axis("off")
    if rows:
        table = table_ax.table(cellText=rows, loc="upper center", cellLoc="center",
                               colLabels=["region (AAL3)", "T1 left (ms)", "T1 right (ms)", "T2 left (ms)",
                                          "T2 right (ms)", "volume (ml)"])
        table.auto_set_font_size(False)
        table.set_fontsize(10)
        table.scale(1.0, 1.25)
    else:
        table_ax.text(0.5, 0.9, "no regional values (regions off)", ha="center", fontsize=11)
    fig.canvas.draw()
    page = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]
    plt.close(fig)
    return page
