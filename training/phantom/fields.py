"""Smooth random fields in millimetre space: deformations, tissue modulation, bias and coil phase.

A field is a coarse grid of Gaussian noise, smoothed to a correlation length and scaled to a standard
deviation, evaluated anywhere by trilinear interpolation of the coarse grid (cheap at any resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class SmoothField:
    """``values`` (C, nx, ny, nz) sampled every ``spacing_mm`` from ``origin_mm`` along x, y, z."""

    values: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: float

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """Field at ``points_mm`` (3, N): (C, N) float32; constant continuation outside the grid."""
        if points_mm.ndim != 2 or points_mm.shape[0] != 3:
            raise ValueError(f"points_mm: expected shape (3, N), got {points_mm.shape}")
        coords = (points_mm - self.origin_mm.astype(np.float32)[:, None]) / np.float32(self.spacing_mm)
        return np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest", prefilter=False)
                         for c in self.values]).astype(np.float32)


def random_smooth_field(rng: np.random.Generator, *, components: int, centre_mm: np.ndarray,
                        extent_mm: float, correlation_mm: float, sd: float,
                        spacing_mm: float = 8.0) -> SmoothField:
    """Zero-mean field of ``components`` independent components, each with standard deviation ``sd``.

    The coarse grid covers a cube of side ``extent_mm`` around ``centre_mm``; the noise is Gaussian-
    smoothed with sigma ``correlation_mm`` and rescaled so that every component has exactly ``sd``.
    """
    if correlation_mm <= 0 or extent_mm <= 0 or spacing_mm <= 0:
        raise ValueError(f"correlation_mm, extent_mm, spacing_mm: must be > 0, got "
                         f"{correlation_mm}, {extent_mm}, {spacing_mm}")
    n = int(np.ceil(extent_mm / spacing_mm)) + 1
    noise = rng.standard_normal((components, n, n, n))
    values = np.empty_like(noise, dtype=np.float32)
    for c in range(components):
        smooth = ndimage.gaussian_filter(noise[c], correlation_mm / spacing_mm, mode="wrap")
        smooth -= smooth.mean()
        values[c] = smooth * (sd / max(float(smooth.std()), 1e-12))
    origin = np.asarray(centre_mm, dtype=np.float64) - spacing_mm * (n - 1) / 2
    return SmoothField(values, origin, spacing_mm)
