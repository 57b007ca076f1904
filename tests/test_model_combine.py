"""``synthmrf model combine`` and ``model interpolate``: packages made of other packages.

A combined package's channels give what their sources gave; an interpolated package's weights lie on the line
between its two sources."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from package_support import TINY, tiny_package
from safetensors.numpy import load_file

from dicom_node.cli import cli
from pipeline.model.combine import combine_packages, interpolate_packages, intersect_ranges, resolve_channels
from pipeline.model.package import PackageError, load_package, write_package
from pipeline.model.unet import UNetConfig
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence

RANGES_A = {"families": ["mprage", "tfe"], "field_strengths_t": [1.5, 3.0], "ti_ms": [700.0, 1100.0],
            "flip_angle_deg": [7.0, 10.0]}
RANGES_B = {"families": ["ir-fspgr", "mprage", "tfe"], "field_strengths_t": [3.0], "ti_ms": [400.0, 1000.0],
            "flip_angle_deg": [8.0, 13.0]}
MakePackage = Callable[..., Path]


@pytest.fixture
def make_package(tmp_path: Path, default_sequence: Sequence, default_dictionary: Dictionary) -> MakePackage:
    """:func:`package_support.tiny_package` in ``tmp_path``."""

    def make(name: str, seed: int, ranges: dict[str, object], **options: object) -> Path:
        return tiny_package(tmp_path, default_sequence, default_dictionary, name, seed, ranges,
                            **options)  # type: ignore[arg-type]

    return make


def outputs(path: Path) -> np.ndarray:
    """The package's network outputs on a fixed input, rescaled to channel units."""
    package = load_package(path)
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(2, 1, 32, 32, generator=generator)
    protocol = torch.rand(2, TINY.protocol_features, generator=generator)
    with torch.no_grad():
        y = package.model(x, protocol).numpy()
    lo, hi = package.channel_ranges[:, 0], package.channel_ranges[:, 1]
    return lo[None, :, None, None] + (hi - lo)[None, :, None, None] * (y + 1) / 2


def test_channel_names_resolve_to_networks() -> None:
    assert resolve_channels("SV1") == [0]
    assert resolve_channels("sv4") == [5, 6]
    assert resolve_channels("SV2_im") == [2]
    with pytest.raises(PackageError, match="SV5"):
        resolve_channels("SV5")


def test_each_channel_gives_what_its_source_gave(make_package: MakePackage, tmp_path: Path) -> None:
    a, b, c = make_package("a", 1, RANGES_A), make_package("b", 2, RANGES_B), make_package("c", 3, RANGES_A)
    out = combine_packages(a, {"SV4": b, "SV2_re": c}, tmp_path / "ab", name="mixed", version="2.0")
    got, from_a, from_b, from_c = outputs(out), outputs(a), outputs(b), outputs(c)
    source = {0: from_a, 1: from_c, 2: from_a, 3: from_a, 4: from_a, 5: from_b, 6: from_b}
    for k, expected in source.items():
        np.testing.assert_allclose(got[:, k], expected[:, k], rtol=0, atol=1e-6, err_msg=f"channel {k}")
    assert not np.allclose(from_a[:, 5], from_b[:, 5])  # the sources do differ where taken
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["name"] == "mixed" and manifest["version"] == "2.0"
    combined = manifest["training"]["combined_from"]
    assert [combined[n]["package"] for n in ("SV1_re", "SV2_re", "SV4_re", "SV4_im")] == \
        ["a-1.0", "c-1.0", "b-1.0", "b-1.0"]
    assert manifest["training"]["best_validation_mse"] == [1.0, 3.0, 1.0, 1.0, 1.0, 2.0, 2.0]
    assert manifest["protocol_ranges"] == {"families": ["mprage", "tfe"], "field_strengths_t": [3.0],
                                           "ti_ms": [700.0, 1000.0], "flip_angle_deg": [8.0, 10.0]}
    # the node's service user reads a package an admin wrote (safetensors itself writes 0600)
    assert all((path / "weights.safetensors").stat().st_mode & 0o777 == 0o644 for path in (a, out))


