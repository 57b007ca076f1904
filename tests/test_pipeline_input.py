"""Pipeline input: series checks with a named reason for every refusal, and exact conversion for every
DICOM style and transfer syntax a scanner sends (dicom2nifti, cross-checked against the headers)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from pipeline.convert import convert_series
from pipeline.dicom_series import SeriesRejected, read_series
from pipeline.volume_io import load_volume
from training.phantom.dataset import make_dataset
from training.phantom.dicom_series import DicomStyle
from training.phantom.geometry import Orientation
from training.phantom.subject import PhantomOptions


def _subject(root: Path, style: DicomStyle, orientation: Orientation = Orientation.OBLIQUE) -> Path:
    out = root / f"{style.value}-{orientation.value}"
    make_dataset(1, out, seed=5, options=PhantomOptions(downsample=2, style=style, orientation=orientation,
                                                        mrf=False), progress=False)
    return out / "sub-001"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("input-phantoms")
    return {style.value: _subject(root, style) for style in DicomStyle}


def _copy(src: Path, dst: Path, edit: Callable[[pydicom.Dataset, int], pydicom.Dataset | None] | None = None) -> Path:
    """Copy a series, optionally editing each dataset (return None to drop the file)."""
    dst.mkdir(parents=True)
    for n, path in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(path)
        out = edit(ds, n) if edit is not None else ds
        if out is not None:
            out.save_as(dst / path.name, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("style", [s.value for s in DicomStyle])
def test_conversion_is_exact_for_every_style(phantoms: dict[str, Path], style: str) -> None:
    series = read_series(phantoms[style] / "mprage_dicom")
    truth, affine = load_volume(phantoms[style] / "mprage.nii.gz")
    np.testing.assert_allclose(series.grid.ras_affine, affine, atol=1e-3)
    np.testing.assert_array_equal(convert_series(series), truth)
    assert series.multiframe is (style == DicomStyle.ENHANCED.value)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes_convert_exactly(phantoms: dict[str, Path], tmp_path: Path, syntax: str) -> None:
    def compress(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.compress(syntax)
        return ds

    folder = _copy(phantoms["classic"] / "mprage_dicom", tmp_path / "series", compress)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == syntax
    truth, _ = load_volume(phantoms["classic"] / "mprage.nii.gz")
    np.testing.assert_array_equal(convert_series(read_series(folder)), truth)


def test_jpeg_lossless_from_dcmtk_converts_exactly(phantoms: dict[str, Path], tmp_path: Path) -> None:
    dcmcjpeg = shutil.which("dcmcjpeg")
    assert dcmcjpeg is not None, "dcmtk's dcmcjpeg is required (apt-get install dcmtk)"
    folder = tmp_path / "jpeg"
    folder.mkdir()
    for path in sorted((phantoms["classic"] / "mprage_dicom").iterdir()):
        subprocess.run([dcmcjpeg, "+e1", str(path), str(folder / path.name)], check=True, env=os.environ)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    truth, _ = load_volume(phantoms["classic"] / "mprage.nii.gz")
    np.testing.assert_array_equal(convert_series(read_series(folder)), truth)


def test_frames_are_sorted_along_the_normal_whatever_the_file_order(phantoms: dict[str, Path], tmp_path: Path) -> None:
    def shuffle_names(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.InstanceNumber = 1000 - n
        return ds

    folder = _copy(phantoms["classic"] / "mprage_dicom", tmp_path / "s", shuffle_names)
    for i, path in enumerate(sorted(folder.iterdir())):  # names no longer follow position
        path.rename(folder / f"x{(i * 37) % 1000:04d}.dcm")
    series = read_series(folder)
    along = series.grid.positions @ series.grid.normal
    assert np.all(np.diff(along) > 0)
    truth, _ = load_volume(phantoms["classic"] / "mprage.nii.gz")
    np.testing.assert_array_equal(convert_series(series), truth)


def _rejected(folder: Path, match: str) -> None:
    with pytest.raises(SeriesRejected, match=match):
        read_series(folder)


def test_refusals_name_the_reason(phantoms: dict[str, Path], tmp_path: Path) -> None:
    src = phantoms["classic"] / "mprage_dicom"
    empty = tmp_path / "empty"
    empty.mkdir()
    _rejected(empty, "no DICOM files")

    _rejected(_copy(src, tmp_path / "few", lambda ds, n: ds if n < 20 else None), "too few slices")

    def localiser(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        return ds

    _rejected(_copy(src, tmp_path / "loc", localiser), "localiser")

    def two_d(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.MRAcquisitionType = "2D"
        return ds

    _rejected(_copy(src, tmp_path / "2d", two_d), "2D acquisition")
    _rejected(_copy(src, tmp_path / "gap", lambda ds, n: None if n == 30 else ds), "inconsistent slice spacing")

    def tilt(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        if n == 10:
            ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        return ds

    _rejected(_copy(src, tmp_path / "tilt", tilt), "inconsistent orientation")

    def no_position(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        if n == 5:
            del ds.ImagePositionPatient
        return ds

    _rejected(_copy(src, tmp_path / "nopos", no_position), "missing geometry: ImagePositionPatient")

    def mixed(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        if n % 2:
            ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        return ds

    _rejected(_copy(src, tmp_path / "mixed", mixed), "mixed series: 2 Series Instance UIDs")

    def repeated(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.SOPInstanceUID = generate_uid()
        return ds

    dup = _copy(src, tmp_path / "dup")
    _copy(src, tmp_path / "dup2", repeated)
    for p in (tmp_path / "dup2").iterdir():
        p.rename(dup / f"b{p.name}")
    _rejected(dup, "duplicate slice positions")

    def coarse(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.PixelSpacing = [5.0, 5.0]
        return ds

    _rejected(_copy(src, tmp_path / "coarse", coarse), "voxels too coarse")

    def our_result(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        ds.ImageType = ["DERIVED", "SECONDARY", "T1 MAP"]
        return ds

    _rejected(_copy(src, tmp_path / "map", our_result), "a derived map")


def test_damaged_files_are_refused_by_name(phantoms: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(phantoms["classic"] / "mprage_dicom", tmp_path / "header")
    victim = sorted(folder.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:200])  # cut inside the file meta / header
    _rejected(folder, f"{victim.name}: (unreadable DICOM file|not a composite image)")

    folder = _copy(phantoms["classic"] / "mprage_dicom", tmp_path / "pixels")
    victim = sorted(folder.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[:-5000])  # a transfer cut short inside the pixel data
    series = read_series(folder)  # the headers are intact
    with pytest.raises(SeriesRejected, match=f"{victim.name}: cannot decode pixel data"):
        convert_series(series)


def test_non_dicom_files_are_skipped(phantoms: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(phantoms["classic"] / "mprage_dicom", tmp_path / "s")
    (folder / "README.txt").write_text("exported by a PACS viewer")
    assert read_series(folder).grid.n_frames == len(list((phantoms["classic"] / "mprage_dicom").iterdir()))


OTHER_PATIENT_OR_STUDY = {"PatientID": "OTHER0001", "IssuerOfPatientID": "OTHER_HOSPITAL",
                          "PatientName": "INTRUDER^OTHER", "PatientBirthDate": "19010101",
                          "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.7",
                          "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.8"}


@pytest.mark.parametrize(("keyword", "value"), OTHER_PATIENT_OR_STUDY.items(), ids=list(OTHER_PATIENT_OR_STUDY))
def test_files_of_other_patients_or_studies_are_refused_by_attribute_name(phantoms: dict[str, Path], tmp_path: Path,
                                                                          keyword: str, value: str) -> None:
    """One series UID is not enough: every file must be the same patient, study and frame of reference."""
    def other(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        if n == 7:
            setattr(ds, keyword, value)
        return ds

    reason = f"mixed patients, studies or frames of reference in one series: {keyword} not the same"
    with pytest.raises(SeriesRejected, match=reason) as caught:
        read_series(_copy(phantoms["classic"] / "mprage_dicom", tmp_path / "s", other))
    source = pydicom.dcmread(next((phantoms["classic"] / "mprage_dicom").iterdir()), stop_before_pixels=True)
    assert value not in str(caught.value)  # names the attribute, never a value (PHI)
    assert keyword not in source or str(source[keyword].value) not in str(caught.value)


def test_absent_and_empty_identity_attributes_agree(phantoms: dict[str, Path], tmp_path: Path) -> None:
    def unknown_birth_date(ds: pydicom.Dataset, n: int) -> pydicom.Dataset:
        if n % 2:
            del ds.PatientBirthDate
        else:
            ds.PatientBirthDate = ""
        return ds

    series = read_series(_copy(phantoms["classic"] / "mprage_dicom", tmp_path / "s", unknown_birth_date))
    assert series.grid.n_frames == len(list((phantoms["classic"] / "mprage_dicom").iterdir()))
