"""ONNX Runtime against the torch reference: the same channels from the same package, an export cached with a
checksum (a damaged cache file is exported again), and the backend choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model import onnx_backend
from pipeline.model.inference import resolve_backend, synthesise_channels
from pipeline.model.package import SHIPPED_DIR, load_package, sha256_file


@pytest.fixture(scope="module")
def case() -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
    package = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    rng = np.random.default_rng(3)
    volume = rng.uniform(0.1, 1.0, (96, 80, 4)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[16:80, 12:68, :] = True
    volume[~mask] = 0
    features = rng.uniform(-1, 1, package.model.config.protocol_features).astype(np.float32)
    return package, volume, mask, features


def test_onnxruntime_gives_the_torch_channels(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, volume, mask, features = case
    monkeypatch.setenv("SYNTHMRF_CACHE_DIR", str(tmp_path))
    reference = synthesise_channels(volume, mask, package, protocol=features, backend="torch", precision="float32")
    ort = synthesise_channels(volume, mask, package, protocol=features, backend="onnxruntime", precision="float32")
    span = package.channel_ranges[:, 1] - package.channel_ranges[:, 0]
    assert np.abs(ort - reference).max() <= 1e-4 * span.max()  # far below one dictionary step
    assert (ort[~mask] == 0).all()
    [exported] = (tmp_path / "onnx").glob("*.onnx")
    assert exported.with_suffix(".sha256").read_text().strip() == sha256_file(exported)


def test_a_damaged_cached_export_is_made_again(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package, volume, mask, features = case
    monkeypatch.setenv("SYNTHMRF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(onnx_backend, "_SESSIONS", {})
    first = synthesise_channels(volume, mask, package, protocol=features, backend="onnxruntime")
    [exported] = (tmp_path / "onnx").glob("*.onnx")
    exported.write_bytes(exported.read_bytes()[:1000])  # truncated on disk
    monkeypatch.setattr(onnx_backend, "_SESSIONS", {})
    again = synthesise_channels(volume, mask, package, protocol=features, backend="onnxruntime")
    np.testing.assert_array_equal(first, again)
    assert exported.with_suffix(".sha256").read_text().strip() == sha256_file(exported)


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "onnxruntime"
    assert resolve_backend("auto", cpu, torch.bfloat16) == "torch"  # a CPU with native bfloat16
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "torch"
    assert resolve_backend("torch", cpu, torch.float32) == "torch"
    with pytest.raises(ValueError, match="onnxruntime runs on the CPU"):
        resolve_backend("onnxruntime", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match="expected one of"):
        resolve_backend("tensorrt", cpu, torch.float32)
