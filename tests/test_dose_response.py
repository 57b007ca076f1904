"""research/dose_response.py: the response of a map to a controlled tissue change, from evaluate's voxelwise.csv."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from research.dose_response import read_medians, responses

FIELDS = ["subject", "tissue", "reference", "other", "quantity", "n_voxels", "median_ape", "median_pe",
          "median_reference", "median_other"]


def write_version(report: Path, name: str, rows: list[tuple[str, str, str, str, float, float]]) -> None:
    """rows: (subject, tissue, quantity, map set, truth median, map median)."""
    (report / name).mkdir(parents=True)
    with (report / name / "voxelwise.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for subject, tissue, qty, other, truth, value in rows:
            w.writerow({"subject": subject, "tissue": tissue, "reference": "truth", "other": other, "quantity": qty,
                        "n_voxels": 100, "median_ape": 0, "median_pe": 0, "median_reference": truth,
                        "median_other": value})
        # rows the measure ignores: another reference, a tissue that is not near-pure
        w.writerow({"subject": "sub-001", "tissue": "WM", "reference": "truth", "other": "dl", "quantity": "T1",
                    "n_voxels": 100, "median_ape": 0, "median_pe": 0, "median_reference": 1, "median_other": 999})


def test_response_is_the_map_change_over_the_truth_change(tmp_path: Path) -> None:
    write_version(tmp_path, "base", [("sub-001", "WM near-pure", "T1", "dl", 800, 900),
                                     ("sub-002", "WM near-pure", "T1", "dl", 600, 700),
                                     ("sub-001", "GM near-pure", "T1", "dl", 1400, 1300),
                                     ("sub-002", "GM near-pure", "T1", "dl", 1200, 1100)])
    # WM T1 x 1.15 in the truth; the map follows half of it in sub-001 and none of it in sub-002. GM untouched.
    write_version(tmp_path, "wmt1", [("sub-001", "WM near-pure", "T1", "dl", 920, 900 * 1.075),
                                     ("sub-002", "WM near-pure", "T1", "dl", 690, 700),
                                     ("sub-001", "GM near-pure", "T1", "dl", 1400, 1313),
                                     ("sub-002", "GM near-pure", "T1", "dl", 1200, 1100)])
    rows = {(r["tissue"], r["quantity"]): r for r in responses(read_medians(tmp_path), "base")}
    wm = rows[("WM near-pure", "T1")]
    assert wm["n_subjects"] == 2
    assert wm["truth_change_pct"] == pytest.approx(15.0)
    assert wm["map_change_pct"] == pytest.approx(3.75)
    assert (wm["response_min"], wm["response_max"]) == pytest.approx((0.0, 0.5))
    assert wm["response"] == pytest.approx(0.25)
    gm = rows[("GM near-pure", "T1")]
    assert gm["truth_change_pct"] == pytest.approx(0.0)
    assert gm["map_change_pct"] == pytest.approx(0.5)
    assert gm["response"] is None  # no truth change: a spill, not a response


def test_a_report_without_near_pure_rows_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "voxelwise.csv").write_text(",".join(FIELDS) + "\n")
    with pytest.raises(SystemExit, match=r"no \*/voxelwise\.csv"):
        read_medians(tmp_path)
