"""Tiny model packages with their own random weights, for the tests of packages made of packages. Not a test module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.model.package import write_package
from pipeline.model.unet import UNetConfig, UNetEnsemble
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence

TINY = UNetConfig(n_nets=7, base_filters=2, depth=4, protocol_features=3)


def tiny_package(out: Path, sequence: Sequence, dictionary: Dictionary, name: str, seed: int,
                 ranges: dict[str, object], *, basis_sign: float = 1.0, config: UNetConfig = TINY,
                 range_seed: int | None = None) -> Path:
    """A package in ``out / name`` with random weights (trained-looking batch-norm statistics) and channel ranges
    drawn from ``range_seed`` (default ``seed``; a fine-tune keeps its parent's)."""
    torch.manual_seed(seed)
    model = UNetEnsemble(config)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None  # tracked by default
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    r = seed if range_seed is None else range_seed
    low = -0.5 - 0.1 * r - 0.01 * np.arange(7, dtype=np.float32)
    channel_ranges = np.stack([low, low + 1.5 + 0.1 * r], axis=1)
    return write_package(
        out / name, name=name, version="1.0", state=model.state_dict(), unet=config,
        channel_ranges=channel_ranges, sequence_json=sequence.to_json(), basis=basis_sign * dictionary.basis[:, :4],
        training={"created": "2026-01-01T00:00:00Z", "best_validation_mse": [float(seed)] * 7},
        metrics={}, normalisation="p95", trained_protocols=ranges)
