"""On-disk array caches: a damaged or unwritable cache costs a recomputation, never a failure."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.npz_cache import read_cached, write_cached


def test_round_trip_and_every_kind_of_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "sub" / "cache.npz"
    assert read_cached(path, ("a",)) is None  # absent
    assert write_cached(path, {"a": np.arange(5), "name": "seq"})
    got = read_cached(path, ("a", "name"))
    assert got is not None and got["a"].tolist() == [0, 1, 2, 3, 4] and str(got["name"]) == "seq"
    assert [p.name for p in path.parent.iterdir()] == ["cache.npz"]  # no temporary file left
    whole = path.read_bytes()
    caplog.set_level(logging.WARNING)
    for damaged in (whole[: len(whole) // 2], b"", b"not a zip file at all"):
        path.write_bytes(damaged)
        assert read_cached(path, ("a",)) is None
    path.write_bytes(whole)
    assert read_cached(path, ("a", "missing")) is None  # a key missing: an older format
    assert caplog.text.count("ignoring unreadable cache") == 4


def test_an_unwritable_place_is_reported_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "cache-dir"
    blocker.write_text("a file where the cache folder should be")  # fails for root too, unlike a chmod
    assert not write_cached(blocker / "cache.npz", {"a": np.zeros(3)})
    assert "cannot cache" in caplog.text and blocker.read_text().startswith("a file")


def test_a_full_disk_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(file: object, **arrays: object) -> None:
        Path(str(file)).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    assert not write_cached(tmp_path / "cache.npz", {"a": np.zeros(3)})
    assert list(tmp_path.iterdir()) == []
