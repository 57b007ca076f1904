"""research/level_or_pattern: each split of the regional CCC recovers what was built into a synthetic table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from research.level_or_pattern import decompose, main, paired_regions

REGIONS = ["left frontal cortex", "left parietal cortex", "right temporal cortex", "left frontal white matter",
           "right occipital white matter", "corpus callosum body", "left thalamus", "sulcal CSF"]


def _table(other_of: dict[str, float], offsets: dict[tuple[int, str], float] | None = None) -> pd.DataFrame:
    """regional.csv rows: 5 subjects x REGIONS, truth T2 with a pattern, ``other`` = truth x its tissue's factor
    plus a per-(subject, tissue) offset."""
    rng = np.random.default_rng(3)
    rows = []
    for s in range(5):
        for region in REGIONS:
            tissue = "GM" if "cortex" in region else "WM" if ("white" in region or "callosum" in region) else None
            truth = {"GM": 110.0, "WM": 72.0, None: 90.0}[tissue] * (1 + 0.05 * rng.standard_normal())
            other = truth * other_of.get(tissue or "", 1.0) + (offsets or {}).get((s, tissue or ""), 0.0)
            for map_set, value in (("truth", truth), ("dl", other)):
                rows.append({"subject": f"sub-{s}", "region": region, "label": 0, "map_set": map_set,
                             "quantity": "T2", "n_voxels": 100, "mean": value, "sd": 1.0})
    return pd.DataFrame(rows)


def _ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's CCC written out (population moments), independent of the product's implementation."""
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    return float(2 * sxy / (x.var() + y.var() + (x.mean() - y.mean()) ** 2))


def test_pairs_keep_only_grey_and_white_matter() -> None:
    pairs = paired_regions(_table({}), "T2")
    assert len(pairs) == 5 * 6  # thalamus (mixed) and sulcal CSF left out
    assert set(pairs["tissue"]) == {"GM", "WM"}


def test_tissue_levels_alone_are_undone_by_matching_levels() -> None:
    d = decompose(paired_regions(_table({"GM": 0.9, "WM": 1.05}), "T2"))
    assert d["level_GM"] == pytest.approx(0.9)
    assert d["level_WM"] == pytest.approx(1.05)
    assert d["as_read"] < 0.95
    assert d["levels_matched"] == pytest.approx(1.0)


def test_subject_offsets_alone_are_undone_by_the_pattern_split() -> None:
    offsets = {(s, t): (s - 2) * 6.0 * (1 if t == "GM" else -1) for s in range(5) for t in ("GM", "WM")}
    d = decompose(paired_regions(_table({}, offsets), "T2"))
    assert d["as_read"] < 0.99
    assert d["pattern_only"] == pytest.approx(1.0)


def test_constant_levels_is_the_ccc_of_the_tissue_means() -> None:
    pairs = paired_regions(_table({"GM": 0.8}), "T2")
    ref = pairs["reference"].to_numpy()
    means = pairs.groupby("tissue")["reference"].transform("mean").to_numpy()
    d = decompose(pairs)
    assert d["constant_levels"] == pytest.approx(_ccc(ref, means))
    assert d["as_read"] == pytest.approx(_ccc(ref, pairs["other"].to_numpy()))


def test_missing_map_set_is_named() -> None:
    with pytest.raises(ValueError, match="no map set 'lookup'"):
        paired_regions(_table({}), "T2", other="lookup")


def test_command_prints_both_quantities(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _table({"GM": 0.9})
    t1 = table.assign(quantity="T1")
    path = tmp_path / "regional.csv"
    pd.concat([table, t1]).to_csv(path, index=False)
    main([str(path)])
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["T1", "0.900", "1.000"]
    assert out[2].split()[0] == "T2"
