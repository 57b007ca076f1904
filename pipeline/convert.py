"""DICOM series to a volume on the series' own grid, through dicom2nifti, with a geometry cross-check.

dicom2nifti writes the voxels in its own order (it may reverse the slice axis). Its affine and ours
(:class:`pipeline.dicom_series.SeriesGrid`, from the headers) must describe the same voxel centres; the
volume is brought onto our grid by the exact index permutation between the two, and any disagreement
beyond a tenth of a millimetre is an error, never a silent resample. Where dicom2nifti gives up on a
series whose headers passed our checks (its vendor paths do not cover every multi-frame layout) or on
damaged pixel data, the frames are stacked directly from pydicom's decoded pixels in the checked frame
order; a frame that cannot be decoded is then refused by file name.
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

    with tempfile.TemporaryDirectory(prefix="synthmrf-convert-") as tmp:
        out = Path(tmp) / "series.nii.gz"
        try:
            dicom2nifti.convert_dicom.dicom_series_to_nifti(str(series.folder), str(out), reorient_nifti=False)
        except Exception as exc:  # dicom2nifti raises anything from its vendor paths and pydicom's decoders
            logger.info("series %s: dicom2nifti gave up (%s: %s); stacking the checked frames directly",
                        series.series_instance_uid, type(exc).__name__, exc)
            return stack_frames(series)
        data, affine = load_volume(out)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return on_grid(data, affine, series)


def stack_frames(series: DicomSeries) -> np.ndarray:
    """Pixel volume (i, j, k) on ``series.grid`` from the decoded frames, rescale applied (float32)."""
    import pydicom

    out = np.empty(series.grid.shape, dtype=np.float32)
    by_file: dict[Path, list[tuple[int, int | None]]] = {}
    for k, frame in enumerate(series.frames):
        by_file.setdefault(frame.path, []).append((k, frame.frame_number))
    for path, frames in by_file.items():
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
        except Exception as exc:  # decoders raise many types for damaged or unsupported pixel data
            raise SeriesRejected(f"{path.name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
        slope, intercept = _rescale(ds)
        for k, number in frames:
            image = pixels if number is None else pixels[number - 1]
            out[:, :, k] = image.T * slope + intercept
    return out


def _rescale(ds: object) -> tuple[float, float]:
    """Top-level or shared functional group rescale (identity when absent)."""
    source = ds
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if shared and "PixelValueTransformationSequence" in shared[0]:
        source = shared[0].PixelValueTransformationSequence[0]
    return float(getattr(source, "RescaleSlope", 1.0) or 1.0), float(getattr(source, "RescaleIntercept", 0.0) or 0.0)


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