def test_packages_written_with_infinity_still_combine_into_strict_json(make_package: MakePackage,
                                                                       tmp_path: Path) -> None:
    """Older manifests recorded an untrained network's validation MSE as Infinity (what 0.6 and 0.7 shipped)."""
    a, b = make_package("a", 1, RANGES_A), make_package("b", 2, RANGES_A, range_seed=1)  # same ranges: mixable
    for source in (a, b):
        path = source / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["training"]["best_validation_mse"][2] = float("inf")
        path.write_text(json.dumps(manifest))  # Python writes Infinity
        assert "Infinity" in path.read_text()
    combined = combine_packages(a, {"SV4": b}, tmp_path / "ab", name="ab", version="1")
    mixed = interpolate_packages(a, b, 0.5, tmp_path / "mid", name="mid", version="1")
    strict = {out: json.loads((out / "manifest.json").read_text(),
                              parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
              for out in (combined, mixed)}
    assert strict[combined]["training"]["best_validation_mse"][2] is None
    assert strict[mixed]["training"]["from_training"]["best_validation_mse"][2] is None


def test_a_non_finite_record_is_refused_before_anything_is_written(make_package: MakePackage,
                                                                   tmp_path: Path) -> None:
    package = load_package(make_package("a", 1, RANGES_A))
    weights = package.model.state_dict()
    for bad in ({"metrics": {"ccc": float("nan")}}, {"channel_ranges": np.full((7, 2), np.nan)}):
        arguments = {"name": "x", "version": "1", "state": weights, "unet": TINY,
                     "channel_ranges": package.channel_ranges, "sequence_json": package.sequence.to_json(),
                     "basis": package.basis, "training": {}, "metrics": {}, "normalisation": "p95", **bad}
        with pytest.raises(PackageError, match="finite"):
            write_package(tmp_path / "x", **arguments)  # type: ignore[arg-type]
        assert not (tmp_path / "x").exists()


def test_sources_that_do_not_fit_are_refused(make_package: MakePackage, tmp_path: Path) -> None:
    a = make_package("a", 1, RANGES_A)
    flipped = make_package("flipped", 2, RANGES_A, basis_sign=-1.0)
    with pytest.raises(PackageError, match="SVD basis"):
        combine_packages(a, {"SV4": flipped}, tmp_path / "x", name="x", version="1")
    wider = make_package("wider", 2, RANGES_A, config=UNetConfig(n_nets=7, base_filters=4, depth=4,
                                                                  protocol_features=3))
    with pytest.raises(PackageError, match="architecture"):
        combine_packages(a, {"SV1": wider}, tmp_path / "w", name="w", version="1")
    with pytest.raises(PackageError, match="already taken"):
        combine_packages(a, {"SV4": a, "SV4_im": a}, tmp_path / "y", name="y", version="1")
    with pytest.raises(PackageError, match="already exists"):
        combine_packages(a, {"SV4": a}, a, name="z", version="1")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "w"))


def test_ranges_that_do_not_overlap_are_refused() -> None:
    with pytest.raises(PackageError, match="ti_ms"):
        intersect_ranges([{"families": ["mprage"], "field_strengths_t": [3.0], "ti_ms": [700.0, 800.0]},
                          {"families": ["mprage"], "field_strengths_t": [3.0], "ti_ms": [900.0, 1000.0]}])
    with pytest.raises(PackageError, match="families"):
        intersect_ranges([{"families": ["mprage"], "field_strengths_t": [3.0]},
                          {"families": ["tfe"], "field_strengths_t": [3.0]}])


def test_cli_combine(make_package: MakePackage, tmp_path: Path) -> None:
    a, b = make_package("a", 1, RANGES_A), make_package("b", 2, RANGES_B)
    runner = CliRunner()
    env = {"SYNTHMRF_MODELS_DIR": str(tmp_path / "models")}
    (tmp_path / "metrics.json").write_text('{"ccc_t1": 0.99}')
    result = runner.invoke(cli, ["model", "combine", str(a), "--take", f"SV3={b}", "--out", str(tmp_path / "m"),
                                 "--name", "m", "--version", "1", "--metrics", str(tmp_path / "metrics.json")],
                           env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["metrics"] == {"ccc_t1": 0.99}
    assert "SV3_re: b-1.0" in result.output and "SV1_re: a-1.0" in result.output
    bad = runner.invoke(cli, ["model", "combine", str(a), "--take", "SV3", "--out", str(tmp_path / "n"),
                              "--name", "n", "--version", "1"], env=env)
    assert bad.exit_code == 2 and "CHANNEL=PACKAGE" in bad.output
    missing = runner.invoke(cli, ["model", "combine", str(a), "--take", "SV3=nosuch-9.9", "--out",
                                  str(tmp_path / "o"), "--name", "o", "--version", "1"], env=env)
    assert missing.exit_code == 1 and "nosuch-9.9" in missing.output
    (tmp_path / "list.json").write_text("[1, 2]")
    not_object = runner.invoke(cli, ["model", "combine", str(a), "--take", f"SV3={b}", "--out", str(tmp_path / "p"),
                                     "--name", "p", "--version", "1", "--metrics", str(tmp_path / "list.json")],
                               env=env)
    assert not_object.exit_code == 2 and "expected a JSON object" in not_object.output
    assert not any((tmp_path / n).exists() for n in ("n", "o", "p"))
    noted = runner.invoke(cli, ["model", "combine", str(a), "--take", f"SV3={b}", "--out", str(tmp_path / "q"),
                                "--name", "q", "--version", "1", "--reading-note", "T2 is a prior."], env=env)
    assert noted.exit_code == 0, noted.output
    assert load_package(tmp_path / "q").reading_note == "T2 is a prior."
    for note in ("x" * 401, "a\\b", "Kelvin \u212a", " padded"):
        refused = runner.invoke(cli, ["model", "combine", str(a), "--take", f"SV3={b}", "--out", str(tmp_path / "r"),
                                      "--name", "r", "--version", "1", "--reading-note", note], env=env)
        assert refused.exit_code == 2 and "reading_note must be" in refused.output, refused.output
    assert not (tmp_path / "r").exists()


def _weights(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path / "weights.safetensors"))


