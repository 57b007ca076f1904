"""One DICOM series on disk: its headers, the checks that it can be a 3D MPRAGE volume, and its voxel grid.

Reads headers only (no pixel data). A folder must hold exactly one series of MR Image, Enhanced MR
Image or Legacy Converted Enhanced MR Image objects (single-frame or multi-frame, any transfer
syntax) of one patient, study and frame of reference that stack into one regular 3D grid. Anything
else raises :class:`SeriesRejected`, whose message names the reason, so a user or the node can tell
"not an MPRAGE" from a failure.

Grid convention (as nibabel and the phantom world): voxel ``(i, j, k)`` is column ``i``, row ``j`` of
frame ``k``; frames are sorted along the slice normal (row direction x column direction).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import (
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MediaStorageDirectoryStorage,
    MRImageStorage,
)

logger = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = {
    MRImageStorage: "MR Image",
    EnhancedMRImageStorage: "Enhanced MR Image",
    LegacyConvertedEnhancedMRImageStorage: "Legacy Converted Enhanced MR Image",
}
RESULT_MANUFACTURER = "synthmrf"  # our own results must never come back in as input
MIN_FRAMES = 40  # a 3D T1 volume of the head has well over 100 slices; the downsampled test phantom has 75
MAX_VOXEL_MM = 3.0  # coarser than this is not a 3D T1 the model can use
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE = 0.01  # relative deviation of slice gaps (and absolute mm for in-plane drift)
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Every file of a series must agree on these (absent counts as empty): one patient, study and space.
SAME_IN_EVERY_FILE = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID",
                      "FrameOfReferenceUID")


class SeriesRejected(ValueError):  # noqa: N818 (a verdict on the input, not a failure)
    """The input cannot be an MPRAGE volume; the message says why (not a processing failure)."""


@dataclass(frozen=True)
class SeriesGrid:
    """The voxel grid of a series in patient space (DICOM LPS millimetres)."""

    rows: int
    columns: int
    orientation: np.ndarray  # (6,) row direction then column direction, LPS unit vectors
    pixel_spacing: tuple[float, float]  # DICOM order: between rows (along a column), between columns
    positions: np.ndarray  # (n_frames, 3) ImagePositionPatient of each frame, in frame order

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(columns, rows, frames): the (i, j, k) shape of a volume on this grid."""
        return (self.columns, self.rows, self.n_frames)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def slice_spacing(self) -> float:
        if self.n_frames < 2:
            return 0.0
        return float(np.mean(np.diff(self.positions @ self.normal)))

    @property
    def lps_affine(self) -> np.ndarray:
        """Voxel (i, j, k) to LPS mm."""
        a = np.eye(4)
        a[:3, 0] = self.orientation[:3] * self.pixel_spacing[1]
        a[:3, 1] = self.orientation[3:] * self.pixel_spacing[0]
        a[:3, 2] = self.normal * self.slice_spacing
        a[:3, 3] = self.positions[0]
        return a

    @property
    def ras_affine(self) -> np.ndarray:
        """Voxel (i, j, k) to RAS mm (the NIfTI convention)."""
        return RAS_FROM_LPS @ self.lps_affine

    def to_frames(self, volume: np.ndarray) -> np.ndarray:
        """A volume (i, j, k) on this grid as DICOM frames (k, rows, columns)."""
        if volume.shape != self.shape:
            raise ValueError(f"volume: expected shape {self.shape} (columns, rows, frames), got {volume.shape}")
        return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


