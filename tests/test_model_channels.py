"""No wasted networks: a channel whose training targets carry no signal is recorded in the package, its
network is skipped at inference and the matcher gets exact zeros there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_mrf_epg import bloch_isochromats, short_schedule

from dicom_node.cli import cli
from pipeline.model.inference import synthesise_channels
from pipeline.model.package import SHIPPED_DIR, ModelPackage, load_package
from pipeline.model.unet import UNetConfig, UNetEnsemble, subset
from pipeline.mrf.coefficients import CHANNEL_NAMES, channel_peaks, signal_channels


def test_a_complex_dictionary_keeps_its_imaginary_channels_and_a_real_one_does_not() -> None:
    rng = np.random.default_rng(0)
    real = rng.standard_normal((500, 4)).astype(np.float32)
    real[:, 0] = np.abs(real[:, 0]) + 1.0
    assert signal_channels(real) == (True, True, False, True, False, True, False)
    complex_atoms = real.astype(np.complex64)
    complex_atoms[:, 2] += 0.01j * rng.standard_normal(500)  # signal in SV3's imaginary part only
    assert signal_channels(complex_atoms) == (True, True, False, True, True, True, False)
    assert 0 < channel_peaks(complex_atoms)[4] < 0.05 * channel_peaks(complex_atoms)[1]


def test_an_independent_bloch_simulation_gives_the_same_verdict_as_our_dictionary() -> None:
    """The isochromat Bloch simulation of test_mrf_epg (complex, spatial domain) projected on a basis: its
    coefficients have no imaginary part either (RF about y keeps the FISP signal real)."""
    sequence = short_schedule()
    signals = np.stack([bloch_isochromats(sequence, t1, t2) for t1, t2 in [(800, 60), (1400, 100), (4000, 2000),
                                                                          (300, 40), (1000, 400)]])
    basis = np.linalg.svd(signals.real.T, full_matrices=False)[0][:, :4]
    assert signal_channels(signals @ basis) == (True, True, False, True, False, True, False)


def test_a_subset_computes_exactly_the_same_channels() -> None:
    torch.manual_seed(0)
    model = UNetEnsemble(UNetConfig(protocol_features=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        x, f = torch.randn(2, 1, 32, 32), torch.randn(2, 2)
        full = model(x, f)
        part = subset(model, [0, 3, 5])(x, f)
    assert part.shape == (2, 3, 32, 32)
    torch.testing.assert_close(part, full[:, [0, 3, 5]], rtol=0, atol=0)


def test_the_shipped_model_skips_the_empty_channels_and_gives_zeros_there(monkeypatch: pytest.MonkeyPatch) -> None:
    package = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    assert package.signal_channels == (True, True, False, True, False, True, False)
    rng = np.random.default_rng(1)
    volume = rng.uniform(0.2, 1.0, (48, 48, 3)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[8:40, 8:40, :] = True
    volume[~mask] = 0
    features = np.zeros(package.model.config.protocol_features, np.float32)
    skipped = synthesise_channels(volume, mask, package, protocol=features)
    monkeypatch.setattr(ModelPackage, "signal_channels", property(lambda self: (True,) * len(CHANNEL_NAMES)))
    every = synthesise_channels(volume, mask, package, protocol=features)
    empty = [k for k, name in enumerate(CHANNEL_NAMES) if name.endswith("_im")]
    assert not skipped[..., empty].any()
    kept = [k for k in range(len(CHANNEL_NAMES)) if k not in empty]
    np.testing.assert_allclose(skipped[..., kept], every[..., kept], rtol=0, atol=1e-6)
    assert np.abs(every[mask][:, empty]).max() > 0  # the networks skipped would have given noise there


def test_model_info_shows_the_decision() -> None:
    result = CliRunner().invoke(cli, ["model", "info", "synthmrf-phantom-0.9"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)["channel_signal"]
    assert doc["carries_signal"] == [True, True, False, True, False, True, False]


def test_trained_on_summarises_the_training_record_without_subject_lists() -> None:
    def package(manifest: dict[str, object]) -> ModelPackage:
        return ModelPackage(path=SHIPPED_DIR, manifest=manifest, model=None, channel_ranges=np.zeros((7, 2)),  # type: ignore[arg-type]
                            basis=np.zeros((1000, 4)), sequence=None)  # type: ignore[arg-type]

    dataset = {"path_name": "mix", "seed": None, "subjects": {"train": 3, "val": 1, "test": 1},
               "split": {"train": ["a", "b", "c"], "val": ["d"], "test": ["e"]},
               "union_of": [{"prefix": "s41-", "seed": 41}, {"prefix": "v4-", "seed": 71}]}
    record = package({"training": {"dataset": dataset, "config": {"init_from": "synthmrf-phantom-0.5"}}}).trained_on
    assert record == {"path_name": "mix", "seed": None, "subjects": {"train": 3, "val": 1, "test": 1},
                      "union_of": [{"prefix": "s41-", "seed": 41}, {"prefix": "v4-", "seed": 71}],
                      "init_from": "synthmrf-phantom-0.5"}
    assert package({"training": {"dataset": {"seed": 5}, "config": {"init_from": None}}}).trained_on == {"seed": 5}
    assert package({}).trained_on == {}
    shipped = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    assert shipped.trained_on["subjects"] == shipped.manifest["training"]["dataset"]["subjects"]  # type: ignore[index]
