"""MRF SVD coefficients in the archive: the DICOM form a harvest reads, its writer and its reader.

The form (``synthmrf-mrf-svd/1``)
---------------------------------
MR fingerprinting data enter a training set as *compressed coefficients*: the complex coefficients of
each voxel's fingerprint in the sequence's SVD basis (rank K, K >= 4), phase-normalised (the first
component real and >= 0; see ``pipeline.mrf.coefficients``), on the MRF grid (normally axial 256^3 at
1 mm), exactly what ``synthmrf mrf simulate`` and the phantom write as ``mrf_svd.nii.gz``. In the
archive they are one DICOM series in the study of the session (so it shares the MPRAGE's patient and,
normally, its Frame of Reference):

- SOP class **Parametric Map Storage** (1.2.840.10008.5.1.4.1.1.30), **Float Pixel Data** (32-bit IEEE,
  the values exactly as computed; Real World Value Mapping the identity, unit UCUM ``1``);
- **one instance per singular component and part**: 2K instances, each a multi-frame volume with one
  frame per slice along the grid's third axis. ``ContentLabel`` (0070,0080) says which:
  ``MRF_SV<k>_RE`` or ``MRF_SV<k>_IM`` with k = 1..K; ``InstanceNumber`` is 2k-1 (real) and 2k
  (imaginary), for humans only;
- geometry in the functional groups as for any enhanced image: Plane Orientation (the grid's first two
  axes in LPS), Pixel Measures (PixelSpacing = spacing along the second axis, then the first),
  and per frame Plane Position (ImagePositionPatient of the frame's first voxel); frame pixel (row r,
  column c) of the slice k is voxel (i=c, j=r, k);
- ``ContentDescription`` (0070,0081) holds the **sequence hash**: the 64 hexadecimal characters of
  ``Sequence.hash()`` (SHA-256 of the sequence file's physics) the basis was computed with; every
  instance of the series carries the same hash;
- ``SeriesDescription`` begins with ``MRF SVD`` (what ``retro.harvest_mrf_pattern`` recognises by
  default; a harvest finds the series by this name, not by Modality, which the writer leaves at
  highdicom's ``OT``), followed by the sequence name when known. ``ImageType`` is
  DERIVED\\PRIMARY\\VOLUME\\QUANTITY (so the node's MPRAGE rules never take the series for a T1 volume).

:func:`mrf_series` / :func:`write_mrf_series` produce this form from a coefficient volume and an affine
(sites can convert their reconstructions with them); :func:`read_mrf_series` turns a retrieved series
back into (coefficients, affine, hash), checking that the instances agree. Frames are placed by their
positions along the slice normal (row direction x column direction): a grid whose third axis points
against that normal comes back with k reversed and the affine to match (the same voxels in space).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from highdicom import (
    CoordinateSystemNames,
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
    VOILUTTransformation,
)
from highdicom.pm import ParametricMap, RealWorldValueMapping
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

FORMAT = "synthmrf-mrf-svd/1"
PARAMETRIC_MAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.30")
SERIES_DESCRIPTION = "MRF SVD"
LABEL = re.compile(r"^MRF_SV(\d{1,3})_(RE|IM)$")
HASH = re.compile(r"^[0-9a-f]{64}$")
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
UNITLESS = CodedConcept("1", "UCUM", "no units")
GEOMETRY_TOLERANCE_MM = 1e-3


class MrfFormatError(ValueError):
    """A series is not MRF SVD coefficients in the documented form; the message says what is wrong where."""


@dataclass(frozen=True)
class MrfVolume:
    coefficients: np.ndarray  # (X, Y, Z, K) complex64
    affine: np.ndarray  # voxel -> RAS mm
    sequence_hash: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str

    @property
    def rank(self) -> int:
        return int(self.coefficients.shape[3])


def label(k: int, imaginary: bool) -> str:
    return f"MRF_SV{k}_{'IM' if imaginary else 'RE'}"


def _geometry(affine: np.ndarray, n_slices: int) -> tuple[list[float], list[float], list[list[float]]]:
    lps = RAS_FROM_LPS @ np.asarray(affine, dtype=np.float64)
    col_i, col_j = lps[:3, 0], lps[:3, 1]
    si, sj = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    orientation = [*(col_i / si), *(col_j / sj)]
    positions = [(lps @ np.array([0.0, 0.0, k, 1.0]))[:3].tolist() for k in range(n_slices)]
    return orientation, [sj, si], positions


def mrf_series(coefficients: np.ndarray, affine: np.ndarray, source: Dataset, *, sequence_hash: str,
               sequence_name: str = "", series_uid: str | None = None, series_number: int = 900) -> list[ParametricMap]:
    """The 2K Parametric Map instances of ``coefficients`` ((X, Y, Z, K) complex) on the grid ``affine`` (RAS).

    ``source``: an image header of the same session (the MPRAGE, say): patient, study and Frame of
    Reference are taken from it.
    """
    c = np.asarray(coefficients)
    if c.ndim != 4 or not np.iscomplexobj(c) or c.shape[3] < 1:
        raise ValueError(f"coefficients: expected a complex (X, Y, Z, K) array, got {c.dtype} {c.shape}")
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or abs(np.linalg.det(a[:3, :3])) < 1e-9:
        raise ValueError(f"affine: expected an invertible 4x4 matrix, got {a.tolist()}")
    if not HASH.match(sequence_hash):
        raise ValueError(f"sequence_hash: expected 64 lowercase hex characters, got {sequence_hash!r}")
    nz, rank = c.shape[2], c.shape[3]
    orientation, spacing, positions = _geometry(a, nz)
    slice_mm = float(np.linalg.norm(a[:3, 2]))
    series_uid = series_uid or generate_uid()
    now = datetime.datetime.now()
    description = f"{SERIES_DESCRIPTION} {sequence_name}".strip()[:64]
    out = []
    for k in range(1, rank + 1):
        for imaginary in (False, True):
            part = c[..., k - 1].imag if imaginary else c[..., k - 1].real
            frames = np.ascontiguousarray(np.transpose(part, (2, 1, 0))).astype(np.float32)
            lo, hi = float(frames.min()), float(frames.max())
            pm = ParametricMap(
                source_images=[source],
                pixel_array=frames,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=generate_uid(),
                instance_number=2 * k - 1 + int(imaginary),
                manufacturer="synthmrf",
                manufacturer_model_name="synthmrf MRF SVD export",
                software_versions=FORMAT,
                device_serial_number="0",
                contains_recognizable_visual_features=False,
                real_world_value_mappings=[RealWorldValueMapping(
                    lut_label=f"SV{k}_{'IM' if imaginary else 'RE'}",
                    lut_explanation=f"MRF SVD component {k}, {'imaginary' if imaginary else 'real'} part",
                    unit=UNITLESS, value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0)],
                voi_lut_transformations=[VOILUTTransformation(  # lists: highdicom 0.28 splits a str explanation
                    window_center=[(lo + hi) / 2], window_width=[max(hi - lo, 1e-6)],
                    window_explanation=[f"SV{k} {'imaginary' if imaginary else 'real'}"])],
                transfer_syntax_uid=ExplicitVRLittleEndian,
                content_label=label(k, imaginary),
                content_description=sequence_hash,
                plane_orientation=PlaneOrientationSequence(CoordinateSystemNames.PATIENT, orientation),
                plane_positions=[PlanePositionSequence(CoordinateSystemNames.PATIENT, p) for p in positions],
                pixel_measures=PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=slice_mm,
                                                     spacing_between_slices=slice_mm),
                series_description=description,
                series_date=now.date(), series_time=now.time(), content_date=now.date(), content_time=now.time(),
            )
            pm.DerivationDescription = f"{FORMAT}: MRF SVD coefficients, rank {rank}, sequence {sequence_name or '?'}"
            out.append(pm)
    return out


def write_mrf_series(coefficients: np.ndarray, affine: np.ndarray, source: Dataset, out_dir: Path, **kwargs: object
                     ) -> list[Path]:
    """:func:`mrf_series`, written to ``out_dir`` (one file per instance)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for pm in mrf_series(coefficients, affine, source, **kwargs):  # type: ignore[arg-type]
        path = out_dir / f"MRF{int(pm.InstanceNumber):04d}.dcm"
        pm.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _floats(value: object, n: int, what: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise MrfFormatError(f"{where}: {what} is not {n} numbers ({value!r})") from exc
    if arr.shape != (n,):
        raise MrfFormatError(f"{where}: {what} has {arr.size} values, expected {n}")
    return arr


def _instance_grid(ds: Dataset, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(orientation (6,), pixel spacing (2,), positions (frames, 3)) of one multi-frame instance."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared or not per_frame:
        raise MrfFormatError(f"{where}: no shared/per-frame functional groups")
    group = shared[0]
    try:
        orientation = _floats(group.PlaneOrientationSequence[0].ImageOrientationPatient, 6,
                              "ImageOrientationPatient", where)
        spacing = _floats(group.PixelMeasuresSequence[0].PixelSpacing, 2, "PixelSpacing", where)
        positions = np.stack([_floats(f.PlanePositionSequence[0].ImagePositionPatient, 3, "ImagePositionPatient",
                                      where) for f in per_frame])
    except (AttributeError, IndexError) as exc:
        raise MrfFormatError(f"{where}: plane orientation, pixel measures or plane positions missing ({exc})") from exc
    if positions.shape[0] != int(ds.NumberOfFrames):
        raise MrfFormatError(f"{where}: {positions.shape[0]} plane positions for {int(ds.NumberOfFrames)} frames")
    return orientation, spacing, positions


def read_mrf_series(files: Sequence[Path]) -> MrfVolume:
    """The coefficient volume of one retrieved MRF SVD series (all its instance files)."""
    if not files:
        raise MrfFormatError("no files: an MRF SVD series has 2K instances")
    parts: dict[tuple[int, bool], np.ndarray] = {}
    reference: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    first: Dataset | None = None
    hashes = set()
    for path in files:
        ds = pydicom.dcmread(path)
        where = f"{path.name}"
        if str(ds.get("SOPClassUID", "")) != PARAMETRIC_MAP_STORAGE:
            raise MrfFormatError(f"{where}: SOP class {ds.get('SOPClassUID')} is not Parametric Map Storage")
        m = LABEL.match(str(ds.get("ContentLabel", "")))
        if not m:
            raise MrfFormatError(f"{where}: ContentLabel {ds.get('ContentLabel')!r} is not MRF_SV<k>_RE or _IM")
        key = (int(m.group(1)), m.group(2) == "IM")
        if key in parts:
            raise MrfFormatError(f"{where}: {m.group(0)} appears twice in the series")
        digest = str(ds.get("ContentDescription", "")).strip()
        if not HASH.match(digest):
            raise MrfFormatError(f"{where}: ContentDescription {digest!r} is not a sequence hash (64 hex characters)")
        hashes.add(digest)
        orientation_i, spacing_i, positions_i = _instance_grid(ds, where)
        order = np.argsort(positions_i @ np.cross(orientation_i[:3], orientation_i[3:]), kind="stable")
        grid = (orientation_i, spacing_i, positions_i[order])
        if reference is None:
            reference, first = grid, ds
        elif not (np.allclose(grid[0], reference[0], atol=1e-6) and np.allclose(grid[1], reference[1], atol=1e-6)
                  and grid[2].shape == reference[2].shape
                  and np.allclose(grid[2], reference[2], atol=GEOMETRY_TOLERANCE_MM)):
            raise MrfFormatError(f"{where}: geometry differs from the other instances of the series")
        frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)).astype(np.float32)
        parts[key] = frames[order]
    assert reference is not None and first is not None
    if len(hashes) != 1:
        raise MrfFormatError(f"instances disagree on the sequence hash: {sorted(hashes)}")
    rank = max(k for k, _ in parts)
    missing = [label(k, im) for k in range(1, rank + 1) for im in (False, True) if (k, im) not in parts]
    if missing:
        raise MrfFormatError(f"series {first.SeriesInstanceUID}: instances missing: {missing}")
    orientation, spacing, positions = reference
    normal = np.cross(orientation[:3], orientation[3:])
    n = positions.shape[0]
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing[1]
    lps[:3, 1] = orientation[3:] * spacing[0]
    lps[:3, 2] = (positions[-1] - positions[0]) / (n - 1) if n > 1 else normal
    lps[:3, 3] = positions[0]
    expected = positions[0] + np.outer(np.arange(n), lps[:3, 2])
    if np.abs(expected - positions).max() > GEOMETRY_TOLERANCE_MM * 100:
        raise MrfFormatError(f"series {first.SeriesInstanceUID}: frames are not evenly spaced along the normal")
    ny, nx = parts[(1, False)].shape[1:]
    coeffs = np.empty((nx, ny, n, rank), dtype=np.complex64)
    for k in range(1, rank + 1):
        re = np.transpose(parts[(k, False)], (2, 1, 0))
        im = np.transpose(parts[(k, True)], (2, 1, 0))
        coeffs[..., k - 1] = re + 1j * im
    return MrfVolume(coeffs, RAS_FROM_LPS @ lps, hashes.pop(), str(first.StudyInstanceUID),
                     str(first.SeriesInstanceUID), str(first.get("FrameOfReferenceUID", "")))
