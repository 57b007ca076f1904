"""Regional table and voxelwise errors against direct numpy computations on tiny volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.evaluation.regional import (
    BETWEEN_COLUMNS,
    COLUMNS,
    between_subjects,
    region_statistics,
    regional_matrix,
    regional_table,
    tissue_means,
)
from training.evaluation.subjects import SubjectMaps
from training.evaluation.voxelwise import (
    median_absolute_percent_error,
    median_percent_error,
    subject_errors,
    summarise_errors,
)

NAMES = {1: "left wm", 2: "right wm", 3: "cortex", 4: "ventricle", 5: "tiny", 6: "absent"}


def tiny_subject(seed: int, subject_id: str = "sub-1") -> SubjectMaps:
    rng = np.random.default_rng(seed)
    labels = np.zeros((6, 5, 4), dtype=np.int16)
    labels[:3, :, :2] = 1
    labels[3:, :, :2] = 2
    labels[:, :3, 2:] = 3
    labels[:, 3:, 2:] = 4
    labels[0, 0, 0] = 5  # one voxel: mean defined, SD not
    mask = np.ones(labels.shape, dtype=bool)
    mask[5, 4, 3] = False  # a ventricle voxel outside the brain mask takes no part
    truth = {"T1": rng.uniform(700, 4000, labels.shape), "T2": rng.uniform(50, 1500, labels.shape)}
    dl = {q: v * rng.uniform(0.9, 1.1, labels.shape) for q, v in truth.items()}
    return SubjectMaps(subject_id=subject_id, maps={"truth": truth, "dl": dl}, labels=labels, region_names=NAMES,
                       brain_mask=mask, tissue_masks={"WM": np.isin(labels, [1, 2]), "CSF": labels == 4})


def test_region_statistics_match_numpy() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (7, 6, 5))
    values = rng.normal(1000, 200, labels.shape)
    count, mean, sd = region_statistics(values, labels, 5)
    for k in range(4):
        assert count[k] == np.count_nonzero(labels == k)
        assert mean[k] == pytest.approx(values[labels == k].mean(), rel=1e-12)
        assert sd[k] == pytest.approx(values[labels == k].std(ddof=1), rel=1e-10)
    assert count[5] == 0
    assert np.isnan(mean[5])
    assert np.isnan(sd[5])
    with pytest.raises(ValueError, match=r"labels: must lie in 0\.\.2, got 0\.\.3"):
        region_statistics(values, labels, 2)


def test_regional_table_matches_direct_computation() -> None:
    subject = tiny_subject(1)
    table = regional_table([subject], ["truth", "dl"])
    assert list(table.columns) == ["subject", "region", "label", "map_set", "quantity", "n_voxels", "mean", "sd"]
    assert len(table) == len(NAMES) * 2 * 2
    for row in table.itertuples(index=False):
        voxels = (subject.labels == row.label) & subject.brain_mask
        values = np.asarray(subject.maps[row.map_set][row.quantity])[voxels]
        assert row.region == NAMES[row.label]
        assert row.n_voxels == values.size
        if values.size == 0:
            assert np.isnan(row.mean)
        else:
            assert row.mean == pytest.approx(values.mean(), rel=1e-12)
        if values.size < 2:
            assert np.isnan(row.sd)
        else:
            assert row.sd == pytest.approx(values.std(ddof=1), rel=1e-10)
    ventricle = table[(table.region == "ventricle") & (table.map_set == "truth") & (table.quantity == "T1")]
    assert ventricle.n_voxels.item() == 6 * 2 * 2 - 1


def test_regional_matrix_lays_out_subjects_by_regions() -> None:
    table = regional_table([tiny_subject(2, "sub-b"), tiny_subject(3, "sub-a")], ["truth"], ["T1"])
    subjects, regions, means = regional_matrix(table, "truth", "T1")
    assert subjects == ["sub-a", "sub-b"]
    assert regions == [NAMES[k] for k in sorted(NAMES)]
    expected = table[(table.subject == "sub-b") & (table.label == 3)]["mean"].item()
    assert means[1, 2] == expected
    with pytest.raises(ValueError, match=r"map_set, quantity: no rows for \('dl', 'T1'\)"):
        regional_matrix(table, "dl", "T1")
    with pytest.raises(ValueError, match="statistic: must be"):
        regional_matrix(table, "truth", "T1", "median")


def test_regional_table_names_a_missing_map_set() -> None:
    with pytest.raises(ValueError, match=r"map_sets: 'true' missing in subject sub-1"):
        regional_table([tiny_subject(1)], ["truth", "true"])


def test_median_absolute_percent_error_hand_example() -> None:
    # errors 10 %, 5 %, 20 %, 0 % -> median 7.5 %; the reference-0 voxel is left out
    reference = np.array([100.0, 200.0, 50.0, 80.0, 0.0])
    other = np.array([110.0, 190.0, 60.0, 80.0, 5.0])
    assert median_absolute_percent_error(reference, other) == pytest.approx(7.5)
    # signed errors +10, -5, +20, 0 -> median +5 %
    assert median_percent_error(reference, other) == pytest.approx(5.0)
    assert np.isnan(median_percent_error(np.zeros(2), np.ones(2)))


def test_subject_errors_per_tissue_and_summary() -> None:
    subjects = [tiny_subject(s, f"sub-{s}") for s in range(3)]
    table = pd.concat([subject_errors(s, [("truth", "dl")]) for s in subjects], ignore_index=True)
    assert len(table) == 3 * 2 * 2  # subjects x tissues x quantities
    s0 = subjects[0]
    wm = s0.tissue_masks["WM"] & s0.brain_mask
    ref, oth = np.asarray(s0.maps["truth"]["T1"])[wm], np.asarray(s0.maps["dl"]["T1"])[wm]
    row = table[(table.subject == "sub-0") & (table.tissue == "WM") & (table.quantity == "T1")]
    assert row.median_ape.item() == pytest.approx(np.median(100 * np.abs(oth - ref) / ref))
    assert row.median_pe.item() == pytest.approx(np.median(100 * (oth - ref) / ref))
    assert (row.median_reference.item(), row.median_other.item()) == pytest.approx((np.median(ref), np.median(oth)))
    summary = summarise_errors(table)
    wm_t1 = summary[(summary.tissue == "WM") & (summary.quantity == "T1")]
    per_subject = table[(table.tissue == "WM") & (table.quantity == "T1")].median_ape
    assert wm_t1.median_ape.item() == pytest.approx(per_subject.median())
    assert wm_t1.median_pe.item() == pytest.approx(table[(table.tissue == "WM") & (table.quantity == "T1")]
                                                   .median_pe.median())
    assert wm_t1.n_subjects.item() == 3


def test_between_subjects_follows_tissue_means_by_hand() -> None:
    """Each subject's cortex mean is its cortex regions' means weighted by voxels; r, SDs and the mean % difference
    over subjects by hand. A map set that moves between subjects against the reference shows r = -1."""
    regions = [("left frontal cortex", 1, 100), ("right insular cortex", 2, 300), ("left frontal white matter", 3, 50),
               ("left lateral ventricle", 4, 80)]
    truth_gm = {"s1": (100.0, 120.0), "s2": (110.0, 130.0), "s3": (90.0, 95.0), "s4": (105.0, 140.0)}
    rows = []
    for subject, (a, b) in truth_gm.items():
        for name, label, n in regions:
            value = {1: a, 2: b, 3: 70.0, 4: 1500.0}[label]
            rows.append((subject, name, label, "truth", "T2", n, value, 1.0))
            rows.append((subject, name, label, "dl", "T2", n, 200.0 - value if label < 3 else value, 1.0))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    out = between_subjects(table, [("truth", "dl")], ["T2"]).set_index("tissue")
    assert list(out.columns) == [c for c in BETWEEN_COLUMNS if c != "tissue"]
    gm_truth = np.array([(100 * a + 300 * b) / 400 for a, b in truth_gm.values()])
    gm_dl = np.array([(100 * (200 - a) + 300 * (200 - b)) / 400 for a, b in truth_gm.values()])
    gm = out.loc["GM"]
    assert gm["n_subjects"] == 4 and gm["r"] == pytest.approx(-1.0)
    assert gm["sd_reference"] == pytest.approx(gm_truth.std(ddof=1))
    assert gm["sd_other"] == pytest.approx(gm_dl.std(ddof=1))
    assert gm["mean_difference_percent"] == pytest.approx(np.mean(100 * (gm_dl - gm_truth) / gm_truth))
    wm = out.loc["WM"]  # the same value in every subject: no correlation to speak of
    assert np.isnan(wm["r"]) and wm["sd_reference"] == 0 and wm["mean_difference_percent"] == 0
    assert tissue_means(table, "truth", "T2", "CSF").tolist() == [1500.0] * 4
