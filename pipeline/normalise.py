"""Intensity normalisation of the skull-stripped MPRAGE before the networks.

``max`` (models up to 0.2, the paper): divide by the maximum inside the brain mask, so one hot voxel
(a vessel, a mask that caught fat, a spike) rescales the whole brain. ``p95`` (default from 0.3):
divide by the 95th percentile of the brain voxels. In an MPRAGE white matter is the brightest large
tissue (about 40 % of the brain), so the 95th percentile sits in its upper range and up to 5 % of the
brain can be anything without moving it.
"""

from __future__ import annotations

import numpy as np

NORMALISATIONS = ("max", "p95")
DEFAULT_NORMALISATION = "p95"


def intensity_scale(image: np.ndarray, mask: np.ndarray, method: str) -> float:
    """The divisor for ``image`` under ``method`` (one of :data:`NORMALISATIONS`), from the voxels in ``mask``."""
    if method not in NORMALISATIONS:
        raise ValueError(f"normalisation: expected one of {NORMALISATIONS}, got {method!r}")
    inside = np.asarray(image)[np.asarray(mask, dtype=bool)]
    if inside.size == 0:
        raise ValueError("image: the brain mask is empty")
    scale = float(inside.max()) if method == "max" else float(np.percentile(inside, 95))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("image: no positive intensity inside the brain mask")
    return scale


def normalise(image: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """Skull-strip ``image`` with ``mask`` and divide by :func:`intensity_scale` (float32)."""
    scale = intensity_scale(image, mask, method)
    return (np.where(mask, image, 0) / scale).astype(np.float32)
