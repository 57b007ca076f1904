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


def offset_affine(affine: np.ndarray, start: object) -> np.ndarray:
    """The affine of the part of ``affine``'s grid that starts at voxel ``start`` (3 indices)."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] += out[:3, :3] @ np.asarray(start, dtype=np.float64)
    return out


def covering_box(mask: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                 target_affine: np.ndarray) -> tuple[slice, slice, slice]:
    """The box of the target grid (``shape``, ``target_affine``) whose trilinear samples of a volume on
    ``mask``'s grid (``affine``) can see a voxel of ``mask``: outside it, such samples of a volume that is zero
    outside ``mask`` are exactly zero. The whole grid for an empty mask."""
    present = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(p.size == 0 for p in present):
        return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    lo = [p[0] - 1 for p in present]
    hi = [p[-1] + 1 for p in present]
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    in_target = (np.linalg.inv(target_affine) @ affine @ corners.T)[:3]
    start = np.maximum(np.floor(in_target.min(axis=1)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(in_target.max(axis=1)).astype(int) + 2, np.asarray(shape[:3]))
    return (slice(int(start[0]), int(stop[0])), slice(int(start[1]), int(stop[1])), slice(int(start[2]), int(stop[2])))