@dataclass(frozen=True)
class SourceFrame:
    """Where one frame of the grid comes from (for references and for reading pixels)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based within a multi-frame object; None for single-frame


@dataclass(frozen=True)
class DicomSeries:
    """A checked series: its files, a representative header, the grid and its frames in grid order."""

    folder: Path
    files: tuple[Path, ...]
    header: Dataset  # first instance, without pixel data: patient, study and series attributes
    grid: SeriesGrid
    frames: tuple[SourceFrame, ...]

    @property
    def study_instance_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.header.SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.header.FrameOfReferenceUID)

    @property
    def multiframe(self) -> bool:
        return self.frames[0].frame_number is not None


@dataclass(frozen=True)
class _Frame:
    source: SourceFrame
    orientation: np.ndarray
    position: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int


def _floats(value: object, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise SeriesRejected(f"{where}: missing geometry: {what} is absent or not numeric") from exc
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise SeriesRejected(f"{where}: missing geometry: {what} must have {n} finite values, got {value!r}")
    return out


def _item(ds: Dataset, sequence: str) -> Dataset | None:
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _frames_of(ds: Dataset, path: Path) -> list[_Frame]:
    where = path.name
    if "Rows" not in ds or "Columns" not in ds:
        raise SeriesRejected(f"{where}: no image (Rows/Columns absent)")
    rows, columns = int(ds.Rows), int(ds.Columns)
    sop_class, sop_uid = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesRejected(f"{where}: multi-frame object without per-frame functional groups")
        spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
        return [_Frame(SourceFrame(path, sop_class, sop_uid, None),
                       _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
                       _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
                       (float(spacing[0]), float(spacing[1])), rows, columns)]
    shared = _item(ds, "SharedFunctionalGroupsSequence") or Dataset()
    out = []
    for n, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        here = f"{where} frame {n}"

        def group(name: str, per_frame: Dataset = per_frame) -> Dataset | None:
            return _item(per_frame, name) or _item(shared, name)

        orient, measures, position = (group("PlaneOrientationSequence"), group("PixelMeasuresSequence"),
                                      group("PlanePositionSequence"))
        if orient is None or measures is None or position is None:
            raise SeriesRejected(f"{here}: missing geometry: plane orientation, position or pixel measures absent")
        spacing = _floats(measures.get("PixelSpacing"), 2, "PixelSpacing", here)
        out.append(_Frame(SourceFrame(path, sop_class, sop_uid, n),
                          _floats(orient.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", here),
                          _floats(position.get("ImagePositionPatient"), 3, "ImagePositionPatient", here),
                          (float(spacing[0]), float(spacing[1])), rows, columns))
    return out


def _dicom_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_headers(paths: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    out: list[tuple[Path, Dataset]] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            ds.walk(lambda _ds, _elem: None)  # decode every header value now: a damaged one is a refusal here
        except InvalidDicomError:
            logger.info("skipping %s: not a DICOM file", path.name)
            continue
        except Exception as exc:  # pydicom raises many types for damaged files
            raise SeriesRejected(f"{path.name}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        sop_class = ds.get("SOPClassUID") or ds.get("file_meta", Dataset()).get("MediaStorageSOPClassUID")
        if sop_class == MediaStorageDirectoryStorage:
            continue
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            raise SeriesRejected(f"{path.name}: not a composite image (SOP Class or Series Instance UID absent)")
        out.append((path, ds))
    return out


def _identity_value(ds: Dataset, keyword: str) -> object:
    """``keyword`` of ``ds`` as comparable text (a tuple for several values); None where absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return tuple(str(v) for v in value)
    return str(value)


def _check_same_patient_and_study(headers: list[tuple[Path, Dataset]], root: Path) -> None:
    """Refuse a series whose files disagree on patient, study or frame of reference (names, never values)."""
    first_path, first = headers[0]
    expected = {keyword: _identity_value(first, keyword) for keyword in SAME_IN_EVERY_FILE}
    for path, ds in headers[1:]:
        differing = [keyword for keyword in SAME_IN_EVERY_FILE if _identity_value(ds, keyword) != expected[keyword]]
        if differing:
            raise SeriesRejected(f"{root}: mixed patients, studies or frames of reference in one series: "
                                 f"{', '.join(differing)} not the same in {first_path.name} and {path.name}")


