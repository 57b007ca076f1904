"""A composite package's fluid network, used only where the base model reads fluid.

An MPRAGE carries almost nothing of CSF's T2, so what a model gives there is the prior it was trained with; moving
that prior by fine-tuning the tissue's own networks also moved near-pure tissue by 1-3 % (candidates C and D,
``docs/model-history.md``). A composite package leaves the base's networks as they are and adds a second set
(``fluid/``, e.g. the base fine-tuned on a world with another CSF prior). Each voxel is first matched from the
base's channels; where that T2 lies above the gate's first value its channels are blended toward the fluid
network's by ``w = (T2 - first) / (second - first)`` clipped to [0, 1], in coefficient space (a mixture of the two
signals), and matched again. Every voxel the base reads under the gate keeps the base's maps exactly.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from pipeline.model.inference import synthesise_channels
from pipeline.model.package import ModelPackage
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.matching import Matcher
from pipeline.quality import match_volume_with_quality

logger = logging.getLogger(__name__)


def fluid_weight(t2_ms: np.ndarray, gate_t2_ms: tuple[float, float]) -> np.ndarray:
    """Per voxel, the fluid network's share: 0 at T2 <= the gate's first value, 1 at >= its second, linear between."""
    lo, hi = gate_t2_ms
    return np.clip((np.asarray(t2_ms, np.float32) - lo) / (hi - lo), 0.0, 1.0)


def apply_fluid(maps: dict[str, np.ndarray], channels: np.ndarray, volume: np.ndarray, mask: np.ndarray,
                package: ModelPackage, matcher: Matcher, *, protocol: np.ndarray | None = None,
                batch: int | None = None, device: str | torch.device | None = None, precision: str = "float32",
                backend: str = "torch") -> dict[str, np.ndarray]:
    """``maps`` (matched from the base's ``channels`` (X, Y, Z, 7) over ``mask``; at least T2) with every voxel
    the base reads as fluid matched again from channels blended toward ``package.fluid``'s; ``maps`` itself when
    the package has no fluid network or no voxel reaches the gate. ``volume``, ``protocol`` and the rest are
    what the base's channels were synthesised with (:func:`pipeline.model.inference.synthesise_channels`).
    Only the keys of ``maps`` are returned (T1, T2, PD and, if present, Q)."""
    member = package.fluid
    if member is None:
        return maps
    weight = np.where(mask, fluid_weight(maps["T2"], member.gate_t2_ms), 0.0)
    where = weight > 0
    if not where.any():
        return maps
    slab = mask & where.any(axis=(0, 1))  # the brain of every slice with fluid: the networks see whole slices
    fluid_channels = synthesise_channels(volume, slab, member.package, protocol=protocol, batch=batch,
                                         device=device, precision=precision, backend=backend)
    w = weight[where][:, None]
    blended = (1.0 - w) * channels[where] + w * fluid_channels[where]
    del fluid_channels
    redone = match_volume_with_quality(from_channels(blended.astype(np.float32)), where, matcher)
    logger.info("fluid network: %d of %d brain voxels (%.1f %%) blended, %d fully fluid", int(where.sum()),
                int(mask.sum()), 100.0 * where.sum() / max(int(mask.sum()), 1), int((weight >= 1).sum()))
    out = {}
    for name, values in maps.items():
        out[name] = values.copy()
        if name in redone:
            out[name][where] = redone[name][where]
    return out
