"""The ``synthmrf mrf`` and ``synthmrf demo`` commands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from dicom_node.cli import cli
from pipeline.mrf.dictionary import Dictionary
from pipeline.volume_io import load_volume, save_volume

AFFINE = np.array([[-1.0, 0, 0, 90], [0, 1.0, 0, -120], [0, 0, 1.2, -60], [0, 0, 0, 1]])


@pytest.fixture()
def maps(tmp_path: Path) -> dict[str, Path]:
    """A 6x5x4 volume: WM-like left half, GM-like right half, one empty voxel."""
    t1 = np.where(np.arange(6)[:, None, None] < 3, 830.0, 1500.0) * np.ones((6, 5, 4))
    t2 = np.where(np.arange(6)[:, None, None] < 3, 80.0, 100.0) * np.ones((6, 5, 4))
    pd = np.full((6, 5, 4), 0.8)
    pd[0, 0, 0] = 0
    return {name: save_volume(tmp_path / f"{name}.nii.gz", values, AFFINE)
            for name, values in (("T1", t1), ("T2", t2), ("PD", pd))}


def test_help_on_every_level() -> None:
    runner = CliRunner()
    for args in ([], ["mrf"], ["mrf", "simulate"], ["mrf", "match"], ["mrf", "dictionary"], ["mrf", "demo"], ["demo"]):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


def test_simulate_then_match_round_trip(maps: dict[str, Path], tmp_path: Path,
                                        default_dictionary: Dictionary) -> None:
    runner = CliRunner()
    sv = tmp_path / "SV.nii.gz"
    result = runner.invoke(cli, ["mrf", "simulate", "--t1", str(maps["T1"]), "--t2", str(maps["T2"]),
                                 "--pd", str(maps["PD"]), "--out", str(sv), "--rank", "4"])
    assert result.exit_code == 0, result.output
    img = nib.load(sv)
    assert img.shape == (6, 5, 4, 4) and img.get_data_dtype() == np.complex64
    assert np.allclose(img.affine, AFFINE)
    coeffs = np.asanyarray(img.dataobj)
    assert np.all(coeffs[0, 0, 0] == 0)
    assert np.allclose(coeffs[1:, ..., 0].imag, 0) and np.all(coeffs[1:, ..., 0].real > 0)  # phase-normalised

    out = tmp_path / "maps"
    result = runner.invoke(cli, ["mrf", "match", "--svd", str(sv), "--out", str(out)])
    assert result.exit_code == 0, result.output
    t1, affine = load_volume(out / "T1.nii.gz")
    t2, _ = load_volume(out / "T2.nii.gz")
    pd, _ = load_volume(out / "PD.nii.gz")
    assert np.allclose(affine, AFFINE)
    truth_t1, _ = load_volume(maps["T1"])
    inside = np.ones(t1.shape, bool)
    inside[0, 0, 0] = False
    assert t1[0, 0, 0] == 0 and pd[0, 0, 0] == 0
    assert np.all(np.abs(np.log(t1[inside] / truth_t1[inside])) <= np.log(1.02))
    assert np.all(np.abs(pd[inside] / 0.8 - 1) < 0.02)
    assert np.all((t2[inside] > 75) & (t2[inside] < 105))


def test_simulate_with_noise_is_seeded(maps: dict[str, Path], tmp_path: Path,
                                       default_dictionary: Dictionary) -> None:
    runner = CliRunner()
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.nii.gz"
        args = ["mrf", "simulate", "--t1", str(maps["T1"]), "--t2", str(maps["T2"]), "--pd", str(maps["PD"]),
                "--out", str(out), "--snr", "20", "--seed", "3"]
        assert runner.invoke(cli, args).exit_code == 0
        outputs.append(load_volume(out)[0])
    assert np.array_equal(outputs[0], outputs[1])
    assert np.all(outputs[0][0, 0, 0] == 0)  # no noise where there is no tissue


def test_match_refuses_real_valued_input(maps: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["mrf", "match", "--svd", str(maps["T1"]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "expected a 4-D complex NIfTI" in result.output


def test_dictionary_command_reports_grid_and_energy(default_dictionary: Dictionary) -> None:
    result = CliRunner().invoke(cli, ["mrf", "dictionary"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["atoms"] == default_dictionary.n_atoms
    assert info["sequence_hash"] == default_dictionary.sequence_hash
    assert 0.99 < info["energy_fraction"]["4"] < info["energy_fraction"]["8"] <= 1


def test_physics_demo_runs_end_to_end_as_a_console_script(tmp_path: Path, default_dictionary: Dictionary) -> None:
    exe = Path(sys.executable).with_name("synthmrf")
    done = subprocess.run([str(exe), "mrf", "demo", "--workdir", str(tmp_path / "demo")], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "white matter" in done.stdout and "NO" not in done.stdout
    assert (tmp_path / "demo" / "qc.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "T1.nii.gz").is_file()


@pytest.mark.parametrize("command", [["mrf", "dictionary"], ["mrf", "demo"], ["demo"], ["process", "x"],
                                     ["train"], ["evaluate"]])
def test_every_computing_command_checks_its_device(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown device, or a CUDA device this machine lacks, is a usage error before any work."""
    import torch

    runner = CliRunner()
    result = runner.invoke(cli, [*command, "--device", "gpu"])
    assert result.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in result.output, result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(cli, [*command, "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device here" in result.output, result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = runner.invoke(cli, [*command, "--device", "cuda:1"])
    assert result.exit_code == 2 and "has 1 CUDA device(s)" in result.output, result.output
