"""Phantom MPRAGE DICOM: geometry through dcm2niix, dciodvfy validation, styles and identity."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from training.phantom.anatomy import Template, load_template, render
from training.phantom.dicom_series import DicomStyle, Vendor, write_mprage_series
from training.phantom.geometry import Orientation, VolumeGrid
from training.phantom.mprage import acquire, mprage_signal
from training.phantom.subject import PhantomOptions, Subject, draw_subject
from training.phantom.tissues import truth_maps


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed (Debian: dcm2niix, dicom3tools, dcmtk); the test needs it"
    return path


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template()


def _subject(template: Template, options: PhantomOptions) -> Subject:
    """Subject 0, shifted off the midline so that a left-right flip would be caught."""
    subject = draw_subject(0, 0, template, options)
    shifted = dataclasses.replace(subject.warp, translation_mm=np.array([12.0, -8.0, 6.0]))
    return dataclasses.replace(subject, warp=shifted)


def _series(
    template: Template, tmp: Path, orientation: str, style: str = "classic", vendor: str = "siemens"
) -> tuple[Subject, PhantomOptions, np.ndarray, list[Path]]:
    options = PhantomOptions(orientation=Orientation(orientation), downsample=2, mrf=False)
    subject = _subject(template, options)
    grid = options.mprage_grid()
    image = acquire(
        options.protocol,
        subject.tissues,
        render(template, subject.warp, grid),
        bias=subject.bias,
        snr=30.0,
        rng=np.random.default_rng(0),
    )
    paths = write_mprage_series(
        image,
        grid,
        tmp / "dcm",
        protocol=options.protocol,
        identity=subject.identity,
        vendor=Vendor(vendor),
        style=DicomStyle(style),
    )
    return subject, options, image, paths


def _dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir()
    subprocess.run(
        [_tool("dcm2niix"), "-z", "n", "-f", "conv", "-o", str(out), str(folder)], check=True, capture_output=True
    )
    img = nib.load(out / "conv.nii")
    assert isinstance(img, nib.Nifti1Image)
    return img


def _expected_mprage(
    template: Template, subject: Subject, options: PhantomOptions
) -> tuple[np.ndarray, np.ndarray, VolumeGrid]:
    """Ground-truth PD and the MPRAGE contrast predicted from the truth T1/T2/PD, on the MRF grid."""
    grid = options.mrf_grid()
    anatomy = render(template, subject.warp, grid)
    t1, t2, pd = truth_maps(subject.tissues, anatomy)
    on = pd > 0
    signal = np.zeros_like(pd)
    signal[on] = np.abs(pd[on] * mprage_signal(options.protocol, t1[on], t2[on]))
    return anatomy.full(pd), anatomy.full(signal), grid


def _correlate(truth: np.ndarray, truth_grid: VolumeGrid, converted: nib.Nifti1Image, flip_lr: bool) -> float:
    data = np.asarray(converted.dataobj, dtype=np.float32)
    ijk = np.indices(data.shape, dtype=np.float64).reshape(3, -1)
    world = converted.affine[:3, :3] @ ijk + converted.affine[:3, 3:]  # RAS mm
    if flip_lr:
        world[0] *= -1
    to_truth = np.linalg.inv(truth_grid.affine)
    resampled = ndimage.map_coordinates(truth, to_truth[:3, :3] @ world + to_truth[:3, 3:], order=1, cval=0)
    return float(np.corrcoef(resampled, data.ravel())[0, 1])


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal", "oblique"])
def test_dcm2niix_geometry_matches_ground_truth(template: Template, tmp_path: Path, orientation: str) -> None:
    subject, options, _, _ = _series(template, tmp_path, orientation)
    converted = _dcm2niix(tmp_path / "dcm", tmp_path / "nii")
    pd, expected, truth_grid = _expected_mprage(template, subject, options)
    r_expected = _correlate(expected, truth_grid, converted, flip_lr=False)
    r_pd = _correlate(pd, truth_grid, converted, flip_lr=False)
    r_flipped = _correlate(expected, truth_grid, converted, flip_lr=True)
    print(
        f"{orientation}: r(truth-predicted MPRAGE) {r_expected:.3f}, r(truth PD) {r_pd:.3f}, "
        f"r(left-right flipped) {r_flipped:.3f}"
    )
    assert r_expected > 0.9
    assert r_pd > 0.7  # PD is not T1-weighted: CSF is bright in PD, dark in MPRAGE
    assert r_flipped < r_expected - 0.3


@pytest.mark.parametrize(
    ("style", "vendor"), [("classic", "siemens"), ("classic", "ge"), ("enhanced", "siemens"), ("compressed", "ge")]
)
def test_dciodvfy_reports_no_errors(template: Template, tmp_path: Path, style: str, vendor: str) -> None:
    _, _, _, paths = _series(template, tmp_path, "sagittal", style, vendor)
    for path in (paths[0], paths[-1]):
        result = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_enhanced_series_converts_like_classic(template: Template, tmp_path: Path) -> None:
    _, _, image, paths = _series(template, tmp_path / "e", "oblique", "enhanced")
    assert len(paths) == 1
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == pydicom.uid.LegacyConvertedEnhancedMRImageStorage
    assert int(ds.NumberOfFrames) == image.shape[2]
    assert "ReferencedSeriesSequence" not in ds
    enhanced = _dcm2niix(tmp_path / "e" / "dcm", tmp_path / "e" / "nii")
    _series(template, tmp_path / "c", "oblique", "classic")
    classic = _dcm2niix(tmp_path / "c" / "dcm", tmp_path / "c" / "nii")
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(enhanced.dataobj), np.asarray(classic.dataobj))


def test_compressed_series_is_lossless_jpeg_ls(template: Template, tmp_path: Path) -> None:
    _, _, image, paths = _series(template, tmp_path, "axial", "compressed")
    ds = pydicom.dcmread(paths[10])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    np.testing.assert_array_equal(ds.pixel_array, image[:, :, 10].T)
    # Independent decoder: dcmtk's dcmdjpls, then dcm2niix on the decoded files.
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    for path in paths:
        subprocess.run([_tool("dcmdjpls"), str(path), str(decoded / path.name)], check=True, capture_output=True)
    converted = _dcm2niix(decoded, tmp_path / "nii")
    values = np.asarray(converted.dataobj).ravel()
    np.testing.assert_array_equal(np.sort(values), np.sort(image.ravel()))


def test_series_identity_is_consistent_and_synthetic(template: Template, tmp_path: Path) -> None:
    subject, _, _, paths = _series(template, tmp_path, "sagittal", "classic", "ge")
    datasets = [pydicom.dcmread(p) for p in paths]
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName"):
        assert len({str(getattr(d, key)) for d in datasets}) == 1, key
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    first = datasets[0]
    assert str(first.PatientName) == "PHANTOM^SUB001"
    assert first.Manufacturer == "GE MEDICAL SYSTEMS" and first.SeriesDescription == "Sag 3D MPRAGE"
    assert list(first.ScanningSequence) == ["GR", "IR"] and list(first.SequenceVariant) == ["SK", "SP", "MP"]
    assert first.MRAcquisitionType == "3D"
    assert (float(first.RepetitionTime), float(first.InversionTime), float(first.EchoTime), float(first.FlipAngle)) == (
        2130.0,
        900.0,
        2.6,
        8.0,
    )
    assert not any(elem.tag.is_private for d in datasets for elem in d)
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.4  # downsample 2 of 1.2 mm
    assert subject.identity.study_uid == first.StudyInstanceUID


def test_write_rejects_wrong_image(template: Template, tmp_path: Path) -> None:
    options = PhantomOptions(downsample=2, mrf=False)
    subject = draw_subject(0, 0, template, options)
    grid = options.mprage_grid()
    with pytest.raises(ValueError, match=r"image: expected uint16 of shape \(96, 96, 75\), got float32"):
        write_mprage_series(
            np.zeros(grid.shape, np.float32), grid, tmp_path, protocol=options.protocol, identity=subject.identity
        )
    with pytest.raises(ValueError, match=r"image: values must fit 12 bits, got maximum 5000"):
        write_mprage_series(
            np.full(grid.shape, 5000, np.uint16), grid, tmp_path, protocol=options.protocol, identity=subject.identity
        )
