"""The seven-U-Net ensemble, training data preparation, the training loop, packages and evaluation."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from dicom_node.cli import cli
from pipeline.apparent_t1 import apparent_t1_plane
from pipeline.model.inference import features_for, network_input, synthesise_channels
from pipeline.model.package import check_compatible, load_package
from pipeline.model.unet import UNetConfig, UNetEnsemble, expand_input_planes, network_slice, parameter_counts
from pipeline.mrf.dictionary import Dictionary
from pipeline.normalise import intensity_scale, normalise
from pipeline.protocol import N_FEATURES, PAPER_PROTOCOL, protocol_features
from training.packaging import package_run
from training.preprocess import channel_ranges, load_dataset, prepared_reference_t2
from training.train import (
    TrainConfig,
    _holding_model,
    _sample_batch,
    _validation_set,
    held_batch,
    learning_rate_at,
    masked_mse,
    train,
    validation_mse,
)

TINY = UNetConfig(n_nets=7, base_filters=4, depth=4, dropout=0.1)


def test_parameter_count_reconciles_with_the_paper() -> None:
    counts = parameter_counts(UNetEnsemble())
    # method.md: one U-Net of this shape (up-sample + 2x2 conv decoder, no batch norm) has 1,940,817
    # conv parameters; the paper's 1,940,902 most plausibly describes one network, not seven.
    assert counts["per_network_conv"] == 1_940_817
    assert counts["per_network_batchnorm"] == 2 * 2 * (16 + 32 + 64 + 128 + 256)
    assert counts["total"] == 7 * counts["per_network"]


def test_grouped_ensemble_equals_seven_independent_networks() -> None:
    torch.manual_seed(0)
    ensemble = UNetEnsemble(TINY).eval()
    x = torch.randn(2, 1, 32, 48)
    with torch.inference_mode():
        together = ensemble(x)
    for g in range(TINY.n_nets):
        single = UNetEnsemble(UNetConfig(n_nets=1, base_filters=4, depth=4)).eval()
        single.load_state_dict({k: v[network_slice(v, g, TINY.n_nets)] if v.ndim else v
                                for k, v in ensemble.state_dict().items()})
        with torch.inference_mode():
            assert torch.allclose(single(x)[:, 0], together[:, g], atol=1e-5)


def test_input_shape_errors_are_named() -> None:
    model = UNetEnsemble(TINY)
    with pytest.raises(ValueError, match=r"x: expected \(B, 1, H, W\)"):
        model(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"multiples of 16"):
        model(torch.zeros(1, 1, 40, 32))


def test_normalisation_strips_the_skull_and_scales_to_one() -> None:
    image = np.array([[[5.0, 100.0], [2.0, 4.0]]])
    mask = np.array([[[True, False], [True, True]]])
    out = normalise(image, mask, "max")
    assert out.max() == 1.0 and out[0, 0, 1] == 0 and out[0, 0, 0] == 1.0
    with pytest.raises(ValueError, match=r"the brain mask is empty"):
        normalise(image, np.zeros_like(mask), "max")
    with pytest.raises(ValueError, match=r"no positive intensity"):
        normalise(np.zeros_like(image), mask, "p95")


def test_robust_normalisation_ignores_a_few_hot_voxels() -> None:
    rng = np.random.default_rng(0)
    brain = rng.normal(1000.0, 50.0, size=(40, 40, 40))
    mask = np.ones(brain.shape, dtype=bool)
    spiked = brain.copy()
    spiked.flat[rng.choice(brain.size, 100, replace=False)] = 40000.0  # 0.16 % of the brain: vessels, a spike
    # The maximum moves 20-fold with them; the 95th percentile by well under 1 %.
    assert intensity_scale(spiked, mask, "max") / intensity_scale(brain, mask, "max") > 20
    assert intensity_scale(spiked, mask, "p95") / intensity_scale(brain, mask, "p95") == pytest.approx(1, abs=0.01)
    # Against numpy's own percentile of a plain ramp: 95th percentile of 1..100 = 95.05.
    ramp = np.arange(1.0, 101.0).reshape(1, 1, 100)
    assert intensity_scale(ramp, np.ones_like(ramp, bool), "p95") == pytest.approx(95.05)


def test_training_runs_resumes_and_packages(tiny_dataset: Path, tmp_path: Path,
                                           default_dictionary: Dictionary) -> None:
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    assert [len(dataset.subjects[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    prepared = dataset.subjects["train"][0]
    assert prepared.inputs.shape[1:] == (128, 128) and prepared.targets.shape[1] == 7
    inside = np.asarray(prepared.inputs, np.float32)[np.asarray(prepared.masks)]
    assert float(np.percentile(inside, 95)) == pytest.approx(1.0, abs=0.02)  # p95: slices without brain left out
    assert float(inside.max()) * prepared.input_factor("max") == pytest.approx(1.0, abs=1e-3)
    ranges = channel_ranges(dataset.subjects["train"])
    assert np.all(ranges[:, 0] <= 0) and np.all(ranges[:, 1] >= 0) and ranges[0, 1] > 0

    config = TrainConfig(epochs=2, iterations_per_epoch=3, batch_size=4, crop=64, validation_slices=4, unet=TINY)
    run = tmp_path / "run"
    first = train(dataset, run, config, progress=False)
    assert first["epochs"] == 2 and all(math.isfinite(v) for v in first["best_val_mse"].values())
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,iterations_per_s")
    # Resuming with more epochs continues from the checkpoint instead of starting over.
    resumed = train(dataset, run, TrainConfig(**{**config.__dict__, "epochs": 3}), progress=False)
    assert resumed["epochs"] == 3 and len((run / "metrics.csv").read_text().splitlines()) == 4
    with pytest.raises(ValueError, match=r"another configuration"):
        train(dataset, run, TrainConfig(**{**config.__dict__, "learning_rate": 1.0}), progress=False)

    package = package_run(run, tiny_dataset, tmp_path / "pkg", name="tiny", version="0.0")
    loaded = load_package(package)
    check_compatible(loaded, default_dictionary)
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["training"]["epochs_trained"] == 3
    assert manifest["sequence"]["hash"] == default_dictionary.sequence_hash
    volume = np.asarray(prepared.inputs, np.float32)[:4].transpose(1, 2, 0)
    mask = np.asarray(prepared.masks)[:4].transpose(1, 2, 0)
    channels = synthesise_channels(volume, mask, loaded)
    inside = channels[mask]
    assert np.all(inside >= loaded.channel_ranges[:, 0] - 1e-3) and np.all(inside <= loaded.channel_ranges[:, 1] + 1e-3)
    assert np.all(channels[~mask] == 0)

    # --weights last: the checkpoint's own (last epoch) weights, whatever the validation chose.
    last = package_run(run, tiny_dataset, tmp_path / "pkg-last", name="tiny", version="0.0-last", weights="last")
    saved = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    stored = load_file(str(last / "weights.safetensors"))
    for key, value in saved["model"].items():
        np.testing.assert_array_equal(stored[key].float().numpy(), value.half().float().numpy(), err_msg=key)
    last_doc = json.loads((last / "manifest.json").read_text())["training"]
    assert last_doc["weights"] == "the last epoch's" and len(last_doc["last_validation_mse"]) == 7
    assert manifest["training"]["weights"] == "per network, its best validation epoch"
    with pytest.raises(ValueError, match="weights"):
        package_run(run, tiny_dataset, tmp_path / "pkg-x", name="tiny", version="0.0-x", weights="median")


def test_cosine_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = TrainConfig(epochs=10, iterations_per_epoch=100, learning_rate=1e-4, min_learning_rate=1e-6,
                         warmup_iterations=100, lr_schedule="cosine")
    assert learning_rate_at(0, config) == pytest.approx(1e-6)  # warm-up: 1/100 of the cosine start
    assert learning_rate_at(99, config) == pytest.approx(1e-4)
    assert learning_rate_at(100 + 450, config) == pytest.approx((1e-4 + 1e-6) / 2)  # half-way: the mean
    assert learning_rate_at(999, config) == pytest.approx(1e-6, rel=1e-3)
    assert learning_rate_at(5000, config) == pytest.approx(1e-6)  # past the plan: the floor
    constant = TrainConfig(learning_rate=3e-4, warmup_iterations=10)
    assert [learning_rate_at(k, constant) for k in (4, 9, 10_000)] == pytest.approx([1.5e-4, 3e-4, 3e-4])


def test_fine_tuning_starts_from_a_package_and_keeps_its_ranges(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    base = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2, unet=TINY,
                       warmup_iterations=1, learning_rate=1e-2)  # weights far from the seed's initialisation
    train(dataset, tmp_path / "base", base, progress=False)
    package = load_package(package_run(tmp_path / "base", tiny_dataset, tmp_path / "pkg", name="tiny", version="0.0"))
    tuned = TrainConfig(**{**base.__dict__, "learning_rate": 1e-12, "warmup_iterations": 1,
                           "init_from": package.name})
    train(dataset, tmp_path / "tuned", tuned, progress=False, initial=package)
    best = torch.load(tmp_path / "tuned" / "best.pt", weights_only=False)
    assert np.array_equal(np.asarray(best["channel_ranges"], np.float32), package.channel_ranges)
    torch.manual_seed(tuned.seed)
    fresh = UNetEnsemble(TINY).state_dict()
    moved = 0.0
    for name, start in package.model.named_parameters():  # a learning rate of 1e-12 leaves the weights as they were
        assert torch.allclose(best["state"][name].float(), start.float(), atol=1e-6), name
        moved = max(moved, float((start.detach().float() - fresh[name].float()).abs().max()))
    assert moved > 1e-3  # ... and they are the package's, not a fresh initialisation's
    cosine = TrainConfig(**{**tuned.__dict__, "lr_schedule": "cosine"})
    train(dataset, tmp_path / "cosine", cosine, progress=False, initial=package)
    with pytest.raises(ValueError, match=r"number of epochs is part of it"):  # its schedule was planned for 1 epoch
        train(dataset, tmp_path / "cosine", TrainConfig(**{**cosine.__dict__, "epochs": 2}), progress=False,
              initial=package)
    with pytest.raises(ValueError, match=r"architecture"):
        other = TrainConfig(**{**tuned.__dict__, "unet": UNetConfig(n_nets=7, base_filters=8, depth=4)})
        train(dataset, tmp_path / "other", other, progress=False, initial=package)
    # A package without protocol planes fine-tunes into a protocol-aware model that starts with its outputs
    # (zero weights on the new planes), whatever the protocol.
    aware = TrainConfig(**{**tuned.__dict__, "unet": replace(TINY, protocol_features=N_FEATURES)})
    train(dataset, tmp_path / "aware", aware, progress=False, initial=package)
    best_aware = torch.load(tmp_path / "aware" / "best.pt", weights_only=False)["state"]
    assert best_aware["encoders.0.conv1.weight"].shape[1] == 1 + N_FEATURES
    widened = UNetEnsemble(aware.unet).eval()
    widened.load_state_dict(expand_input_planes(package.model.state_dict(), aware.unet))
    x = torch.rand(2, 1, 32, 32)
    features = torch.from_numpy(np.stack([protocol_features(PAPER_PROTOCOL)] * 2))
    with torch.no_grad():
        assert torch.allclose(widened(x, features), package.model.eval()(x), atol=1e-4)
    result = CliRunner().invoke(cli, ["train", "--data", str(tiny_dataset), "--run-dir", str(tmp_path / "cli"),
                                      "--init-from", str(tmp_path / "nowhere-0.0")])
    assert result.exit_code == 2 and "--init-from" in result.output, result.output


def test_a_held_fine_tune_keeps_the_package_outputs_where_t2_is_short(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_dataset, tmp_path / "cache", reference_t2=True)
    base = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2, unet=TINY,
                       warmup_iterations=1, learning_rate=1e-2)  # far from the data: a fine-tune moves it a lot
    train(dataset, tmp_path / "base", base, progress=False)
    package = load_package(package_run(tmp_path / "base", tiny_dataset, tmp_path / "pkg", name="tiny", version="0.0"))
    tune = TrainConfig(**{**base.__dict__, "iterations_per_epoch": 6, "init_from": package.name})
    x = torch.from_numpy(np.stack([np.asarray(s.inputs[len(s.slices) // 2], np.float32)
                                   for s in dataset.subjects["val"]]))[:, None]
    outputs = {}
    for name, hold in (("free", None), ("held", 1e9)):  # every voxel held
        train(dataset, tmp_path / name, replace(tune, hold_below_t2=hold), progress=False, initial=package)
        model = UNetEnsemble(TINY).eval()
        model.load_state_dict(torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"])
        with torch.no_grad():
            outputs[name] = model(x)
    # a run saved before the option existed resumes (its configuration lacks the field: the default, off)
    saved = torch.load(tmp_path / "free" / "checkpoint.pt", weights_only=False)
    del saved["config"]["hold_below_t2"]
    torch.save(saved, tmp_path / "free" / "checkpoint.pt")
    assert train(dataset, tmp_path / "free", replace(tune, epochs=2), progress=False, initial=package)["epochs"] == 2
    with torch.no_grad():
        start = package.model.eval()(x)
    moved_free = float((outputs["free"] - start).abs().mean())
    moved_held = float((outputs["held"] - start).abs().mean())
    assert moved_free > 1e-3 and moved_held < moved_free / 4, (moved_free, moved_held)
    # held where the reference T2 is under the level (the tissue), the data's targets in fluid
    subject = dataset.subjects["val"][0]
    t2 = np.asarray(subject.reference_t2, np.float32)
    level = 300.0
    batch = _validation_set([subject], len(subject.slices), package.channel_ranges, replace(tune, hold_below_t2=level))
    holder = _holding_model(package, tune, tuple(range(7)), torch.device("cpu"))
    x, y, _, hold, _ = held_batch(batch, holder)
    assert hold is not None and np.array_equal(hold[:, 0].numpy(), t2 < level)
    assert 0 < float((t2 >= level).sum()) < float((t2 > 0).sum())  # the phantom has fluid and tissue
    with torch.no_grad():
        start = package.model.eval()(x)
    tissue, fluid = hold[:, 0], ~hold[:, 0]
    assert torch.allclose(y.permute(0, 2, 3, 1)[tissue], start.permute(0, 2, 3, 1)[tissue], atol=1e-5)
    assert torch.equal(y.permute(0, 2, 3, 1)[fluid], batch[1].permute(0, 2, 3, 1)[fluid])
    # random crops and flips move the hold plane with the image: hold "T2" = the image itself, level 0.5
    mirror = replace(subject, reference_t2=subject.inputs)
    x, _, _, hold, _ = _sample_batch([mirror], np.random.default_rng(3), 16, 32, package.channel_ranges,
                                  replace(tune, hold_below_t2=0.5))
    assert hold is not None and torch.equal(hold[:, 0], x[:, 0] < 0.5) and 0 < float(hold.float().mean()) < 1
    # the holder of a run that gains protocol planes and trains some networks gives the package's outputs
    aware = replace(tune, unet=replace(TINY, protocol_features=N_FEATURES))
    features = torch.from_numpy(np.stack([protocol_features(PAPER_PROTOCOL)] * 2))
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_holding_model(package, aware, (0, 3), torch.device("cpu"))(image, features),
                              package.model.eval()(image)[:, [0, 3]], atol=1e-5)
    with pytest.raises(ValueError, match=r"--init-from"):
        train(dataset, tmp_path / "orphan", replace(base, hold_below_t2=300.0), progress=False)
    (tmp_path / "no-maps" / subject.subject).mkdir(parents=True)  # a site's paired data without reference maps
    with pytest.raises(FileNotFoundError, match=r"no reference T2 map"):
        prepared_reference_t2(tmp_path / "no-maps" / subject.subject, tmp_path / "cache-2", subject)
    result = CliRunner().invoke(cli, ["train", "--data", str(tiny_dataset), "--run-dir", str(tmp_path / "cli"),
                                      "--hold-below-t2", "300"])
    assert result.exit_code == 2 and "--hold-below-t2" in result.output, result.output


def test_a_fluid_network_learns_only_from_fluid_voxels(tiny_dataset: Path, tmp_path: Path) -> None:
    """--loss-above-t2: the loss and the validation MSE are the mean squared error over voxels whose reference T2
    exceeds the level, and crops centre on such voxels, moving with the image."""
    dataset = load_dataset(tiny_dataset, tmp_path / "cache", reference_t2=True)
    subject = dataset.subjects["val"][0]
    ranges = channel_ranges(dataset.subjects["train"])
    level = 300.0
    fluid = replace(TrainConfig(validation_slices=len(subject.slices), unet=TINY), loss_above_t2=level)
    x, y, _, hold, where = _validation_set([subject], len(subject.slices), ranges, fluid)
    t2 = np.asarray(subject.reference_t2, np.float32)
    assert hold is None and where is not None and np.array_equal(where[:, 0].numpy(), t2 > level)
    assert 0 < int(where.sum()) < int((t2 > 0).sum())  # the phantom has fluid and tissue
    # the losses against an independent sum over the fluid voxels; what lies outside them changes nothing
    torch.manual_seed(1)
    out = y + 0.1 * torch.randn_like(y)
    inside = where[:, 0].numpy()
    expected = [float(((out[:, g].numpy() - y[:, g].numpy())[inside] ** 2).mean()) for g in range(7)]
    assert np.allclose(masked_mse(out, y, where).numpy(), expected, rtol=1e-5)
    assert np.allclose(masked_mse(torch.where(where, out, out + 5.0), y, where).numpy(), expected, rtol=1e-5)
    assert float(masked_mse(out, y, torch.zeros_like(where)).sum()) == 0.0  # a batch without fluid: no gradient

    class Half(torch.nn.Module):  # a stand-in network: every channel half the input
        def forward(self, inputs: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
            return 0.5 * inputs[:, :1].expand(-1, 7, -1, -1)

    half = 0.5 * x[:, 0].numpy()
    reference = [float(((half - y[:, g].numpy())[inside] ** 2).mean()) for g in range(7)]
    for chunk in (3, 64):  # the validation loop's chunks add up to the mean over every fluid voxel
        assert np.allclose(validation_mse(Half(), (x, y, None, None, where), torch.device("cpu"), batch=chunk),
                           reference, rtol=1e-5)
    # crops centre on fluid and carry the fluid plane with the image: "T2" = the image itself, level 0.5
    mirror = replace(subject, reference_t2=subject.inputs)
    inputs, _, _, _, where = _sample_batch([mirror], np.random.default_rng(3), 16, 32, ranges,
                                           replace(fluid, loss_above_t2=0.5))
    assert where is not None and torch.equal(where[:, 0], inputs[:, 0] > 0.5)
    centres = where[:, 0, 16, 16] | where[:, 0, 15, 15] | where[:, 0, 16, 15] | where[:, 0, 15, 16]
    assert bool(centres.all()), centres  # a crop of 32 around a chosen voxel, unless clipped at the edge
    # a fluid run trains, records the level, and refuses a hold beside it
    run = train(dataset, tmp_path / "fluid", replace(fluid, epochs=1, iterations_per_epoch=2, batch_size=2, crop=32,
                                                     validation_slices=2, warmup_iterations=1), progress=False)
    assert run["epochs"] == 1 and all(math.isfinite(v) for v in run["best_val_mse"].values())
    assert torch.load(tmp_path / "fluid" / "checkpoint.pt", weights_only=False)["config"]["loss_above_t2"] == level
    with pytest.raises(ValueError, match=r"exclude each other"):
        train(dataset, tmp_path / "both", replace(fluid, hold_below_t2=100.0), progress=False)
    result = CliRunner().invoke(cli, ["train", "--data", str(tiny_dataset), "--run-dir", str(tmp_path / "cli"),
                                      "--init-from", str(tmp_path / "any-0.0"), "--hold-below-t2", "100",
                                      "--loss-above-t2", "300"])
    assert result.exit_code == 2 and "--loss-above-t2" in result.output, result.output


def test_a_physics_plane_is_gained_by_fine_tuning_and_fed_at_inference(tiny_dataset: Path, tmp_path: Path) -> None:
    """A protocol-aware package fine-tunes into one that also takes the apparent T1 plane: zero weights on it, so
    it starts with the package's outputs; inference builds the plane (network_input) and refuses a bare volume."""
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    aware = replace(TINY, protocol_features=N_FEATURES, dropout=0.0)
    base = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2, unet=aware,
                       warmup_iterations=1, learning_rate=1e-2, bf16=False)
    train(dataset, tmp_path / "base", base, progress=False)
    package = load_package(package_run(tmp_path / "base", tiny_dataset, tmp_path / "pkg", name="tiny", version="0.0"))
    physics = replace(aware, physics_planes=1)
    tuned = TrainConfig(**{**base.__dict__, "unet": physics, "learning_rate": 1e-12, "init_from": package.name})
    train(dataset, tmp_path / "physics", tuned, progress=False, initial=package)
    assert torch.load(tmp_path / "physics" / "best.pt", weights_only=False)["state"][
        "encoders.0.conv1.weight"].shape[1] == 1 + N_FEATURES + 1
    widened = load_package(package_run(tmp_path / "physics", tiny_dataset, tmp_path / "pkg2", name="tiny-physics",
                                       version="0.0"))
    assert widened.model.config.physics_planes == 1
    rng = np.random.default_rng(0)
    mask = np.zeros((32, 32, 4), bool)
    mask[6:26, 8:24] = True
    normalised = np.where(mask, rng.uniform(0.2, 1.1, mask.shape), 0).astype(np.float32)
    features = features_for(package, PAPER_PROTOCOL)
    planes = network_input(widened, normalised, mask, PAPER_PROTOCOL)
    assert planes.shape == (*mask.shape, 2) and np.all(planes[..., 1][~mask] == 0)
    assert np.array_equal(planes[..., 1][mask], apparent_t1_plane(normalised[mask], PAPER_PROTOCOL))
    assert network_input(package, normalised, mask, PAPER_PROTOCOL) is normalised
    start = UNetEnsemble(physics).eval()  # where the fine-tune started: the package's weights, zeros on the plane
    start.load_state_dict(expand_input_planes(package.model.state_dict(), physics))
    x = torch.from_numpy(np.moveaxis(planes[..., :2, :], 2, 0).transpose(0, 3, 1, 2).copy())
    p = torch.from_numpy(np.stack([features] * 2))
    with torch.no_grad():
        assert torch.allclose(start(x, p), package.model.eval()(x[:, :1], p), atol=1e-4)
    channels = synthesise_channels(planes, mask, widened, protocol=features)
    assert channels.shape == (*mask.shape, 7) and np.isfinite(channels).all() and np.all(channels[~mask] == 0)
    with pytest.raises(ValueError, match=r"expected \(X, Y, Z, 2\)"):
        synthesise_channels(normalised, mask, widened, protocol=features)
    # the planes are appended: a physics model without protocol planes cannot gain them later
    bare = replace(TINY, physics_planes=1)
    train(dataset, tmp_path / "bare", TrainConfig(**{**base.__dict__, "unet": bare}), progress=False)
    bare_package = load_package(package_run(tmp_path / "bare", tiny_dataset, tmp_path / "pkg3", name="tiny-bare",
                                            version="0.0"))
    with pytest.raises(ValueError, match=r"architecture"):
        train(dataset, tmp_path / "gain", tuned, progress=False, initial=bare_package)


