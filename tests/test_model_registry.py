"""Model registry and ``synthmrf model ...``: install, verify, activate, roll back, refuse bad packages."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dicom_node.cli import cli
from dicom_node.commands import model as model_commands
from pipeline.model.package import WEIGHTS, PackageError, write_package
from pipeline.model.registry import ModelEntry, ModelRegistry, RegistryError
from pipeline.model.unet import UNetConfig, UNetEnsemble
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence

TINY = UNetConfig(n_nets=7, base_filters=2, depth=4)
MakePackage = Callable[..., Path]


@pytest.fixture
def make_package(tmp_path: Path, default_sequence: Sequence, default_dictionary: Dictionary) -> MakePackage:
    """Write a tiny package into ``tmp_path/src``; defaults fit the default sequence and dictionary."""

    def make(version: str = "1.0", *, basis_sign: float = 1.0, sequence_json: str | None = None) -> Path:
        torch.manual_seed(0)
        state = UNetEnsemble(TINY).state_dict()
        ranges = np.tile(np.array([[-0.5, 1.0]], dtype=np.float32), (7, 1))
        return write_package(
            tmp_path / "src" / f"tiny-{version}", name="tiny", version=version, state=state, unet=TINY,
            channel_ranges=ranges, sequence_json=sequence_json or default_sequence.to_json(),
            basis=basis_sign * default_dictionary.basis[:, :4], training={"created": "2024-05-01T12:00:00Z"},
            metrics={"ccc_t1": 0.91, "ccc_t2": 0.82})

    return make


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models", shipped_dir=tmp_path / "shipped")


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)


def leftovers(root: Path) -> list[str]:
    """Registry entries other than packages, the state file and the lock (i.e. staging debris)."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock")


def test_install_from_folder_lists_and_verifies(registry: ModelRegistry, make_package: MakePackage,
                                                default_sequence: Sequence) -> None:
    assert registry.install(make_package()) == "tiny-1.0"
    [entry] = registry.list()
    assert (entry.name, entry.source, entry.active) == ("tiny-1.0", "installed", False)
    assert entry.path == registry.root / "tiny-1.0"
    assert entry.sequence_hash == default_sequence.hash()
    assert entry.created == "2024-05-01T12:00:00Z"
    assert entry.metrics_summary() == "ccc_t1=0.91 ccc_t2=0.82"
    report = registry.verify("tiny-1.0")
    assert report.checks == ("checksums", "load", "sequence and basis", "smoke inference")
    assert 0.0 <= report.in_range_fraction <= 1.0
    assert registry.info("tiny-1.0")["version"] == "1.0"
    assert leftovers(registry.root) == []


def test_nested_metrics_are_listed_by_their_path() -> None:
    """Manifests since 0.8 nest their metrics (per data set and map); the list shows them, not "-"."""
    metrics = {"out_of_world": {"source": "text is skipped", "ccc": {"ds1": {"T1": 0.953, "T2": 0.9}, "ds2": {"T1": 1}},
                                "flag": True}, }
    entry = ModelEntry("m-1", "builtin", Path("m"), {"metrics": metrics}, active=False)
    assert entry.metrics_summary() == "ccc.ds1.T1=0.953 ccc.ds1.T2=0.9 ccc.ds2.T1=1"
    assert entry.metrics_summary(limit=1) == "ccc.ds1.T1=0.953"
    flat = ModelEntry("m-1", "builtin", Path("m"), {"metrics": {"a": {"x": 0.5}, "b": 2}}, active=False)
    assert flat.metrics_summary() == "a.x=0.5 b=2"
    assert ModelEntry("m-1", "builtin", Path("m"), {"metrics": {"note": "none"}}, active=False).metrics_summary() == "-"


@pytest.mark.parametrize("fmt", ["gztar", "zip"])
def test_install_from_archive(registry: ModelRegistry, make_package: MakePackage, tmp_path: Path, fmt: str) -> None:
    folder = make_package()
    archive = Path(shutil.make_archive(str(tmp_path / "tiny"), fmt, root_dir=folder.parent, base_dir=folder.name))
    assert registry.install(archive) == "tiny-1.0"
    assert (registry.root / "tiny-1.0" / WEIGHTS).is_file()
    assert leftovers(registry.root) == []


