"""Sequence files: the shipped default, parsing errors, and the content hash."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.mrf.sequence import (
    DEFAULT_SEQUENCE,
    design_default_schedule,
    load_sequence,
    parse_sequence,
    sequence_dir,
)


def test_shipped_default_is_what_the_documented_design_produces() -> None:
    shipped = load_sequence(DEFAULT_SEQUENCE)
    designed, recipe = design_default_schedule()
    assert shipped.hash() == designed.hash()
    doc = json.loads((sequence_dir() / f"{DEFAULT_SEQUENCE}.json").read_text())
    assert doc["design"] == recipe


def test_default_schedule_follows_the_method() -> None:
    seq = load_sequence(DEFAULT_SEQUENCE)
    assert np.all(seq.tr_ms == 9.3)
    assert 500 <= seq.n_frames <= 1000
    assert 60 <= seq.flip_angle_deg.max() <= 75
    assert seq.inversion_ti_ms is not None
    # Smoothly varying: no frame-to-frame jump above 2 degrees.
    assert np.abs(np.diff(seq.flip_angle_deg)).max() < 2.0


def test_every_shipped_sequence_loads() -> None:
    files = sorted(sequence_dir().glob("*.json"))
    assert files
    for path in files:
        assert load_sequence(path).name == path.stem


def test_hash_ignores_formatting_and_description_but_not_physics(tmp_path: Path) -> None:
    doc = {"name": "x", "tr_ms": 10, "te_ms": 2, "flip_angle_deg": [10, 20, 30], "inversion_ti_ms": 20}
    base = parse_sequence(doc).hash()
    assert parse_sequence({**doc, "description": "other words"}).hash() == base
    assert parse_sequence({**doc, "tr_ms": [10.0, 10.0, 10.0]}).hash() == base
    assert parse_sequence({**doc, "flip_angle_deg": [10, 20, 31]}).hash() != base
    assert parse_sequence({**doc, "inversion_ti_ms": None}).hash() != base
    path = tmp_path / "x.json"
    path.write_text(json.dumps(doc, indent=4))
    assert load_sequence(path).hash() == base


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tr_ms": [10, 10]}, r"tr_ms: expected 3 entries"),
        ({"te_ms": 12}, r"te_ms: must satisfy 0 <= TE < TR"),
        ({"flip_angle_deg": "10"}, r"flip_angle_deg: expected a list of numbers"),
        ({"flip_angle_deg": [10, 200, 10]}, r"flip_angle_deg: \|angle\| must be <= 180"),
        ({"inversion_ti_ms": -1}, r"inversion_ti_ms: must be >= 0 or null"),
        ({"tr_ms": "fast"}, r"tr_ms: expected a number or a list"),
    ],
)
def test_invalid_sequences_name_the_field(change: dict[str, object], message: str) -> None:
    doc = {"name": "x", "tr_ms": 10, "te_ms": 2, "flip_angle_deg": [10, 20, 30], "inversion_ti_ms": 20}
    with pytest.raises(ValueError, match=message):
        parse_sequence({**doc, **change})


def test_missing_fields_and_unknown_names_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing field\(s\): flip_angle_deg"):
        parse_sequence({"name": "x", "tr_ms": 10, "te_ms": 2, "inversion_ti_ms": None})
    with pytest.raises(FileNotFoundError, match=r"sequence 'nope': no such file"):
        load_sequence("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        load_sequence(bad)
