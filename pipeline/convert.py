"""DICOM series to a volume on the series' own grid, through dicom2nifti, with a geometry cross-check.

dicom2nifti writes the voxels in its own order (it may reverse the slice axis). Its affine and ours
(:class:`pipeline.dicom_series.SeriesGrid`, from the headers) must describe the same voxel centres; the
volume is brought onto our grid by the exact index permutation between the two, and any disagreement
beyond a tenth of a millimetre is an error, never a silent resample.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from pipeline.dicom_series import DicomSeries, SeriesRejected
from pipeline.volume_io import load_volume

logger = logging.getLogger(__name__)

GEOMETRY_TOLERANCE_MM = 0.1


def convert_series(series: DicomSeries) -> np.ndarray:
    """Pixel volume (i, j, k) on ``series.grid`` as float32, converted with dicom2nifti."""
    import dicom2nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    with tempfile.TemporaryDirectory(prefix="synthmrf-convert-") as tmp:
        out = Path(tmp) / "series.nii.gz"
        try:
            dicom2nifti.convert_dicom.dicom_series_to_nifti(str(series.folder), str(out), reorient_nifti=False)
        except (ConversionError, ConversionValidationError) as exc:
            raise SeriesRejected(f"{series.folder}: dicom2nifti cannot convert the series ({exc})") from exc
        data, affine = load_volume(out)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return on_grid(data, affine, series)


def on_grid(data: np.ndarray, affine: np.ndarray, series: DicomSeries) -> np.ndarray:
    """``data`` (with RAS ``affine``) re-indexed onto ``series.grid``; raises if the geometries disagree."""
    grid = series.grid
    if data.ndim != 3 or sorted(data.shape) != sorted(grid.shape):
        raise ValueError(f"{series.folder}: converted volume has shape {data.shape}, the headers describe "
                         f"{grid.shape}")
    index_map = np.linalg.inv(affine) @ grid.ras_affine  # our voxel -> their voxel
    linear = np.round(index_map[:3, :3])
    if not np.allclose(index_map[:3, :3], linear, atol=1e-3) or sorted(np.abs(linear).sum(axis=0)) != [1, 1, 1]:
        raise ValueError(f"{series.folder}: converter geometry disagrees with the DICOM headers "
                         f"(index map {np.round(index_map[:3, :3], 4).tolist()})")
    out = data
    axes = [int(np.flatnonzero(linear[:, a])[0]) for a in range(3)]  # their axis for each of ours
    out = np.transpose(out, axes)
    for a in range(3):
        if linear[axes[a], a] < 0:
            out = np.flip(out, axis=a)
    if out.shape != grid.shape:
        raise ValueError(f"{series.folder}: converted volume shape {out.shape} != grid {grid.shape}")
    corner_error = _corner_error(affine, data.shape, grid.ras_affine, grid.shape)
    if corner_error > GEOMETRY_TOLERANCE_MM:
        raise ValueError(f"{series.folder}: converter geometry disagrees with the DICOM headers by "
                         f"{corner_error:.2f} mm")
    return np.ascontiguousarray(out, dtype=np.float32)


def _corner_error(a: np.ndarray, a_shape: tuple[int, ...], b: np.ndarray, b_shape: tuple[int, ...]) -> float:
    """Largest distance between the two grids' sets of corner voxel centres (mm)."""
    def corners(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)]).T
        pts = (affine @ idx)[:3].T
        return pts[np.lexsort(np.round(pts, 1).T)]

    return float(np.max(np.linalg.norm(corners(a, a_shape) - corners(b, b_shape), axis=1)))
