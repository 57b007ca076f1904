"""Per-protocol groups of the evaluation: labels, grouping and the plain estimates per group."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.protocol import PAPER_PROTOCOL, Family
from training.evaluation.protocols import (
    follow_markdown,
    markdown_table,
    metric_columns,
    near_pure_follow,
    near_pure_table,
    protocol_group,
    protocol_table,
    text_table,
)
from training.evaluation.report import evaluate_subjects
from training.evaluation.subjects import SubjectMaps

SHAPE = (12, 12, 4)
REGIONS = {1: "white matter", 2: "cortex", 3: "thalamus"}
TRUTH_T1 = {1: 800.0, 2: 1300.0, 3: 1000.0}
TRUTH_T2 = {1: 70.0, 2: 95.0, 3: 80.0}
# Subject -> (group, dl factor on T1 and T2, lookup factor); subjects of the two groups interleaved.
SUBJECTS = {"a": ("mprage 3T", 1.10, 0.95), "b": ("ir-fspgr 1.5T", 0.80, 1.0),
            "c": ("mprage 3T", 1.10, 0.95), "d": ("ir-fspgr 1.5T", 0.80, 1.0), "e": ("ir-fspgr 1.5T", 0.80, 1.0)}


def subject(name: str, index: int) -> SubjectMaps:
    """Three regions (thirds of the grid along x), truth uniform per region and scaled per subject; dl and
    lookup are the truth times a per-group factor."""
    labels = np.zeros(SHAPE, np.int16)
    labels[0:4], labels[4:8], labels[8:12] = 1, 2, 3
    scale = 1.0 + 0.03 * index
    truth = {"T1": np.vectorize(TRUTH_T1.get)(labels) * scale, "T2": np.vectorize(TRUTH_T2.get)(labels) * scale}
    _, dl, lookup = SUBJECTS[name]
    return SubjectMaps(subject_id=name, maps={"truth": truth, "dl": {q: v * dl for q, v in truth.items()},
                                              "lookup": {q: v * lookup for q, v in truth.items()}},
                       labels=labels, region_names=REGIONS, brain_mask=labels > 0,
                       tissue_masks={"WM": labels == 1, "GM": labels == 2})


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC written out (population moments)."""
    return float(2 * np.mean((x - x.mean()) * (y - y.mean())) / (x.var() + y.var() + (x.mean() - y.mean()) ** 2))


def test_group_labels() -> None:
    assert protocol_group(PAPER_PROTOCOL) == "mprage 3T"
    assert protocol_group(replace(PAPER_PROTOCOL, family=Family.IR_FSPGR, field_strength_t=1.5)) == "ir-fspgr 1.5T"


def test_protocol_table_groups_subjects(tmp_path: Path) -> None:
    subjects = [subject(name, i) for i, name in enumerate(SUBJECTS)]
    summary = evaluate_subjects(iter(subjects), [("truth", "dl"), ("truth", "lookup")], tmp_path, n_boot=100)
    groups = {name: g for name, (g, _, _) in SUBJECTS.items()}
    table = protocol_table(summary.regional, summary.voxelwise_subjects, groups)

    assert list(table.columns) == ["group", "n_subjects", "map_set", *metric_columns()]
    assert table[["group", "map_set"]].values.tolist() == [["ir-fspgr 1.5T", "dl"], ["ir-fspgr 1.5T", "lookup"],
                                                         ["mprage 3T", "dl"], ["mprage 3T", "lookup"]]
    rows = table.set_index(["group", "map_set"])
    assert rows.loc[("ir-fspgr 1.5T", "dl"), "n_subjects"] == 3
    assert rows.loc[("mprage 3T", "dl"), "n_subjects"] == 2
    for group, factor in (("mprage 3T", 1.10), ("ir-fspgr 1.5T", 0.80)):
        for column in ("mape_WM_T1", "mape_GM_T1", "mape_WM_T2", "mape_GM_T2"):
            assert rows.loc[(group, "dl"), column] == pytest.approx(100 * abs(factor - 1))
        for column in ("bias_WM_T1", "bias_GM_T1", "bias_WM_T2", "bias_GM_T2"):
            assert rows.loc[(group, "dl"), column] == pytest.approx(100 * (factor - 1))
        members = [i for i, name in enumerate(SUBJECTS) if SUBJECTS[name][0] == group]
        truth = np.array([TRUTH_T1[k] * (1.0 + 0.03 * i) for i in members for k in REGIONS])
        assert rows.loc[(group, "dl"), "ccc_T1"] == pytest.approx(ccc(truth, factor * truth), rel=1e-9)
        tissue = np.array([TRUTH_T1[k] * (1.0 + 0.03 * i) for i in members for k in (1, 2)])  # not the thalamus
        assert rows.loc[(group, "dl"), "ccc_gmwm_T1"] == pytest.approx(ccc(tissue, factor * tissue), rel=1e-9)
    assert rows.loc[("ir-fspgr 1.5T", "lookup"), "ccc_T2"] == pytest.approx(1.0)
    assert rows.loc[("mprage 3T", "lookup"), "bias_GM_T2"] == pytest.approx(-5.0)

    text = markdown_table(table)
    assert "| ir-fspgr 1.5T | 3 | dl | " in text and "+10.0" in text and "-20.0" in text
    assert "| CCC GM+WM T1 |" in text
    assert "mprage 3T" in text_table(table)
    with pytest.raises(ValueError, match=r"no group for subjects \['e'\]"):
        protocol_table(summary.regional, summary.voxelwise_subjects, {k: v for k, v in groups.items() if k != "e"})