def _refuse(constant: str) -> None:
    raise ValueError(f"not strict JSON: {constant}")


def test_training_some_networks_equals_training_them_in_the_ensemble(tiny_dataset: Path, tmp_path: Path) -> None:
    """Networks trained alone (the others' outputs are never used) learn exactly what they learn inside the
    full ensemble; the others keep their weights; a run of every network resumes on fewer."""
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    unet = replace(TINY, dropout=0.0)  # dropout masks depend on the tensor's shape
    config = TrainConfig(epochs=2, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2, unet=unet,
                         bf16=False, warmup_iterations=1, learning_rate=1e-2)
    active = [0, 1, 3, 5]
    full = train(dataset, tmp_path / "full", config, progress=False)
    some = train(dataset, tmp_path / "some", config, progress=False, networks=active)
    torch.manual_seed(config.seed)
    start = UNetEnsemble(unet).state_dict()
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "some" / "checkpoint.pt", weights_only=False)["model"]
    best = torch.load(tmp_path / "some" / "best.pt", weights_only=False)["state"]
    for name, t in b.items():
        if not t.ndim:
            continue
        for g in range(7):
            part = network_slice(t, g, 7)
            if g in active:
                assert torch.allclose(t[part], a[name][part], atol=2e-5), (name, g)
            else:  # as initialised (the output bias is set from the training targets' means)
                assert torch.equal(t[part], best[name][part]), (name, g)
                assert name == "head.bias" or torch.equal(t[part], start[name][part]), (name, g)
    for g, channel in enumerate(full["best_val_mse"]):
        if g in active:
            assert some["best_val_mse"][channel] == pytest.approx(full["best_val_mse"][channel], rel=1e-3)
        else:
            assert some["best_val_mse"][channel] == math.inf
    assert "nan" in (tmp_path / "some" / "metrics.csv").read_text().splitlines()[1]
    # Its package records the untrained networks as null: the manifest is strict JSON.
    package = package_run(tmp_path / "some", tiny_dataset, tmp_path / "pkg", name="some", version="0.0")
    manifest = json.loads((package / "manifest.json").read_text(), parse_constant=_refuse)
    recorded = manifest["training"]["best_validation_mse"]
    assert [g for g, v in enumerate(recorded) if v is None] == [g for g in range(7) if g not in active]
    # The run of all seven resumes on four: its Adam moments are cut to those networks' blocks.
    resumed = train(dataset, tmp_path / "full", replace(config, epochs=3), progress=False, networks=active)
    assert resumed["epochs"] == 3
    with pytest.raises(ValueError, match=r"or fewer"):
        train(dataset, tmp_path / "some", replace(config, epochs=3), progress=False)


