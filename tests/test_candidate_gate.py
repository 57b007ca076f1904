"""research/candidate_gate: a synthetic evaluate report whose every number is known gives those numbers back,
and the verdict follows the thresholds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from research.candidate_gate import dataset_numbers, failures, main

CORTEX = ["left frontal cortex", "left parietal cortex", "right temporal cortex"]
WHITE = ["left frontal white matter", "right occipital white matter"]


def _report(tmp_path: Path, gm_factor: float = 0.9) -> Path:
    """One dataset 'ds1': GM read at ``gm_factor`` of truth, WM exact; CCC T1 0.95 (0.93-0.97), T2 0.87 (0.84-
    0.90); two protocol groups whose near-pure errors meet 13 of the 16 cells, largest GM T2 bias +6.0 %."""
    report = tmp_path / "report"
    (report / "ds1").mkdir(parents=True)
    rows = [{"reference": "truth", "other": other, "quantity": q, "ccc": {"value": v, "low": lo, "high": hi}}
            for other, q, v, lo, hi in (("dl", "T1", 0.95, 0.93, 0.97), ("dl", "T2", 0.87, 0.84, 0.90),
                                        ("lookup", "T1", 0.5, 0.4, 0.6), ("lookup", "T2", 0.5, 0.4, 0.6))]
    (report / "ds1" / "summary.json").write_text(json.dumps({"agreement_gm_wm_regions": {"rows": rows}}))
    columns = [f"{kind}_{t} near-pure_{q}" for kind in ("mape", "bias") for q in ("T1", "T2") for t in ("WM", "GM")]
    near = []
    for group, mape, bias in (
            # mape WM T1, GM T1, WM T2, GM T2; bias the same order: every cell met but GM T2's bias
            ("mprage 3T", [4.0, 8.0, 5.0, 9.0], [2.0, -5.0, 3.0, -12.0]),
            # two misses: GM T1 error 11 %, WM T2 bias -10.5 %; GM T2 bias +6.0 % is the largest
            ("tfe 3T", [5.0, 11.0, 6.0, 7.0], [1.0, -9.0, -10.5, 6.0])):
        for map_set, shift in (("dl", 0.0), ("lookup", 50.0)):
            values = [m + shift for m in mape] + [b + shift for b in bias]
            near.append({"dataset": "ds1", "group": group, "n_subjects": 3, "map_set": map_set}
                        | dict(zip(columns, values, strict=True)))
    pd.DataFrame(near).to_csv(report / "near_pure_by_protocol.csv", index=False)
    rng = np.random.default_rng(5)
    regional = []
    for s in range(4):
        for region in CORTEX + WHITE + ["sulcal CSF"]:
            base = 100.0 if region in CORTEX else 70.0 if region in WHITE else 1500.0
            truth = base * (1 + 0.05 * rng.standard_normal())
            other = truth * (gm_factor if region in CORTEX else 1.0)
            for map_set, value in (("truth", truth), ("dl", other)):
                for quantity in ("T1", "T2"):
                    regional.append({"subject": f"sub-{s}", "region": region, "label": 0, "map_set": map_set,
                                     "quantity": quantity, "n_voxels": 50, "mean": value, "sd": 1.0})
    pd.DataFrame(regional).to_csv(report / "ds1" / "regional.csv", index=False)
    return report


def test_numbers_are_read_from_the_report(tmp_path: Path) -> None:
    n = dataset_numbers(_report(tmp_path), "ds1")
    assert n.ccc == {"T1": (0.95, 0.93, 0.97), "T2": (0.87, 0.84, 0.90)}
    assert (n.cells_met, n.cells_total) == (13, 16)
    assert n.max_gm_t2_bias == pytest.approx(6.0)
    assert n.gm_t2_level == pytest.approx(0.9)
    assert n.t2_levels_matched == pytest.approx(1.0)  # GM scaled by one factor: matching its level restores it


def test_the_lookup_rows_are_read_for_the_lookup(tmp_path: Path) -> None:
    report = _report(tmp_path)
    regional = pd.read_csv(report / "ds1" / "regional.csv")
    lookup = regional[regional["map_set"] == "dl"].assign(map_set="lookup")
    pd.concat([regional, lookup]).to_csv(report / "ds1" / "regional.csv", index=False)
    n = dataset_numbers(report, "ds1", "lookup")
    assert n.ccc["T1"] == (0.5, 0.4, 0.6) and n.cells_met == 0 and n.max_gm_t2_bias == pytest.approx(56.0)


def test_failures_name_each_missed_condition(tmp_path: Path) -> None:
    n = dataset_numbers(_report(tmp_path), "ds1")
    assert failures(n) == []
    assert failures(n, min_t1=0.94, min_t2=0.86, min_cells=13, level=(0.88, 0.92), max_gm_t2_bias=6.0) == []
    missed = failures(n, min_t1=0.96, min_t2=0.88, min_cells=14, level=(0.92, 0.99), max_gm_t2_bias=5.0)
    assert [m.split()[0:2] for m in missed] == [["CCC", "T1"], ["CCC", "T2"], ["near-pure", "cells"],
                                               ["GM", "T2"], ["near-pure", "GM"]]


def test_main_exit_status_follows_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _report(tmp_path)
    assert main([str(report)]) == 0
    assert "ds1: GM+WM CCC T1 0.950 (0.930-0.970)  T2 0.870" in capsys.readouterr().out
    assert main([str(report), "--min-t2", "0.86", "--level", "0.85", "0.95"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("pass")
    assert main([str(report), "--level", "0.92", "0.99"]) == 1
    assert "FAIL: GM T2 level 0.900 outside 0.92-0.99" in capsys.readouterr().out


def test_a_folder_that_is_no_report_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
