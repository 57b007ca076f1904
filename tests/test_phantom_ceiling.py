"""The identifiability ceiling of a phantom world, against closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dicom_node.cli import cli
from training.phantom.ceiling import BRAIN_TISSUES, identifiability_ceiling

MEANS = {"wm": (850.0, 75.0), "gm": (1450.0, 100.0), "deep_gm": (1200.0, 75.0)}


def entries(n: int, t2_of: str, seed: int = 0) -> list[dict[str, object]]:
    """``n`` subjects at 3 T; T2 drawn independently of T1 (``independent``) or a line in T1 (``line``)."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        tissues = {}
        for name, (t1, t2) in MEANS.items():
            t1_draw = t1 * (1 + 0.1 * rng.standard_normal())
            t2_draw = t2 * (1 + 0.12 * rng.standard_normal()) if t2_of == "independent" else t2 * t1_draw / t1
            tissues[name] = {"t1_ms": t1_draw, "t2_ms": t2_draw, "pd": 0.7 + 0.05 * rng.standard_normal()}
        out.append({"id": f"sub-{i + 1:03d}", "tissues": tissues, "acquisition": {"field_strength_t": 3.0}})
    return out


def test_class_mean_oracle_matches_the_closed_form() -> None:
    # class-mean predictor: cov(y, mu_c) = var(mu_c) = B and the means agree, so CCC = 2B / (2B + W) with W the
    # pooled within-class variance; with T2 independent of T1 and PD, knowing them adds nothing
    n = 4000
    result = identifiability_ceiling(entries(n, "independent"))
    mus = np.array([t2 for _, t2 in MEANS.values()])
    between = mus.var()
    within = np.mean([(0.12 * t2) ** 2 for t2 in mus])
    assert result.ccc_class_mean["t2_ms"] == pytest.approx(2 * between / (2 * between + within), abs=0.01)
    assert result.ccc_exact_t1_pd["t2_ms"] == pytest.approx(result.ccc_class_mean["t2_ms"], abs=0.005)
    # median |N(0, 0.12)| = 0.6745 x 0.12
    assert result.mdape_class_mean["t2_ms"] == pytest.approx(100 * 0.6745 * 0.12, rel=0.05)
    assert result.ccc_exact_t1_pd["t1_ms"] == pytest.approx(1.0)
    assert result.n_pairs == n * len(BRAIN_TISSUES)
    gm = next(s for s in result.spreads if s.tissue == "gm" and s.quantity == "t2_ms")
    assert abs(gm.corr_with_t1) < 0.05 and gm.sd / gm.mean == pytest.approx(0.12, rel=0.05)


def test_t2_tied_to_t1_is_fully_revealed() -> None:
    result = identifiability_ceiling(entries(40, "line"))
    assert result.ccc_exact_t1_pd["t2_ms"] == pytest.approx(1.0, abs=1e-9)
    assert result.ccc_class_mean["t2_ms"] < 0.95


def test_too_few_subjects_fall_back_to_the_class_mean_and_bad_input_is_refused() -> None:
    small = identifiability_ceiling(entries(5, "line"))  # 3 coefficients in-sample on 5 subjects would overfit
    assert small.ccc_exact_t1_pd == small.ccc_class_mean
    with pytest.raises(ValueError, match="at least 2 subjects"):
        identifiability_ceiling(entries(1, "line"))
    broken = entries(3, "line")
    del broken[1]["tissues"]
    with pytest.raises(ValueError, match=r"sub-002: no tissues\.wm"):
        identifiability_ceiling(broken)


def test_cli_prints_the_oracles_for_a_split(tmp_path: Path) -> None:
    subjects = entries(30, "independent")
    split = {"train": [s["id"] for s in subjects[:20]], "val": [], "test": [s["id"] for s in subjects[20:]]}
    (tmp_path / "manifest.json").write_text(json.dumps({"subjects": subjects, "split": split}))
    result = CliRunner().invoke(cli, ["phantom", "ceiling", str(tmp_path), "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "10 subjects (test), 30 (subject, tissue) pairs" in result.output
    assert "class mean" in result.output and "exact T1 and PD" in result.output
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    bad = CliRunner().invoke(cli, ["phantom", "ceiling", str(tmp_path)])
    assert bad.exit_code == 1 and "no 'subjects' list" in bad.output


def test_the_evaluation_reports_the_ceiling_of_its_subjects(tmp_path: Path) -> None:
    from training.evaluate_model import EvaluationSet, subjects_ceiling
    from training.evaluation.datasets import DatasetInfo

    subjects = entries(4, "independent") + [{**e, "id": f"sub-{i + 5:03d}", "acquisition": {"field_strength_t": 1.5}}
                                            for i, e in enumerate(entries(1, "independent", seed=1))]
    data = DatasetInfo(tmp_path, {"subjects": subjects, "split": {"test": [e["id"] for e in subjects]}})

    def ceiling_of(ids: list[str]) -> object:
        return subjects_ceiling(EvaluationSet(data, "ds", "test", tuple(ids), tmp_path / "cache"))

    at_3t = ceiling_of([f"sub-{i:03d}" for i in range(1, 5)])
    expected = identifiability_ceiling(subjects[:4])
    assert not isinstance(at_3t, str) and at_3t.ccc_class_mean == expected.ccc_class_mean
    # The report says when the exact-T1/PD oracle had too few subjects to fit and is the class mean again.
    from training.evaluate_model import _ceiling_text

    assert "falls back to the class mean" in _ceiling_text(at_3t)
    assert "falls back" not in _ceiling_text(identifiability_ceiling(entries(40, "line")))
    # One 1.5 T subject would be its own class mean: no ceiling, and the reason says so.
    assert "2 subjects per field strength" in str(ceiling_of([f"sub-{i:03d}" for i in range(1, 6)]))
    bare = DatasetInfo(tmp_path, {"subjects": [{"id": "sub-001"}, {"id": "sub-002"}]})
    assert "no tissue values" in str(subjects_ceiling(EvaluationSet(bare, "ds", "all", ("sub-001", "sub-002"),
                                                                    tmp_path / "cache")))