def test_a_group_with_one_regional_pair_has_no_ccc() -> None:
    regional = pd.DataFrame({"subject": ["a", "a"], "region": ["white matter"] * 2, "label": [1, 1],
                             "map_set": ["truth", "dl"], "quantity": ["T1", "T1"], "n_voxels": [5, 5],
                             "mean": [800.0, 880.0], "sd": [1.0, 1.0]})
    voxelwise = pd.DataFrame(columns=["subject", "tissue", "reference", "other", "quantity", "n_voxels",
                                      "median_ape", "median_pe"])
    row = protocol_table(regional, voxelwise, {"a": "mprage 3T"}, others=("dl",), quantities=("T1",)).iloc[0]
    assert np.isnan(row["ccc_T1"]) and np.isnan(row["mape_WM_T1"])
    assert row["bias_WM_T1"] == pytest.approx(10.0)


def test_near_pure_table_medians_over_a_groups_subjects_by_hand() -> None:
    rows = []
    for subject, ape, pe in (("a", 2.0, -2.0), ("b", 4.0, 3.0), ("c", 9.0, 9.0)):
        rows.append({"subject": subject, "tissue": "GM near-pure", "reference": "truth", "other": "dl",
                     "quantity": "T2", "n_voxels": 10, "median_ape": ape, "median_pe": pe})
        rows.append({"subject": subject, "tissue": "GM", "reference": "truth", "other": "dl", "quantity": "T2",
                     "n_voxels": 20, "median_ape": 50.0, "median_pe": 50.0})
    voxelwise = pd.DataFrame(rows)
    table = near_pure_table(voxelwise, {"a": "mprage 3T", "b": "mprage 3T", "c": "tfe 3T"}, others=("dl",),
                            quantities=("T2",))
    assert list(table.columns) == ["group", "n_subjects", "map_set", "mape_GM near-pure_T2", "bias_GM near-pure_T2"]
    mprage = table.iloc[0]
    assert (mprage["group"], mprage["n_subjects"]) == ("mprage 3T", 2)
    assert mprage["mape_GM near-pure_T2"] == pytest.approx(3.0) and mprage["bias_GM near-pure_T2"] == pytest.approx(0.5)
    assert table.iloc[1]["bias_GM near-pure_T2"] == pytest.approx(9.0)
    assert "| mprage 3T | 2 | dl | 3.0 | +0.5 |" in markdown_table(table)
    assert near_pure_table(voxelwise[voxelwise.tissue == "GM"], {"a": "g", "b": "g", "c": "g"}).empty
    with pytest.raises(ValueError, match=r"groups: no group for subjects \['c'\]"):
        near_pure_table(voxelwise, {"a": "g", "b": "g"})