def test_same_seed_same_training(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    config = TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2, unet=TINY,
                         bf16=False)
    a = train(dataset, tmp_path / "a", config, progress=False)
    b = train(dataset, tmp_path / "b", config, progress=False)
    assert a["best_val_mse"] == b["best_val_mse"]


def test_evaluate_command_writes_the_report(tiny_dataset: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_dataset, tmp_path / "cache")
    run = tmp_path / "run"
    train(dataset, run, TrainConfig(epochs=1, iterations_per_epoch=2, batch_size=2, crop=32, validation_slices=2,
                                    unet=TINY), progress=False)
    package = package_run(run, tiny_dataset, tmp_path / "pkg", name="tiny", version="0.0")
    out = tmp_path / "report"
    # Two datasets (the same one twice), every second slice; the lookup is fitted on the train split.
    common = ["evaluate", "--data", str(tiny_dataset), "--model", str(package), "--bootstrap", "200"]
    result = CliRunner().invoke(cli, [*common, "--data", str(tiny_dataset), "--out", str(out), "--slice-step", "2",
                                      "--split", "test", "--split", "val", "--cache", str(tmp_path / "cache"),
                                      "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Truth vs map set by acquisition group" in result.output and "mprage 3T" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["datasets"]) == ["ds", "ds-2"]
    assert summary["datasets"]["ds"]["subjects"] == json.loads((tiny_dataset / "manifest.json").read_text())[
        "split"]["test"]
    by_protocol = pd.read_csv(out / "by_protocol.csv")
    # datasets x map sets of the one group: the method's own error (true: matching the simulated MRF), dl, lookup
    assert by_protocol[["dataset", "map_set"]].values.tolist() == [[d, m] for d in ("ds", "ds-2")
                                                                   for m in ("true", "dl", "lookup")]
    near_pure = pd.read_csv(out / "near_pure_by_protocol.csv")
    assert near_pure[["dataset", "map_set"]].values.tolist() == by_protocol[["dataset", "map_set"]].values.tolist()
    assert {"mape_GM near-pure_T1", "bias_WM near-pure_T2"} <= set(near_pure.columns)
    assert near_pure["mape_WM near-pure_T1"].notna().all()  # every map set has near-pure WM voxels here
    assert "Near-pure tissue voxels" in result.output
    markdown = (out / "summary.md").read_text()
    assert "## ds (" in markdown and "## ds-2 (" in markdown and "By acquisition group" in markdown
    assert "### Near-pure tissue voxels by acquisition group" in markdown
    assert summary["datasets"]["ds"]["near_pure_by_protocol"][0]["map_set"] == "true"
    follow = pd.read_csv(out / "near_pure_follow.csv")
    assert set(follow["tissue"]) == {"GM near-pure", "WM near-pure"} and set(follow["map_set"]) == {"true", "dl",
                                                                                                   "lookup"}
    # One subject per dataset: nothing to regress, and the report says so rather than inventing a slope.
    assert (follow["n_subjects"] == 1).all() and follow["slope"].isna().all()
    assert summary["datasets"]["ds"]["near_pure_follow"][0]["slope"] is None
    assert "### Near-pure voxels: does the map follow each subject's tissue values?" in markdown
    # One subject per split: no identifiability ceiling, and the report says why.
    assert "Identifiability ceiling (`synthmrf phantom ceiling`): not computed: needs at least 2" in markdown
    assert "2 subjects per field strength" in summary["datasets"]["ds"]["ceiling"]["not_computed"]
    for name in ("ds", "ds-2"):
        assert (out / name / "regional.csv").is_file() and (out / name / "summary.md").is_file()
        report = (out / name / "summary.md").read_text()
        assert "Near-pure: voxels whose truth lies within 5% (T1) and 8% (T2)" in report
        assert any(p.suffix == ".png" for p in (out / name).iterdir())
        agreement = summary["datasets"][name]["agreement"]
        assert {(a["reference"], a["other"]) for a in agreement} >= {("truth", "dl"), ("truth", "lookup"),
                                                                     ("true", "dl")}
    # Every subject (split all) includes the lookup's training subject: refused before any work.
    result = CliRunner().invoke(cli, [*common, "--split", "all", "--out", str(tmp_path / "refused")])
    assert result.exit_code != 0 and "lookup baseline is fitted on" in result.output, result.output
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "refused"), "--device", "gpu"])
    assert result.exit_code == 2 and "expected auto, cpu, cuda or cuda:N" in result.output, result.output
    # A subject without its MRF (a dataset made with --no-mrf): refused by name before any work.
    no_mrf = _without_mrf(tiny_dataset, tmp_path / "no-mrf", "test")
    result = CliRunner().invoke(cli, ["evaluate", "--data", str(no_mrf), "--model", str(package), "--baseline-data",
                                      str(tiny_dataset), "--out", str(tmp_path / "refused")])
    assert result.exit_code == 1 and "no mrf_svd.nii.gz in" in result.output and "--no-mrf" in result.output
    assert not (tmp_path / "refused").exists()


