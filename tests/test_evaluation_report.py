"""The evaluation report end to end on small synthetic subjects: files, numbers, figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.evaluation.agreement import lin_ccc
from training.evaluation.report import evaluate_subjects
from training.evaluation.subjects import SubjectMaps

SHAPE = (20, 20, 10)
REGIONS = {1: "white matter", 2: "cortex", 3: "deep grey", 4: "ventricle"}
BASE_T1 = {1: 850.0, 2: 1450.0, 3: 1200.0, 4: 4100.0}
BASE_T2 = {1: 75.0, 2: 100.0, 3: 75.0, 4: 1200.0}
COMPARISONS = [("true", "dl"), ("truth", "true"), ("truth", "dl")]


def _shrink(values: np.ndarray, labels: np.ndarray, factor: float) -> np.ndarray:
    """Each region's deviations from its mean scaled by ``factor`` (a smoother map, same regional means)."""
    out = values.copy()
    for label in REGIONS:
        inside = labels == label
        mean = values[inside].mean()
        out[inside] = mean + factor * (values[inside] - mean)
    return out


def synthetic_subject(index: int) -> SubjectMaps:
    """Four regions in an ellipsoidal brain; truth per region +- a subject effect, "true" = truth + noise,
    "dl" = half the within-region deviations, 3 % low T1."""
    rng = np.random.default_rng(100 + index)
    i, j, k = np.indices(SHAPE)
    brain = ((i - 9.5) / 9) ** 2 + ((j - 9.5) / 9) ** 2 + ((k - 4.5) / 5) ** 2 < 1
    labels = np.zeros(SHAPE, dtype=np.int16)
    labels[brain & (i < 10) & (j < 10)] = 1
    labels[brain & (i >= 10) & (j < 10)] = 2
    labels[brain & (i < 10) & (j >= 10)] = 3
    labels[brain & (i >= 10) & (j >= 10)] = 4
    scale = rng.normal(1.0, 0.05)
    t1 = np.zeros(SHAPE)
    t2 = np.zeros(SHAPE)
    for label in REGIONS:
        t1[labels == label] = BASE_T1[label] * scale
        t2[labels == label] = BASE_T2[label] * scale
    truth = {"T1": t1, "T2": t2}
    true = {q: np.where(brain, v * (1 + rng.normal(0, 0.05, SHAPE)), 0.0) for q, v in truth.items()}
    dl = {q: _shrink(v, labels, 0.5) for q, v in true.items()}
    dl["T1"] *= 0.97
    return SubjectMaps(subject_id=f"sub-{index:03d}", maps={"truth": truth, "true": true, "dl": dl},
                       labels=labels, region_names=REGIONS, brain_mask=brain,
                       tissue_masks={"WM": labels == 1, "GM": labels == 2, "CSF": labels == 4})