def _follow_rows(other: str, readings: dict[str, tuple[float, float]]) -> list[dict[str, object]]:
    return [{"subject": subject, "tissue": "GM near-pure", "reference": "truth", "other": other, "quantity": "T1",
             "n_voxels": 10, "median_ape": 1.0, "median_pe": 1.0, "median_reference": truth,
             "median_other": read} for subject, (truth, read) in readings.items()]


def test_near_pure_follow_pools_deviations_from_each_groups_mean_by_hand() -> None:
    groups = {"a1": "mprage 3T", "a2": "mprage 3T", "a3": "mprage 3T", "b1": "mprage 1.5T", "b2": "mprage 1.5T"}
    # Group a: dx = -100, 0, +100 and dy = -50, 0, +50; group b: dx = -50, +50 and dy = 0, 0.
    # slope = (5000 + 5000) / (10000 + 10000 + 2500 + 2500) = 0.4; r = 10000 / sqrt(25000 * 5000);
    # SDs over n - groups = 3 degrees of freedom: sqrt(25000 / 3), sqrt(5000 / 3).
    dl = {"a1": (1000.0, 1050.0), "a2": (1100.0, 1100.0), "a3": (1200.0, 1150.0), "b1": (1400.0, 1500.0),
          "b2": (1500.0, 1500.0)}
    constant = {s: (truth, 1300.0) for s, (truth, _) in dl.items()}
    # A map set that adds a per-group offset (the field strength) but follows every subject exactly: slope 1.
    exact = {s: (truth, truth + (200.0 if groups[s] == "mprage 3T" else -80.0)) for s, (truth, _) in dl.items()}
    table = near_pure_follow(pd.DataFrame(_follow_rows("dl", dl) + _follow_rows("lookup", constant)
                                          + _follow_rows("exact", exact)), groups,
                             others=("dl", "lookup", "exact"), quantities=("T1",))
    dl_row, lookup_row, exact_row = (table[table.map_set == m].iloc[0] for m in ("dl", "lookup", "exact"))
    assert (dl_row["n_subjects"], dl_row["n_groups"], dl_row["tissue"]) == (5, 2, "GM near-pure")
    assert dl_row["slope"] == pytest.approx(0.4)
    assert dl_row["r"] == pytest.approx(10000 / np.sqrt(25000 * 5000))
    assert dl_row["sd_reference_ms"] == pytest.approx(np.sqrt(25000 / 3))
    assert dl_row["sd_other_ms"] == pytest.approx(np.sqrt(5000 / 3))
    assert lookup_row["slope"] == pytest.approx(0.0) and np.isnan(lookup_row["r"])  # reads one value
    assert exact_row["slope"] == pytest.approx(1.0) and exact_row["r"] == pytest.approx(1.0)
    markdown = follow_markdown(table)
    assert "| dl | T1 | GM near-pure | 0.40 | +0.89 | 91 | 41 | 5 (2) |" in markdown
    assert "| lookup | T1 | GM near-pure | 0.00 | n/a |" in markdown


def test_near_pure_follow_needs_two_subjects_beyond_one_per_group() -> None:
    readings = {"a": (1000.0, 1010.0), "b": (1100.0, 1090.0), "c": (1300.0, 1250.0)}
    voxelwise = pd.DataFrame(_follow_rows("dl", readings))
    one_group = near_pure_follow(voxelwise, {"a": "g", "b": "g", "c": "g"}, others=("dl",), quantities=("T1",))
    assert np.isfinite(one_group.iloc[0]["slope"])  # 3 subjects, 1 group: 2 left
    two_groups = near_pure_follow(voxelwise, {"a": "g", "b": "g", "c": "h"}, others=("dl",), quantities=("T1",))
    assert np.isnan(two_groups.iloc[0]["slope"]) and np.isnan(two_groups.iloc[0]["r"])  # 3 subjects, 2 groups: 1
    assert near_pure_follow(voxelwise.assign(tissue="GM"), {"a": "g", "b": "g", "c": "g"}).empty
    with pytest.raises(ValueError, match=r"groups: no group for subjects \['c'\]"):
        near_pure_follow(voxelwise, {"a": "g", "b": "g"})
