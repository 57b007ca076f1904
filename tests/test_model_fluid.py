"""Composite packages (``synthmrf model fluid``): a base model with a fluid network used only where the base reads
fluid. Where the base's T2 is under the gate the maps are the base's exactly; where it is over, the fluid network's;
between, the match of the two channel vectors blended by the gate's weight."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from package_support import tiny_package
from safetensors.torch import load_file

from dicom_node.cli import cli
from pipeline.model.combine import attach_fluid, combine_packages
from pipeline.model.fluid import apply_fluid, fluid_weight
from pipeline.model.inference import features_for, network_input, synthesise_channels
from pipeline.model.package import (
    BASIS_KEY,
    SEQUENCE,
    SHIPPED_DIR,
    WEIGHTS,
    ModelPackage,
    PackageError,
    load_package,
    manifest_unet_config,
    read_manifest,
    write_package,
)
from pipeline.model.registry import ModelRegistry
from pipeline.model.unet import UNetConfig
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import Sequence
from pipeline.protocol import PAPER_PROTOCOL
from pipeline.quality import match_volume_with_quality

RANGES = {"families": ["mprage"], "field_strengths_t": [1.5, 3.0], "ti_ms": [700.0, 1100.0]}
MakePackage = Callable[..., Path]


@pytest.fixture
def make_package(tmp_path: Path, default_sequence: Sequence, default_dictionary: Dictionary) -> MakePackage:
    def make(name: str, seed: int, **options: object) -> Path:
        return tiny_package(tmp_path, default_sequence, default_dictionary, name, seed, RANGES,
                            **options)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="module")
def shipped_and_variant(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped package's own networks as a plain package (the shipped one may itself be a composite, which
    cannot be a base), and a package of its architecture whose convolution kernels are those each scaled by
    1 + 0.2 N(0, 1) (seeded): a fluid network that gives other channels than the base."""
    shipped = next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir())
    manifest = read_manifest(shipped)
    tensors = load_file(str(shipped / WEIGHTS))
    basis = tensors.pop(BASIS_KEY)
    generator = torch.Generator().manual_seed(0)
    perturbed = {k: v.float() * (1 + 0.2 * torch.randn(v.shape, generator=generator)) if v.ndim == 4 else v
                 for k, v in tensors.items()}
    folder = tmp_path_factory.mktemp("packages")

    def write(name: str, state: dict[str, torch.Tensor]) -> Path:
        return write_package(
            folder / name, name=name, version="1", state=state,
            unet=manifest_unet_config(manifest), channel_ranges=np.asarray(manifest["channel_ranges"], np.float32),
            sequence_json=(shipped / SEQUENCE).read_text(), basis=basis.numpy(), training={}, metrics={},
            normalisation=load_package(shipped).normalisation,
            trained_protocols=manifest["protocol_ranges"],  # type: ignore[arg-type]
            channel_signal=manifest["channel_signal"])  # type: ignore[arg-type]

    return write("base", tensors), write("variant", perturbed)


def _scene() -> tuple[np.ndarray, np.ndarray]:
    """A normalised 'brain' of 3 slices: a dark core (the shipped model reads fluid there, about 1000 ms), a
    mid-grey ring and a bright rim (tissue, about 87 ms), with a little noise; and its mask."""
    x, y = np.meshgrid(np.arange(96), np.arange(96), indexing="ij")
    r = np.hypot(x - 48, y - 48)
    mask = np.repeat((r < 40)[:, :, None], 3, axis=2)
    image = np.repeat(np.select([r < 12, r < 22, r < 40], [0.12, 0.55, 0.95], 0.0)[:, :, None], 3, axis=2)
    noise = 0.03 * np.random.default_rng(0).standard_normal(mask.shape)
    return np.where(mask, image + noise, 0.0).astype(np.float32), mask


def _maps(package: ModelPackage, volume: np.ndarray, mask: np.ndarray,
          matcher: Matcher) -> tuple[dict[str, np.ndarray], np.ndarray]:
    features = features_for(package, PAPER_PROTOCOL)
    channels = synthesise_channels(network_input(package, volume, mask, PAPER_PROTOCOL), mask, package,
                                   protocol=features)
    return match_volume_with_quality(from_channels(channels[mask]), mask, matcher), channels


def test_the_base_is_kept_under_the_gate_and_the_fluid_network_is_used_over_it(
        shipped_and_variant: tuple[Path, Path], default_dictionary: Dictionary, tmp_path: Path) -> None:
    base_dir, variant_dir = shipped_and_variant
    base, variant = load_package(base_dir), load_package(variant_dir)
    volume, mask = _scene()
    matcher = Matcher(default_dictionary, device="cpu")
    base_maps, base_channels = _maps(base, volume, mask, matcher)
    fluid_maps, fluid_channels = _maps(variant, volume, mask, matcher)
    gate = (200.0, 400.0)
    composite = load_package(attach_fluid(base_dir, variant_dir, gate, tmp_path / "both", name="both", version="1"))
    assert composite.fluid is not None and composite.fluid.gate_t2_ms == gate
    assert composite.protocol_ranges == base.protocol_ranges

    features = features_for(composite, PAPER_PROTOCOL)
    net_input = network_input(composite, volume, mask, PAPER_PROTOCOL)
    got = apply_fluid(base_maps, base_channels, net_input, mask, composite, matcher, protocol=features)
    assert set(got) == {"T1", "T2", "PD", "Q"}
    t2 = base_maps["T2"]
    under, over = mask & (t2 <= gate[0]), mask & (t2 >= gate[1])
    between = mask & ~under & ~over
    assert under.sum() > 10000 and over.sum() > 500 and between.sum() > 100
    for name in got:
        np.testing.assert_array_equal(got[name][under], base_maps[name][under], err_msg=name)
        np.testing.assert_array_equal(got[name][over], fluid_maps[name][over], err_msg=name)
        np.testing.assert_array_equal(got[name][~mask], 0.0, err_msg=name)
    assert np.median(np.abs(fluid_maps["T2"][over] / t2[over] - 1)) > 0.05  # the two networks differ there
    # Between: the match of the blended signal.
    w = ((t2[between] - gate[0]) / (gate[1] - gate[0]))[:, None]
    blend = (1 - w) * base_channels[between] + w * fluid_channels[between]
    np.testing.assert_allclose(got["T2"][between], matcher.match(from_channels(blend.astype(np.float32))).t2_ms)

    # A package without a fluid network, or a study the base reads as all tissue, is left as it is.
    assert apply_fluid(base_maps, base_channels, net_input, mask, base, matcher, protocol=features) is base_maps
    high = load_package(attach_fluid(base_dir, variant_dir, (5000.0, 6000.0), tmp_path / "high", name="high",
                                     version="1"))
    assert apply_fluid(base_maps, base_channels, net_input, mask, high, matcher, protocol=features) is base_maps