def test_report_end_to_end(tmp_path: Path) -> None:
    subjects = [synthetic_subject(i) for i in range(6)]
    out = tmp_path / "report"
    summary = evaluate_subjects(iter(subjects), COMPARISONS, out, n_boot=2000, seed=0)

    assert summary.subjects == tuple(s.subject_id for s in subjects)
    table = pd.read_csv(out / "regional.csv")
    assert len(table) == 6 * 4 * 3 * 2  # subjects x regions x map sets x quantities
    voxelwise = pd.read_csv(out / "voxelwise.csv")
    assert len(voxelwise) == 6 * 3 * 3 * 2  # subjects x tissues x comparisons x quantities

    # CCC and mean difference of (true, dl) T1 from a direct numpy computation of the regional means.
    ref = np.array([[s.maps["true"]["T1"][(s.labels == k) & s.brain_mask].mean() for k in REGIONS] for s in subjects])
    oth = np.array([[s.maps["dl"]["T1"][(s.labels == k) & s.brain_mask].mean() for k in REGIONS] for s in subjects])
    result = summary.agreements[("true", "dl", "T1")]
    assert result.ccc.value == pytest.approx(lin_ccc(ref.ravel(), oth.ravel()), rel=1e-9)
    assert result.mean_difference.value == pytest.approx(np.mean(ref - oth), rel=1e-9)
    assert result.mean_difference.value > 0  # DL underestimates T1 by construction
    assert result.n_pairs == 24
    assert result.n_subjects == 6
    assert result.sd_ratio is not None
    assert result.sd_ratio.value == pytest.approx(2 / 0.97, rel=1e-9)  # DL: half the deviations, x 0.97
    assert summary.agreements[("true", "dl", "T2")].mean_difference.value == pytest.approx(0.0, abs=1e-9)
    truth_true = summary.agreements[("truth", "true", "T2")]
    assert truth_true.ccc.low <= truth_true.ccc.value <= truth_true.ccc.high
    # The GM and WM table: the cortex and white-matter regions only (columns 0 and 1 of the region order).
    tissue = summary.tissue_agreements[("true", "dl", "T1")]
    assert tissue.n_pairs == 12
    assert tissue.ccc.value == pytest.approx(lin_ccc(ref[:, :2].ravel(), oth[:, :2].ravel()), rel=1e-9)
    assert tissue.ccc.value < result.ccc.value  # the ventricle's T1 no longer stretches the range

    data = json.loads((out / "summary.json").read_text())
    assert data["bootstrap"] == {"n_boot": 2000, "seed": 0, "confidence": 0.95, "clusters": "subjects",
                                 "interval": "percentile"}
    row = next(r for r in data["agreement"] if (r["reference"], r["other"], r["quantity"]) == ("true", "dl", "T1"))
    assert row["ccc"]["value"] == pytest.approx(result.ccc.value)
    assert data["paper"]["T1"]["ccc"] == [0.8793, 0.8136, 0.9383]
    assert data["agreement_gm_wm_regions"]["classes"] == ["GM", "WM"]
    tissue_row = next(r for r in data["agreement_gm_wm_regions"]["rows"]
                      if (r["reference"], r["other"], r["quantity"]) == ("true", "dl", "T1"))
    assert tissue_row["ccc"]["value"] == pytest.approx(tissue.ccc.value) and tissue_row["n_pairs"] == 12
    assert len(data["voxelwise_median_ape_percent"]) == 3 * 3 * 2
    # Between subjects: the cortex region's mean per subject (column 1 of the region order), true vs dl, by numpy.
    between = next(r for r in data["between_subjects"]
                   if (r["reference"], r["other"], r["quantity"], r["tissue"]) == ("true", "dl", "T1", "GM"))
    assert between["n_subjects"] == 6 and between["r"] == pytest.approx(np.corrcoef(ref[:, 1], oth[:, 1])[0, 1])
    assert between["sd_other"] == pytest.approx(oth[:, 1].std(ddof=1))

    markdown = (out / "summary.md").read_text()
    assert "| true | dl | T1 |" in markdown
    assert "0.8793 (0.8136 to 0.9383) | 48.23 (23.0 to 77.3)" in markdown
    assert "0.9078 (0.8981 to 0.9145) | 2.02 (-1.4 to 4.8)" in markdown
    assert "| WM | truth | dl | T1 |" in markdown
    assert "GM and WM regions only" in markdown.split("### Voxelwise")[0]
    assert f"| true | dl | T1 | GM | {between['r']:+.2f} |" in markdown.split("### Between subjects")[1]

    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(["maps_sub-000.png"] + [f"{kind}_{r}_vs_{o}.png" for r, o in COMPARISONS
                                                  for kind in ("scatter", "bland_altman")])
    for name in pngs:
        data_png = (out / name).read_bytes()
        assert data_png[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data_png) > 15_000, name
    assert set(summary.files.values()) >= {out / name for name in pngs}


def test_report_same_seed_same_numbers(tmp_path: Path) -> None:
    subjects = [synthetic_subject(i) for i in range(4)]
    a = evaluate_subjects(subjects, [("true", "dl")], tmp_path / "a", n_boot=300, seed=5, figure_subject="sub-002")
    b = evaluate_subjects(subjects, [("true", "dl")], tmp_path / "b", n_boot=300, seed=5, figure_subject="sub-002")
    assert a.agreements == b.agreements
    assert (tmp_path / "a" / "maps_sub-002.png").is_file()


def test_report_rejects_bad_arguments(tmp_path: Path) -> None:
    subjects = [synthetic_subject(i) for i in range(2)]
    with pytest.raises(ValueError, match=r"map_sets: 'xx' missing in subject sub-000"):
        evaluate_subjects(subjects, [("true", "xx")], tmp_path, n_boot=10)
    with pytest.raises(ValueError, match="comparisons: reference and other are the same map set 'dl'"):
        evaluate_subjects(subjects, [("dl", "dl")], tmp_path, n_boot=10)
    with pytest.raises(ValueError, match="comparisons: must name at least one"):
        evaluate_subjects(subjects, [], tmp_path, n_boot=10)
    with pytest.raises(ValueError, match="subjects: duplicate subject_id 'sub-000'"):
        evaluate_subjects([subjects[0], subjects[0]], [("true", "dl")], tmp_path, n_boot=10)
    with pytest.raises(ValueError, match="subjects: no subjects given"):
        evaluate_subjects([], [("true", "dl")], tmp_path, n_boot=10)
    with pytest.raises(ValueError, match="figure_subject: 'sub-404' is not among the subjects"):
        evaluate_subjects(subjects, [("true", "dl")], tmp_path, n_boot=10, figure_subject="sub-404")


def test_import_has_no_side_effects() -> None:
    # Importing the report must not load pyplot (global figure state, backend selection).
    code = ("import sys, matplotlib; backend = matplotlib.rcParams._get_backend_or_none(); "
            "import training.evaluation.report; "
            "assert 'matplotlib.pyplot' not in sys.modules; "
            "assert matplotlib.rcParams._get_backend_or_none() == backend")
    subprocess.run([sys.executable, "-c", code], check=True)