def _without_mrf(dataset: Path, out: Path, part: str) -> Path:
    """A copy of ``dataset`` whose ``part`` subjects lack mrf_svd.nii.gz."""
    shutil.copytree(dataset, out)
    for subject in json.loads((out / "manifest.json").read_text())["split"][part]:
        (out / subject / "mrf_svd.nii.gz").unlink()
    return out


def test_train_refuses_a_dataset_without_mrf(tiny_dataset: Path, tmp_path: Path) -> None:
    no_mrf = _without_mrf(tiny_dataset, tmp_path / "no-mrf", "val")
    result = CliRunner().invoke(cli, ["train", "--data", str(no_mrf), "--run-dir", str(tmp_path / "run"),
                                      "--cache", str(tmp_path / "cache"), "--epochs", "1"])
    assert result.exit_code == 1 and "no mrf_svd.nii.gz in sub-" in result.output, result.output
    assert "Traceback" not in result.output


def test_distributed_training_with_torchrun(tiny_dataset: Path, tmp_path: Path) -> None:
    """Two CPU processes under torchrun (gloo, loopback): DDP trains and rank 0 writes the run."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "dicom_node.cli", "train",
           "--data", str(tiny_dataset), "--run-dir", str(run), "--cache", str(tmp_path / "cache"), "--epochs", "1",
           "--iterations-per-epoch", "1", "--batch-size", "4", "--crop", "32", "--validation-slices", "2",
           "--device", "cpu"]
    # TMPDIR: torchrun's own scratch folder (torchelastic_*) goes with tmp_path
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (run / "best.pt").is_file() and len((run / "metrics.csv").read_text().splitlines()) == 2