def read_series(folder: str | Path) -> DicomSeries:
    """Read and check the series in ``folder`` (or one multi-frame file)."""
    root = Path(folder)
    headers = _read_headers(_dicom_files(root))
    if not headers:
        raise SeriesRejected(f"{root}: no DICOM files")
    series_uids = sorted({str(ds.SeriesInstanceUID) for _, ds in headers})
    if len(series_uids) > 1:
        raise SeriesRejected(f"{root}: mixed series: {len(series_uids)} Series Instance UIDs "
                             f"({', '.join(series_uids)})")
    _check_same_patient_and_study(headers, root)
    first = headers[0][1]
    for path, ds in headers:
        sop_class = str(ds.SOPClassUID)
        if sop_class not in ACCEPTED_SOP_CLASSES:
            raise SeriesRejected(f"{path.name}: SOP class {sop_class} ({getattr(ds.SOPClassUID, 'name', '?')}) is not "
                                 f"an MR image; expected one of {sorted(ACCEPTED_SOP_CLASSES.values())}")
    image_type = [str(v).upper() for v in first.get("ImageType", [])]
    if str(first.get("Manufacturer", "")).lower() == RESULT_MANUFACTURER or any(v.endswith("MAP") for v in image_type):
        raise SeriesRejected(f"{root}: a derived map (ImageType {'/'.join(image_type)}, Manufacturer "
                             f"{first.get('Manufacturer', '')!s}), not an acquired T1-weighted volume")
    if "LOCALIZER" in image_type:
        raise SeriesRejected(f"{root}: a localiser (ImageType {'/'.join(image_type)}), not a 3D volume")
    acquisition = str(first.get("MRAcquisitionType", "")).upper()
    if acquisition == "2D":
        raise SeriesRejected(f"{root}: a 2D acquisition (MRAcquisitionType 2D); the model needs a 3D T1 volume")
    frames = [f for path, ds in headers for f in _frames_of(ds, path)]
    grid, ordered = _grid(frames, root)
    header = next(ds for path, ds in headers if path == ordered[0].path)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if keyword not in header:
            raise SeriesRejected(f"{ordered[0].path.name}: {keyword} absent")
    files = tuple(sorted({f.path for f in ordered}))
    logger.info("series %s: %d frames %dx%d, voxel %.2fx%.2fx%.2f mm", header.SeriesInstanceUID, grid.n_frames,
                grid.columns, grid.rows, grid.pixel_spacing[1], grid.pixel_spacing[0], grid.slice_spacing)
    return DicomSeries(root, files, header, grid, tuple(ordered))


def _grid(frames: list[_Frame], root: Path) -> tuple[SeriesGrid, list[SourceFrame]]:
    if len(frames) < MIN_FRAMES:
        raise SeriesRejected(f"{root}: too few slices for a 3D volume: {len(frames)} (need at least {MIN_FRAMES})")
    ref = frames[0]
    for f in frames:
        if (f.rows, f.columns) != (ref.rows, ref.columns):
            raise SeriesRejected(f"{root}: inconsistent matrix: {ref.columns}x{ref.rows} and {f.columns}x{f.rows}")
        if np.max(np.abs(f.orientation - ref.orientation)) > ORIENTATION_TOLERANCE:
            raise SeriesRejected(f"{root}: inconsistent orientation: {ref.orientation.round(4).tolist()} and "
                                 f"{f.orientation.round(4).tolist()}")
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=SPACING_TOLERANCE):
            raise SeriesRejected(f"{root}: inconsistent pixel spacing: {ref.pixel_spacing} and {f.pixel_spacing}")
    row, col = ref.orientation[:3], ref.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise SeriesRejected(f"{root}: ImageOrientationPatient is not two orthonormal directions: "
                             f"{ref.orientation.tolist()}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    order = np.argsort([f.position @ normal for f in frames], kind="stable")
    ordered = [frames[i] for i in order]
    positions = np.stack([f.position for f in ordered])
    along = positions @ normal
    gaps = np.diff(along)
    if np.any(gaps < 1e-3):
        raise SeriesRejected(f"{root}: duplicate slice positions ({int(np.sum(gaps < 1e-3))} repeats: several echoes, "
                             "repetitions or series mixed in one folder)")
    spacing = float(np.median(gaps))
    if np.max(np.abs(gaps - spacing)) > SPACING_TOLERANCE * spacing:
        raise SeriesRejected(f"{root}: inconsistent slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
                             "(missing slices?)")
    in_plane = positions - positions[0] - np.outer(along - along[0], normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) > max(SPACING_TOLERANCE, 0.01 * spacing) * len(frames):
        raise SeriesRejected(f"{root}: slices are not stacked along their normal (gantry tilt or a sheared volume)")
    voxel = max(spacing, *ref.pixel_spacing)
    if voxel > MAX_VOXEL_MM:
        raise SeriesRejected(f"{root}: voxels too coarse for a 3D T1 volume: {ref.pixel_spacing[1]:.2f} x "
                             f"{ref.pixel_spacing[0]:.2f} x {spacing:.2f} mm (at most {MAX_VOXEL_MM} mm)")
    grid = SeriesGrid(ref.rows, ref.columns, np.concatenate([row, col]), ref.pixel_spacing, positions)
    return grid, [f.source for f in ordered]
