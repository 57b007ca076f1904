"""Voxel grids in patient space: the MRF grid and the MPRAGE acquisition grids.

Affines map voxel indices (i, j, k) to RAS millimetres (nibabel's convention). DICOM uses LPS: a
grid's :meth:`VolumeGrid.lps_affine` flips x and y. For DICOM slices, ``i`` runs along a row (the
column index), ``j`` down a column (the row index) and ``k`` across slices, so ImageOrientationPatient
is the first two LPS columns of the affine, normalised, and ImagePositionPatient of slice k is
``lps_affine @ (0, 0, k, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


class Orientation(StrEnum):
    """Slice orientation of an acquisition."""

    SAGITTAL = "sagittal"
    AXIAL = "axial"
    CORONAL = "coronal"
    OBLIQUE = "oblique"


# Row and column directions (LPS) of the usual scanner slice orientations (Siemens/GE conventions).
_LPS_ROW_COL = {
    Orientation.SAGITTAL: ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    Orientation.AXIAL: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    Orientation.CORONAL: ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}


@dataclass(frozen=True)
class VolumeGrid:
    """A voxel grid: ``shape`` (i, j, k) and a 4x4 RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape: expected three positive sizes, got {self.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine: expected 4x4, got {self.affine.shape}")

    @property
    def spacing_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def lps_affine(self) -> np.ndarray:
        return RAS_FROM_LPS @ self.affine

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def points_mm(self, flat_index: np.ndarray | None = None, *,
                  transform: np.ndarray | None = None) -> np.ndarray:
        """RAS centres (3, N) float32 of all voxels (C order) or of the given flat indices.

        With ``transform`` (4x4), the points ``transform @ affine @ index`` instead (e.g. voxel indices
        of another grid), computed per component without an (N, 3) matrix product.
        """
        m = self.affine if transform is None else transform @ self.affine
        if flat_index is None:
            axes = [np.arange(n, dtype=np.float32) for n in self.shape]
            out = np.empty((3, *self.shape), dtype=np.float32)
            for c in range(3):
                out[c] = (np.float32(m[c, 3]) + np.float32(m[c, 0]) * axes[0][:, None, None]
                          + np.float32(m[c, 1]) * axes[1][None, :, None]
                          + np.float32(m[c, 2]) * axes[2][None, None, :])
            return out.reshape(3, -1)
        ijk = [a.astype(np.float32) for a in np.unravel_index(flat_index, self.shape)]
        return np.stack([np.float32(m[c, 3]) + np.float32(m[c, 0]) * ijk[0] + np.float32(m[c, 1]) * ijk[1]
                         + np.float32(m[c, 2]) * ijk[2] for c in range(3)])


def _centred_affine(directions_ras: np.ndarray, spacing: np.ndarray, shape: tuple[int, int, int],
                    centre_mm: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = directions_ras * spacing
    affine[:3, 3] = centre_mm - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def mrf_grid(downsample: int = 1) -> VolumeGrid:
    """The MRF grid: axial 256^3 at 1 mm (DICOM axial order: i to the left, j to posterior, k up),
    centred on the origin. ``downsample`` > 1 gives a coarser grid over the same field of view (tests)."""
    if downsample < 1 or 256 % downsample:
        raise ValueError(f"downsample: must divide 256, got {downsample}")
    n = 256 // downsample
    directions = RAS_FROM_LPS[:3, :3]
    return VolumeGrid((n, n, n), _centred_affine(directions, np.full(3, float(downsample)), (n, n, n),
                                                 np.zeros(3)))


def rotation_matrix(axis: tuple[float, float, float] | np.ndarray, angle_deg: float) -> np.ndarray:
    """Right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def acquisition_grid(orientation: Orientation | str = Orientation.SAGITTAL, *,
                     matrix: tuple[int, int, int] = (192, 192, 150), pixel_mm: float = 1.25,
                     slice_mm: float = 1.2, oblique_deg: float = 15.0,
                     centre_mm: np.ndarray | None = None) -> VolumeGrid:
    """An MPRAGE slab: ``matrix`` = (columns, rows, slices), contiguous slices.

    ``oblique`` is a sagittal slab tilted by ``oblique_deg`` about the anterior-posterior axis and by
    the same angle about the superior-inferior axis (double oblique), as planned on a tilted head.
    """
    orientation = Orientation(orientation)
    base = Orientation.SAGITTAL if orientation is Orientation.OBLIQUE else orientation
    row, col = (np.asarray(v) for v in _LPS_ROW_COL[base])
    lps = np.stack([row, col, np.cross(row, col)], axis=1)
    if orientation is Orientation.OBLIQUE:
        lps = rotation_matrix((0, 0, 1), oblique_deg) @ rotation_matrix((0, 1, 0), oblique_deg) @ lps
    ras = RAS_FROM_LPS[:3, :3] @ lps
    spacing = np.array([pixel_mm, pixel_mm, slice_mm])
    centre = np.zeros(3) if centre_mm is None else np.asarray(centre_mm, dtype=np.float64)
    shape = (int(matrix[0]), int(matrix[1]), int(matrix[2]))
    return VolumeGrid(shape, _centred_affine(ras, spacing, shape, centre))