def test_archive_with_package_files_at_top_level(registry: ModelRegistry, make_package: MakePackage,
                                                 tmp_path: Path) -> None:
    folder = make_package()
    archive = tmp_path / "flat.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for file in folder.iterdir():
            tar.add(file, arcname=file.name)
    assert registry.install(archive) == "tiny-1.0"


def test_activate_rollback_and_history(registry: ModelRegistry, make_package: MakePackage) -> None:
    registry.install(make_package("1.0"))
    registry.install(make_package("1.1"))
    assert registry.active_name() is None
    registry.activate("tiny-1.0")
    registry.activate("tiny-1.1")
    state = json.loads((registry.root / "active.json").read_text())
    assert state == {"active": "tiny-1.1", "history": ["tiny-1.0"]}
    assert [e.name for e in registry.list() if e.active] == ["tiny-1.1"]
    assert registry.active_package().name == "tiny-1.1"
    assert registry.rollback() == "tiny-1.0"
    assert json.loads((registry.root / "active.json").read_text()) == {"active": "tiny-1.0", "history": []}
    with pytest.raises(RegistryError, match="rollback: no previous model"):
        registry.rollback()
    assert leftovers(registry.root) == []


def test_builtin_packages_are_listed_and_the_newest_is_active(tmp_path: Path, make_package: MakePackage) -> None:
    shipped = tmp_path / "shipped"
    for version in ("1.9", "1.10"):
        shutil.copytree(make_package(version), shipped / f"tiny-{version}")
    registry = ModelRegistry(tmp_path / "models", shipped_dir=shipped)
    entries = {e.name: e for e in registry.list()}
    assert {n: (e.source, e.active) for n, e in entries.items()} == {
        "tiny-1.9": ("builtin", False), "tiny-1.10": ("builtin", True)}
    assert registry.verify().name == "tiny-1.10"
    registry.activate("tiny-1.9")
    assert registry.rollback() == "tiny-1.10"
    with pytest.raises(RegistryError, match=r"'tiny-1\.9': a built-in package has this name"):
        registry.install(shipped / "tiny-1.9")


def test_an_activated_builtin_that_an_upgrade_replaced_gives_way_to_its_successor(
        tmp_path: Path, make_package: MakePackage, caplog: pytest.LogCaptureFixture) -> None:
    shipped = tmp_path / "shipped"
    shutil.copytree(make_package("1.0"), shipped / "tiny-1.0")
    registry = ModelRegistry(tmp_path / "models", shipped_dir=shipped)
    registry._write_state("tiny-1.0", [])  # activated by name (after another model, say)
    shutil.rmtree(shipped / "tiny-1.0")  # the upgrade ships 2.0 instead
    shutil.copytree(make_package("2.0"), shipped / "tiny-2.0")
    with caplog.at_level(logging.WARNING, logger="pipeline.model.registry"):
        assert registry.active_name() == "tiny-2.0"
    assert "tiny-1.0 is activated but no longer ships" in caplog.text
    registry._write_state("other-1.0", [])  # an installed package of another name that vanished: no guessing
    with pytest.raises(RegistryError, match=r"'other-1\.0': not installed and not built in"):
        registry.active_package()


def test_without_any_model_there_is_no_active_one(registry: ModelRegistry) -> None:
    assert registry.list() == []
    with pytest.raises(RegistryError, match="no active model"):
        registry.active_package()
    with pytest.raises(RegistryError, match="rollback: no previous model"):
        registry.rollback()
    with pytest.raises(RegistryError, match=r"model 'nope-1': not installed and not built in"):
        registry.activate("nope-1")


def test_corrupted_weights_are_refused_at_install(registry: ModelRegistry, make_package: MakePackage) -> None:
    folder = make_package()
    flip_byte(folder / WEIGHTS)
    with pytest.raises(PackageError, match=f"{re.escape(str(folder / WEIGHTS))}: checksum mismatch"):
        registry.install(folder)
    assert not (registry.root / "tiny-1.0").exists()
    assert leftovers(registry.root) == []


