"""Selections of a dataset's subjects by protocol family and field strength (leave-one-family-out)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicom_node.cli import cli
from pipeline.protocol import Family
from training.evaluation.datasets import DatasetInfo
from training.phantom.selection import select_subjects, union_datasets

SUBJECTS = {  # id: (family, field, split)
    "sub-001": ("mprage", 3.0, "train"), "sub-002": ("ir-fspgr", 3.0, "train"), "sub-003": ("tfe", 1.5, "test"),
    "sub-004": ("ir-fspgr", 1.5, "test"), "sub-005": ("mprage", 1.5, "val"),
}


def _acquisition(family: str, field: float) -> dict[str, object]:
    return {"family": family, "field_strength_t": field, "ti_ms": 900.0, "shot_interval_ms": 2200.0,
            "echo_spacing_ms": 7.0, "flip_angle_deg": 9.0, "te_ms": 3.0}


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "world"
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    entries = []
    for sid, (family, field, part) in SUBJECTS.items():
        (root / sid).mkdir(parents=True)
        (root / sid / "T1.nii.gz").write_bytes(b"truth of " + sid.encode())
        entries.append({"id": sid, "acquisition": _acquisition(family, field), "split": part})
        split[part].append(sid)
    (root / "manifest.json").write_text(json.dumps({"format": "synthmrf-phantom/1", "seed": 3, "split": split,
                                                    "subjects": entries}))
    return root


def test_excluding_a_family_keeps_the_rest_with_their_split(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "no-ge"
    select_subjects(source, out, exclude=[Family.IR_FSPGR])
    info = DatasetInfo.read(out)
    assert sorted(info.entries) == ["sub-001", "sub-003", "sub-005"]
    assert (info.split("train"), info.split("val"), info.split("test")) == (["sub-001"], ["sub-005"], ["sub-003"])
    assert (out / "sub-003" / "T1.nii.gz").read_bytes() == b"truth of sub-003"  # a link, not a copy
    assert (out / "sub-003").is_symlink() and not (out / "sub-002").exists()
    assert info.protocol("sub-003").family is Family.TFE
    assert info.manifest["selected_from"]["excluded_families"] == ["ir-fspgr"]


def test_family_and_field_strength_combine(source: Path, tmp_path: Path) -> None:
    select_subjects(source, tmp_path / "ge-15", families=[Family.IR_FSPGR], fields_t=[1.5])
    assert DatasetInfo.read(tmp_path / "ge-15").split("all") == ["sub-004"]


def test_reselecting_into_the_same_folder_replaces_the_links(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "sel"
    select_subjects(source, out, families=[Family.MPRAGE])
    select_subjects(source, out, families=[Family.TFE])
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sub-003"]


def test_refusals_name_the_reason(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no subject matches"):
        select_subjects(source, tmp_path / "none", families=[Family.TFE], fields_t=[3.0])
    with pytest.raises(ValueError, match="is or lies inside the source"):
        select_subjects(source, source, families=[Family.TFE])  # would overwrite the source's own folders
    with pytest.raises(ValueError, match="holds files other than"):
        select_subjects(source, tmp_path, families=[Family.TFE])  # a folder with other things in it


def test_cli_prints_the_counts(source: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["phantom", "select", str(source), "--out", str(tmp_path / "ge"),
                                       "--family", "ir-fspgr"])
    assert result.exit_code == 0, result.output
    assert "2 subjects (1 train, 0 val, 1 test)" in result.output
    bad = CliRunner().invoke(cli, ["phantom", "select", str(source), "--out", str(tmp_path / "x"),
                                    "--family", "tfe", "--field-strength", "3"])
    assert bad.exit_code == 1 and "no subject matches" in bad.output


def _package(folder: Path, name: str, version: str, seed: int, train: list[str], val: list[str],
             init_from: str | None = None) -> Path:
    """A package folder with only its manifest (all that --unseen-by reads)."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({
        "format": "synthmrf-model/1", "name": name, "version": version,
        "training": {"dataset": {"seed": seed, "split": {"train": train, "val": val, "test": []}},
                     "config": {"init_from": init_from}}}))
    return folder