def test_fluid_weight_ramps_between_the_gate_values() -> None:
    np.testing.assert_allclose(fluid_weight(np.array([50.0, 200.0, 250.0, 400.0, 2000.0]), (200.0, 400.0)),
                               [0.0, 0.0, 0.25, 1.0, 1.0])


def test_a_composite_is_verified_through_both_manifests(make_package: MakePackage, tmp_path: Path) -> None:
    base, fluid = make_package("base", 1), make_package("fluid", 2, range_seed=1)
    out = attach_fluid(base, fluid, (200.0, 400.0), tmp_path / "both", name="both", version="1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fluid"]["gate_t2_ms"] == [200.0, 400.0]
    assert manifest["fluid"]["fluid"]["package"] == "fluid-1.0"
    assert set(manifest["files"]) == {"weights.safetensors", "sequence.json", "fluid/manifest.json"}
    assert manifest["protocol_ranges"] == RANGES

    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    weights = altered / "fluid" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="checksum mismatch"):
        load_package(altered)
    shutil.rmtree(altered)
    shutil.copytree(out, altered)
    (altered / "fluid" / "manifest.json").write_text((altered / "fluid" / "manifest.json").read_text() + " ")
    with pytest.raises(PackageError, match="checksum mismatch"):
        load_package(altered)
    shutil.rmtree(altered / "fluid")
    with pytest.raises(PackageError, match=r"fluid/manifest\.json is missing"):
        load_package(altered)


def test_what_cannot_be_a_fluid_network_is_refused(make_package: MakePackage, tmp_path: Path) -> None:
    base = make_package("base", 1)
    wider = make_package("wider", 2, config=UNetConfig(n_nets=7, base_filters=4, depth=4, protocol_features=3))
    with pytest.raises(PackageError, match="architecture"):
        attach_fluid(base, wider, (200.0, 400.0), tmp_path / "a", name="a", version="1")
    flipped = make_package("flipped", 3, basis_sign=-1.0)
    with pytest.raises(PackageError, match="SVD basis"):
        attach_fluid(base, flipped, (200.0, 400.0), tmp_path / "b", name="b", version="1")
    fluid = make_package("fluid", 4)
    with pytest.raises(PackageError, match="gate_t2_ms"):
        attach_fluid(base, fluid, (400.0, 200.0), tmp_path / "c", name="c", version="1")
    both = attach_fluid(base, fluid, (200.0, 400.0), tmp_path / "both", name="both", version="1")
    with pytest.raises(PackageError, match="has a fluid network"):
        attach_fluid(both, fluid, (200.0, 400.0), tmp_path / "d", name="d", version="1")
    with pytest.raises(PackageError, match="has a fluid network"):
        combine_packages(both, {"SV2": fluid}, tmp_path / "e", name="e", version="1")
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli_fluid_and_a_registry_round_trip(shipped_and_variant: tuple[Path, Path], tmp_path: Path) -> None:
    base, variant = shipped_and_variant
    runner = CliRunner()
    env = {"SYNTHMRF_MODELS_DIR": str(tmp_path / "models")}
    result = runner.invoke(cli, ["model", "fluid", str(base), str(variant), "--gate", "250", "500", "--out",
                                 str(tmp_path / "m"), "--name", "m", "--version", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["fluid"]["gate_t2_ms"] == [250.0, 500.0]
    bad = runner.invoke(cli, ["model", "fluid", str(base), str(variant), "--gate", "500", "250", "--out",
                              str(tmp_path / "n"), "--name", "n", "--version", "1"], env=env)
    assert bad.exit_code == 2 and "must be below" in bad.output
    again = runner.invoke(cli, ["model", "fluid", str(tmp_path / "m"), str(variant), "--out", str(tmp_path / "o"),
                                "--name", "o", "--version", "1"], env=env)
    assert again.exit_code == 1 and "has a fluid network" in again.output
    assert not (tmp_path / "n").exists() and not (tmp_path / "o").exists()

    registry = ModelRegistry(tmp_path / "models")
    name = registry.install(tmp_path / "m")
    installed = registry.load(name)
    assert installed.fluid is not None and installed.fluid.package.name == "variant-1"
    assert (registry.path_of(name) / "fluid" / "weights.safetensors").is_file()
    report = registry.verify(name)
    assert report.checks[-1] == "smoke inference" and 0.5 < report.in_range_fraction <= 1.0