def test_corrupted_weights_are_refused_at_verify_and_activate(registry: ModelRegistry,
                                                              make_package: MakePackage) -> None:
    registry.install(make_package())
    flip_byte(registry.root / "tiny-1.0" / WEIGHTS)
    with pytest.raises(PackageError, match=rf"tiny-1\.0/{re.escape(WEIGHTS)}: checksum mismatch"):
        registry.verify("tiny-1.0")
    with pytest.raises(PackageError, match=rf"tiny-1\.0/{re.escape(WEIGHTS)}: checksum mismatch"):
        registry.activate("tiny-1.0")


def test_flipped_basis_is_refused(registry: ModelRegistry, make_package: MakePackage) -> None:
    with pytest.raises(PackageError, match=r"tiny-1\.0: its SVD basis differs from the installed dictionary's"):
        registry.install(make_package(basis_sign=-1.0))
    assert leftovers(registry.root) == []
    assert not (registry.root / "tiny-1.0").exists()


def test_package_for_another_sequence_is_refused(registry: ModelRegistry, make_package: MakePackage,
                                                 default_sequence: Sequence) -> None:
    doc = json.loads(default_sequence.to_json())
    doc["tr_ms"] = 9.4
    with pytest.raises(PackageError, match=r"tiny-1\.0: trained for sequence [0-9a-f]{12}, the dictionary is for"):
        registry.install(make_package(sequence_json=json.dumps(doc)))
    assert not (registry.root / "tiny-1.0").exists()


def test_reinstall_needs_force(registry: ModelRegistry, make_package: MakePackage) -> None:
    folder = make_package()
    registry.install(folder)
    with pytest.raises(RegistryError, match=r"'tiny-1\.0': already installed in .* \(use --force"):
        registry.install(folder)
    assert registry.install(folder, force=True) == "tiny-1.0"
    assert [e.name for e in registry.list()] == ["tiny-1.0"]
    assert leftovers(registry.root) == []


def test_cli_model_commands(tmp_path: Path, make_package: MakePackage, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the product's built-in package, so that "nothing installed" can be exercised.
    monkeypatch.setattr(model_commands, "_registry", lambda: ModelRegistry(
        click.get_current_context().obj, shipped_dir=tmp_path / "no-builtin"))
    runner = CliRunner()
    root = str(tmp_path / "models")

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, ["model", "--models-dir", root, *args])
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
            result.output
        return result.exit_code, result.output

    assert run("list") == (0, "no model packages (install one with 'synthmrf model install PATH')\n")
    code, out = run("verify")
    assert code == 1 and "Error: no active model" in out
    assert run("install", str(make_package("1.0"))) == (0, "installed tiny-1.0\n")
    assert run("install", str(make_package("1.1"))) == (0, "installed tiny-1.1\n")
    code, out = run("install", str(tmp_path / "src" / "tiny-1.0"))
    assert code == 1 and "already installed" in out and "Traceback" not in out
    assert run("activate", "tiny-1.0") == (0, "active: tiny-1.0\n")
    assert run("activate", "tiny-1.1") == (0, "active: tiny-1.1\n")
    code, out = run("list")
    assert code == 0 and out.splitlines()[1].startswith("* tiny-1.1  installed  seq ")
    code, out = run("verify")
    assert code == 0 and "ok  smoke inference" in out and "tiny-1.1: verified" in out
    code, out = run("info")
    assert code == 0 and json.loads(out)["version"] == "1.1"
    assert run("rollback") == (0, "active: tiny-1.0\n")
    code, out = run("rollback")
    assert code == 1 and "Error: rollback: no previous model" in out
    code, out = run("activate", "missing-9")
    assert code == 1 and "model 'missing-9': not installed" in out


def test_cli_models_dir_from_environment(tmp_path: Path, make_package: MakePackage) -> None:
    result = CliRunner().invoke(cli, ["model", "install", str(make_package())],
                                env={"SYNTHMRF_MODELS_DIR": str(tmp_path / "env-models")})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "env-models" / "tiny-1.0").is_dir()


@pytest.mark.parametrize("command", [[], ["list"], ["install"], ["verify"], ["activate"], ["rollback"], ["info"]])
def test_cli_help(command: list[str]) -> None:
    result = CliRunner().invoke(cli, ["model", *command, "--help"])
    assert result.exit_code == 0 and "Usage: cli model" in result.output