def test_unseen_by_drops_what_a_model_and_its_ancestors_trained_on(source: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"  # an installed ancestor, as the registry keeps it
    _package(models / "parent-1", "parent", "1", seed=3, train=["sub-001"], val=["sub-005"])
    child = _package(tmp_path / "child", "child", "0", seed=3, train=["sub-002"], val=[], init_from="parent-1")
    other_world = _package(tmp_path / "other", "other", "0", seed=4, train=["sub-003"], val=[])
    result = CliRunner().invoke(cli, ["phantom", "select", str(source), "--out", str(tmp_path / "fresh"),
                                      "--unseen-by", str(child), "--unseen-by", str(other_world),
                                      "--models-dir", str(models)])
    assert result.exit_code == 0, result.output
    info = DatasetInfo.read(tmp_path / "fresh")
    assert sorted(info.entries) == ["sub-003", "sub-004"]  # sub-003: the other model's world had another seed
    assert info.manifest["selected_from"]["unseen_by"] == ["child-0", "other-0", "parent-1"]

    orphan = _package(tmp_path / "orphan", "orphan", "0", seed=3, train=["sub-004"], val=[], init_from="gone-9")
    warned = CliRunner().invoke(cli, ["phantom", "select", str(source), "--out", str(tmp_path / "o"),
                                      "--unseen-by", str(orphan), "--models-dir", str(models)])
    assert warned.exit_code == 0 and "descends from gone-9" in warned.output
    assert "sub-004" not in DatasetInfo.read(tmp_path / "o").entries


def test_union_prefixes_ids_keeps_each_split_and_links(source: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-world"
    (other / "sub-001").mkdir(parents=True)
    (other / "sub-001" / "T1.nii.gz").write_bytes(b"other truth")
    (other / "manifest.json").write_text(json.dumps({
        "format": "synthmrf-phantom/1", "seed": 9, "options": {"world": "v4"},
        "split": {"train": [], "val": [], "test": ["sub-001"]},
        "subjects": [{"id": "sub-001", "acquisition": _acquisition("tfe", 3.0), "split": "test"}]}))
    result = CliRunner().invoke(cli, ["phantom", "union", str(source), str(other), "--out", str(tmp_path / "mix")])
    assert result.exit_code == 0, result.output
    assert "6 subjects (2 train, 1 val, 3 test)" in result.output
    info = DatasetInfo.read(tmp_path / "mix")
    assert info.split("test") == ["world-sub-003", "world-sub-004", "other-world-sub-001"]
    assert info.split("train") == ["world-sub-001", "world-sub-002"]
    assert (tmp_path / "mix" / "other-world-sub-001" / "T1.nii.gz").read_bytes() == b"other truth"
    assert (tmp_path / "mix" / "world-sub-003" / "T1.nii.gz").read_bytes() == b"truth of sub-003"
    assert info.protocol("other-world-sub-001").family is Family.TFE
    assert info.manifest["seed"] is None and "options" not in info.manifest
    assert [(u["prefix"], u["seed"]) for u in info.manifest["union_of"]] == [("world-", 3), ("other-world-", 9)]


def test_union_refusals_name_the_reason(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 datasets"):
        union_datasets([(source, "a-")], tmp_path / "u")
    with pytest.raises(ValueError, match="must be distinct"):
        union_datasets([(source, "a-"), (source, "a-")], tmp_path / "u")
    with pytest.raises(ValueError, match="letters, digits"):
        union_datasets([(source, "../a"), (source, "b-")], tmp_path / "u")
    first = union_datasets([(source, "a-"), (source, "b-")], tmp_path / "u").parent
    with pytest.raises(ValueError, match="is or lies inside the source"):  # a union's links are its content
        union_datasets([(first, "u-"), (source, "c-")], first)
    assert (first / "a-sub-001" / "T1.nii.gz").read_bytes() == b"truth of sub-001"  # untouched
    clash = tmp_path / "clash"
    (clash / "1-sub-001").mkdir(parents=True)
    (clash / "manifest.json").write_text(json.dumps({"format": "synthmrf-phantom/1",
                                                     "subjects": [{"id": "1-sub-001"}]}))
    with pytest.raises(ValueError, match="two subjects get the same id"):  # "a-1-" + "sub-001" = "a-" + "1-sub-001"
        union_datasets([(source, "a-1-"), (clash, "a-")], tmp_path / "u")
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "synthmrf-phantom/1", "sequence": {"name": "x"},
                                                     "subjects": []}))
    with pytest.raises(ValueError, match="manifest's 'sequence' differs"):
        union_datasets([(source, "a-"), (other, "b-")], tmp_path / "u")
    bad = CliRunner().invoke(cli, ["phantom", "union", str(source), str(other), "--prefix", "a-", "--out",
                                   str(tmp_path / "u")])
    assert bad.exit_code == 2 and "once per SOURCE" in bad.output


def test_unseen_by_follows_a_union_back_to_its_sources(source: Path, tmp_path: Path) -> None:
    """A model trained on a union records prefixed ids and the union's parts; its subjects of this source are
    known by stripping the prefix of the part with this source's seed."""
    union_model = json.loads(json.dumps({
        "name": "u", "version": "0",
        "training": {"dataset": {"seed": None, "union_of": [{"prefix": "w-", "seed": 3}, {"prefix": "o-", "seed": 4}],
                                 "split": {"train": ["w-sub-001", "o-sub-002"], "val": ["w-sub-005"], "test": []}}}}))
    select_subjects(source, tmp_path / "fresh", unseen_by=[union_model])
    assert sorted(DatasetInfo.read(tmp_path / "fresh").entries) == ["sub-002", "sub-003", "sub-004"]
