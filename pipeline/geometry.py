"""Resampling between voxel grids through their affines (patient space is the common frame)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def resample_to_grid(data: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], target_affine: np.ndarray,
                     *, order: int = 1, fill: float = 0.0) -> np.ndarray:
    """``data`` (with 4x4 ``affine``) sampled on the grid (``shape``, ``target_affine``).

    Both affines map voxel indices to the same world space (e.g. RAS mm), so target voxel v reads
    source voxel inv(affine) @ target_affine @ v. ``order`` 0 = nearest (labels), 1 = trilinear.
    """
    if data.ndim != 3:
        raise ValueError(f"data: expected a 3-D volume, got {data.ndim}-D")
    for name, a in (("affine", affine), ("target_affine", target_affine)):
        if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
            raise ValueError(f"{name}: expected an invertible 4x4 affine, got {a.tolist()}")
    to_source = np.linalg.inv(affine) @ target_affine
    out = ndimage.affine_transform(data.astype(np.float32, copy=False), to_source[:3, :3], offset=to_source[:3, 3],
                                   output_shape=tuple(shape), order=order, mode="constant", cval=fill,
                                   prefilter=False)
    return out
