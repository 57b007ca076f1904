"""The intensity-lookup baseline: exact on a monotone intensity -> T1 relation, per field strength, and
never applied to a subject it was fitted on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import training.evaluation.baseline as baseline_module
from pipeline.npz_cache import read_cached
from training.evaluate_model import evaluation_mask
from training.evaluation.baseline import IntensityLookup, LookupBaseline, LookupSample, fit_baseline
from training.evaluation.datasets import DatasetInfo

LEVELS = np.linspace(0.2, 1.8, 17)  # 0.1 apart: far wider than a bin (1.6 / 256), so one level per bin


def t1_of(x: np.ndarray, field: float = 3.0) -> np.ndarray:
    """A monotone (decreasing) T1 of normalised intensity, different per field strength."""
    return (4000.0 * np.exp(-1.5 * x) + 300.0) * (1.0 if field == 3.0 else 0.8)


def t2_of(x: np.ndarray) -> np.ndarray:
    return 40.0 + 200.0 / (1.0 + 5.0 * x)


def sample(name: str, seed: int, field: float = 3.0) -> LookupSample:
    x = np.random.default_rng(seed).choice(LEVELS, 5000).astype(np.float32).astype(np.float64)  # as prepared
    return LookupSample(Path("/data/ds") / name, field, x, t1_of(x, field), t2_of(x))


def test_lookup_recovers_a_monotone_relation_exactly() -> None:
    baseline = LookupBaseline.fit([sample("sub-001", 1), sample("sub-002", 2)], "p95")
    shape = (6, 6, 5)
    volume = np.random.default_rng(3).choice(LEVELS, shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[1:5, 1:5, 1:4] = True
    maps = baseline.maps(Path("/data/ds/sub-003"), volume, mask, 3.0)
    expected = t1_of(volume[mask].astype(np.float64))
    np.testing.assert_allclose(maps["T1"][mask], expected, rtol=1e-6)
    np.testing.assert_allclose(maps["T2"][mask], t2_of(volume[mask].astype(np.float64)), rtol=1e-6)
    assert not maps["T1"][~mask].any() and not maps["T2"][~mask].any()


def test_empty_bins_interpolate_and_the_range_clamps() -> None:
    lookup = IntensityLookup.fit(np.array([0.0, 0.0, 1.0, 1.0]), np.array([100.0, 300.0, 1000.0, 1000.0]),
                                 np.zeros(4), n_bins=4)
    assert lookup.n_voxels.tolist() == [2, 0, 0, 2]
    assert lookup.t1_ms.tolist() == pytest.approx([200.0, 200.0 + 800 / 3, 200.0 + 1600 / 3, 1000.0])  # medians
    assert lookup(np.array([-5.0, 0.3, 7.0]))[0].tolist() == pytest.approx([200.0, 200.0 + 800 / 3, 1000.0])


def test_one_lookup_per_field_strength() -> None:
    baseline = LookupBaseline.fit([sample("sub-001", 1, 3.0), sample("sub-002", 2, 1.5)], "p95")
    assert list(baseline.tables) == [1.5, 3.0]
    x = LEVELS[None, None, :].astype(np.float32)
    mask = np.ones(x.shape, bool)
    for field in (1.5, 3.0):
        t1 = baseline.maps(Path("/data/ds/sub-009"), x, mask, field)["T1"]
        np.testing.assert_allclose(t1.ravel(), t1_of(LEVELS, field), rtol=1e-6)
    # A field strength without training subjects takes the nearest lookup.
    np.testing.assert_allclose(baseline.maps(Path("/data/ds/sub-009"), x, mask, 7.0)["T1"].ravel(),
                               t1_of(LEVELS, 3.0), rtol=1e-6)


def test_lookup_refuses_its_training_subjects() -> None:
    baseline = LookupBaseline.fit([sample("sub-001", 1), sample("sub-002", 2)], "p95")
    volume = np.ones((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="fitted on this subject"):
        baseline.maps(Path("/data/ds/sub-002"), volume, volume > 0, 3.0)
    baseline.maps(Path("/data/other/sub-002"), volume, volume > 0, 3.0)  # same id, another dataset


def test_fitted_on_the_train_split_only(tiny_dataset: Path, tmp_path: Path) -> None:
    data = DatasetInfo.read(tiny_dataset)
    baseline = fit_baseline(data, tmp_path / "cache", "p95", progress=False)
    assert baseline.fitted_on == {(tiny_dataset / s).resolve() for s in data.split("train")}
    assert not baseline.fitted_on & {(tiny_dataset / s).resolve() for s in data.split("test") + data.split("val")}
    # A dataset whose train split is empty cannot give a baseline.
    empty = tmp_path / "no-train"
    empty.mkdir()
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    (empty / "manifest.json").write_text(json.dumps({**manifest, "split": {**manifest["split"], "train": []}}))
    with pytest.raises(ValueError, match="train split is empty"):
        fit_baseline(DatasetInfo.read(empty), tmp_path / "cache", "p95", progress=False)


def test_a_fitted_lookup_is_read_back_from_the_cache(tiny_dataset: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "ds"  # a copy: a file of it is touched below
    shutil.copytree(tiny_dataset, own)
    data = DatasetInfo.read(own)
    fitted = fit_baseline(data, tmp_path / "cache", "p95", progress=False)
    assert len(list((tmp_path / "cache").glob("lookup-*.npz"))) == 1

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lookup was fitted again")

    monkeypatch.setattr(baseline_module, "subject_sample", no_fit)
    cached = fit_baseline(data, tmp_path / "cache", "p95", progress=False)
    assert cached.fitted_on == fitted.fitted_on and cached.normalisation == "p95"
    assert cached.tables.keys() == fitted.tables.keys()
    for field, table in fitted.tables.items():
        for name in ("edges", "t1_ms", "t2_ms", "n_voxels"):
            np.testing.assert_array_equal(getattr(cached.tables[field], name), getattr(table, name))
    # Another normalisation, or another split of the same subjects, is another key: fitted anew.
    with pytest.raises(AssertionError, match="fitted again"):
        fit_baseline(data, tmp_path / "cache", "max", progress=False)
    moved = tmp_path / "moved"
    moved.mkdir()
    for subject in data.split("all"):
        (moved / subject).symlink_to(own / subject)
    manifest = json.loads((own / "manifest.json").read_text())
    split = manifest["split"]
    (moved / "manifest.json").write_text(json.dumps({**manifest, "split": {**split, "train": split["val"],
                                                                           "val": split["train"]}}))
    with pytest.raises(AssertionError, match="fitted again"):
        fit_baseline(DatasetInfo.read(moved), tmp_path / "cache", "p95", progress=False)
    # A training subject's file rewritten: fitted anew.
    truth = own / data.split("train")[0] / "T2.nii.gz"
    os.utime(truth, ns=(truth.stat().st_atime_ns, truth.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(AssertionError, match="fitted again"):
        fit_baseline(data, tmp_path / "cache", "p95", progress=False)


def test_an_unreadable_cached_lookup_is_fitted_again(tiny_dataset: Path, tmp_path: Path) -> None:
    data = DatasetInfo.read(tiny_dataset)
    fitted = fit_baseline(data, tmp_path / "cache", "p95", progress=False)
    (stored,) = (tmp_path / "cache").glob("lookup-*.npz")
    stored.write_bytes(stored.read_bytes()[:100])  # truncated, as after a crash without fsync
    refitted = fit_baseline(data, tmp_path / "cache", "p95", progress=False)
    for field, table in fitted.tables.items():
        np.testing.assert_array_equal(refitted.tables[field].t1_ms, table.t1_ms)
    assert read_cached(stored, ("fields",)) is not None  # and the cache was written whole again


def test_evaluation_mask_keeps_every_nth_prepared_slice() -> None:
    brain = np.ones((2, 2, 10), bool)
    mask = evaluation_mask(brain, np.array([2, 3, 4, 5, 6, 7]), 2)
    assert np.flatnonzero(mask.any(axis=(0, 1))).tolist() == [2, 4, 6]
    assert evaluation_mask(brain, np.arange(10)).all()