def test_interpolation_lies_between_its_sources(make_package: MakePackage, tmp_path: Path) -> None:
    a = make_package("a", 1, RANGES_A)
    b = make_package("b", 2, RANGES_B, range_seed=1)  # a fine-tune keeps its parent's channel ranges
    ends = [interpolate_packages(a, b, alpha, tmp_path / f"i{alpha}", name="i", version=str(alpha))
            for alpha in (0.0, 1.0)]
    np.testing.assert_array_equal(outputs(ends[0]), outputs(a))
    np.testing.assert_array_equal(outputs(ends[1]), outputs(b))
    mid = interpolate_packages(a, b, 0.25, tmp_path / "mid", name="mid", version="0.25")
    wa, wb, wm = _weights(a), _weights(b), _weights(mid)
    assert wa.keys() == wm.keys()
    for key, value in wa.items():
        if value.dtype == np.float16:  # stored fp16: the float32 mix, rounded once
            expected = (0.75 * value.astype(np.float32) + 0.25 * wb[key].astype(np.float32)).astype(np.float16)
            np.testing.assert_array_equal(wm[key], expected, err_msg=key)
        else:  # the SVD basis (fp32) and integer counters are A's
            np.testing.assert_array_equal(wm[key], value, err_msg=key)
    got = outputs(mid)
    assert not np.allclose(got, outputs(a)) and not np.allclose(got, outputs(b))
    manifest = json.loads((mid / "manifest.json").read_text())
    assert manifest["training"]["interpolated"]["alpha"] == 0.25
    assert manifest["training"]["interpolated"]["to"]["package"] == "b-1.0"
    assert manifest["protocol_ranges"] == {"families": ["ir-fspgr", "mprage", "tfe"], "field_strengths_t": [1.5, 3.0],
                                           "ti_ms": [400.0, 1100.0], "flip_angle_deg": [7.0, 13.0]}


def test_interpolation_refuses_what_cannot_be_mixed(make_package: MakePackage, tmp_path: Path) -> None:
    a, other_ranges = make_package("a", 1, RANGES_A), make_package("b", 2, RANGES_A)
    with pytest.raises(PackageError, match="channel ranges differ"):
        interpolate_packages(a, other_ranges, 0.5, tmp_path / "x", name="x", version="1")
    flipped = make_package("flipped", 3, RANGES_A, basis_sign=-1.0, range_seed=1)
    with pytest.raises(PackageError, match="SVD basis"):
        interpolate_packages(a, flipped, 0.5, tmp_path / "y", name="y", version="1")
    with pytest.raises(PackageError, match="alpha"):
        interpolate_packages(a, a, 1.5, tmp_path / "z", name="z", version="1")
    with pytest.raises(PackageError, match="already exists"):
        interpolate_packages(a, a, 0.5, a, name="w", version="1")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


def test_cli_interpolate(make_package: MakePackage, tmp_path: Path) -> None:
    a, b = make_package("a", 1, RANGES_A), make_package("b", 2, RANGES_B, range_seed=1)
    runner = CliRunner()
    env = {"SYNTHMRF_MODELS_DIR": str(tmp_path / "models")}
    result = runner.invoke(cli, ["model", "interpolate", str(a), str(b), "--alpha", "0.5", "--out",
                                 str(tmp_path / "m"), "--name", "m", "--version", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["training"]["interpolated"]["alpha"] == 0.5
    bad = runner.invoke(cli, ["model", "interpolate", str(a), str(b), "--alpha", "2", "--out", str(tmp_path / "n"),
                              "--name", "n", "--version", "1"], env=env)
    assert bad.exit_code == 2 and "alpha" in bad.output
    refused = runner.invoke(cli, ["model", "interpolate", str(a), str(make_package("c", 3, RANGES_A)), "--out",
                                  str(tmp_path / "o"), "--name", "o", "--version", "1"], env=env)
    assert refused.exit_code == 1 and "channel ranges differ" in refused.output
    assert not any((tmp_path / n).exists() for n in ("n", "o"))


def test_a_bad_reading_note_in_a_manifest_is_refused_on_loading(make_package: MakePackage) -> None:
    """The note goes into every result's DICOM text, so a package whose note could not be written is refused."""
    path = make_package("a", 1, RANGES_A)
    manifest = json.loads((path / "manifest.json").read_text())
    for note in (17, "", "two\nlines"):
        (path / "manifest.json").write_text(json.dumps({**manifest, "reading_note": note}))
        with pytest.raises(PackageError, match="reading_note must be"):
            load_package(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "reading_note": "T2 is a prior."}))
    assert load_package(path).reading_note == "T2 is a prior."
