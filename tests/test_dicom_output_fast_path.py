"""The fast paths of the DICOM results against the straightforward ones: each derived image (built from its
series' shared, encoded-once attributes) equals the one the DerivedMRImage constructor builds for that slice
alone, element by element and byte for byte, also after the writer marks it; writing many files (flushed
together, then renamed) leaves all or nothing.

Sources are small phantom series (16 columns x 20 rows x 40 slices): classic, Legacy Converted Enhanced (frame
references) and classic with a Japanese character set (ISO 2022 escapes in the shared, encoded text).
"""

from __future__ import annotations

import datetime
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from pipeline.contrasts import DEFAULT_CONTRASTS
from pipeline.dicom_output import Provenance, build_derived_series
from pipeline.dicom_output import derived_series as derived_module
from pipeline.dicom_output import writer as writer_module
from pipeline.dicom_output.derived_series import DerivedMRImage, encode, encoded_file
from pipeline.dicom_output.provenance import QUALITY_COMMENT, flag_result
from pipeline.dicom_output.quantities import QuantitySpec, contrast_spec, map_frames, quantity_spec
from pipeline.dicom_output.source import slice_thickness, source_header
from pipeline.dicom_series import DicomSeries, read_series
from training.phantom.dicom_series import DicomStyle, make_identity, write_mprage_series
from training.phantom.geometry import Orientation, acquisition_grid
from training.phantom.mprage import MprageProtocol

MATRIX = (16, 20, 40)  # columns, rows, slices (read_series wants 40 or more)
PROVENANCE = Provenance("synthmrf-unet", "1.2.0", "0123456789abcdef" * 4, "0.1.0")
REASONS = ["protocol: MagneticFieldStrength 1.5 T (trained on 3 T)"]
JAPANESE = (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎")


def _series(root: Path, orientation: str, style: str, japanese: bool = False) -> DicomSeries:
    grid = acquisition_grid(Orientation(orientation), matrix=MATRIX, pixel_mm=2.5, slice_mm=2.4)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 4000, grid.shape).astype(np.uint16)
    paths = write_mprage_series(image, grid, root / "phantom", protocol=MprageProtocol(),
                                identity=make_identity("sub-003", f"fast-path/{orientation}-{style}", rng),
                                style=DicomStyle(style))
    if not japanese:
        return read_series(root / "phantom")
    (root / "source").mkdir()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet, ds.PatientName = JAPANESE
        ds.save_as(root / "source" / path.name, enforce_file_format=True)
    return read_series(root / "source")


def _values(series: DicomSeries) -> np.ndarray:
    """A T2-like ramp (ms) with every stored value different along i, j and k."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in series.grid.shape), indexing="ij")
    return (40.0 + 0.37 * i + 1.13 * j + 2.71 * k).astype(np.float32)


def _reference(image: Dataset, k: int, series: DicomSeries, values: np.ndarray, spec: QuantitySpec,
               monkeypatch: pytest.MonkeyPatch, **texts: str) -> DerivedMRImage:
    """Slice ``k`` built on its own by the constructor, with ``image``'s series and its own UID and creation time."""
    stored, _ = encode(map_frames(values, series.grid), spec)
    grid = series.grid
    monkeypatch.setattr(derived_module, "new_uid", lambda root=None: str(image.SOPInstanceUID))
    reference = DerivedMRImage(
        source=source_header(series), source_frame=series.frames[k], pixel_array=stored[k],
        position=grid.positions[k].tolist(), orientation=grid.orientation.tolist(),
        pixel_spacing=list(grid.pixel_spacing), slice_thickness=slice_thickness(series.header, grid.slice_spacing),
        spacing_between_slices=grid.slice_spacing, quantity=spec, provenance=PROVENANCE,
        series_instance_uid=str(image.SeriesInstanceUID), series_number=int(image.SeriesNumber),
        instance_number=k + 1, series_datetime=datetime.datetime.combine(DA(image.SeriesDate), TM(image.SeriesTime)),
        **texts)
    reference.InstanceCreationDate = image.InstanceCreationDate
    reference.InstanceCreationTime = image.InstanceCreationTime
    return reference


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _assert_same_elements(ours: Dataset, reference: Dataset, where: str = "") -> None:
    assert [e.keyword for e in ours] == [e.keyword for e in reference], where or "top level"
    for mine, theirs in zip(ours, reference, strict=True):
        if mine.VR == "SQ":
            assert len(mine.value) == len(theirs.value), f"{where}{mine.keyword}"
            for n, (a, b) in enumerate(zip(mine.value, theirs.value, strict=True)):
                _assert_same_elements(a, b, f"{where}{mine.keyword}[{n}].")
        else:
            assert (mine.VR, mine.value) == (theirs.VR, theirs.value), f"{where}{mine.keyword}"


def _assert_identical(ours: Dataset, reference: Dataset) -> None:
    """Element by element as read back (a readable difference), then byte for byte as written."""
    mine, theirs = _encoded(ours), _encoded(reference)
    read_mine, read_theirs = (pydicom.dcmread(io.BytesIO(b)) for b in (mine, theirs))
    _assert_same_elements(read_mine.file_meta, read_theirs.file_meta, "file meta: ")
    _assert_same_elements(read_mine, read_theirs)
    assert mine == theirs


CASES = {  # case: (orientation, style, Japanese character set, a synthetic contrast rather than T2)
    "classic-T2": ("sagittal", "classic", False, False),
    "enhanced-T2": ("oblique", "enhanced", False, False),
    "japanese-FLAIR": ("axial", "classic", True, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_image_is_the_one_the_constructor_builds_for_its_slice(case: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    orientation, style, japanese, synthetic = CASES[case]
    series = _series(tmp_path, orientation, style, japanese)
    values = _values(series)
    spec, texts = quantity_spec("T2"), {}
    if synthetic:
        flair = DEFAULT_CONTRASTS[3]
        spec = contrast_spec(flair, 3, values)
        texts = {"series_description": f"synthMRF synthetic {flair.name}, not acquired",
                 "derivation": PROVENANCE.contrast_derivation(flair)}
    images = build_derived_series(series, values, spec, PROVENANCE, series_number=312, **texts)
    assert [int(im.InstanceNumber) for im in images] == list(range(1, MATRIX[2] + 1))
    assert len({im.SOPInstanceUID for im in images}) == MATRIX[2]
    for k in (0, 1, MATRIX[2] // 2, MATRIX[2] - 1):
        reference = _reference(images[k], k, series, values, spec, monkeypatch, **texts)
        assert images[k].file_meta == reference.file_meta
        _assert_identical(images[k], reference)
        for ds in (images[k], reference):  # what write_result_series does to the images of a flagged study
            ds.ImageComments = QUALITY_COMMENT
            flag_result(ds, REASONS)
        _assert_identical(images[k], reference)
    if japanese:
        assert str(pydicom.dcmread(io.BytesIO(_encoded(images[-1]))).PatientName) == JAPANESE[1]


@pytest.mark.parametrize("case", list(CASES))
def test_encoded_file_is_what_save_as_writes(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's encoding of a derived image (shared attributes from their encoding once per series) is pydicom's
    byte for byte: as built, after the writer marks the image (changed and added shared attributes) and after
    attributes were read (pydicom decodes what is read)."""
    orientation, style, japanese, _ = CASES[case]
    series = _series(tmp_path, orientation, style, japanese)
    images = build_derived_series(series, _values(series), "T2", PROVENANCE, series_number=312)
    expected = [_encoded(im) for im in images]
    with monkeypatch.context() as patch:  # the shortcut, not pydicom's save_as
        patch.setattr(Dataset, "save_as", lambda *args, **kwargs: pytest.fail("save_as called"))
        assert [encoded_file(im) for im in images] == expected
        _ = [(im.SeriesDescription, im.PatientName, im.RealWorldValueMappingSequence[0].LUTLabel) for im in images[:3]]
        assert [encoded_file(im) for im in images[:3]] == expected[:3]
    for im in images[:2]:  # what write_result_series does to the images of a flagged study
        im.ImageComments = QUALITY_COMMENT
        flag_result(im, REASONS)
    assert [encoded_file(im) for im in images[:3]] == [_encoded(im) for im in images[:3]]
    assert encoded_file(images[2]) == expected[2]
    assert encoded_file(images[0]) != expected[0]
    images[2].SOPInstanceUID = "1.2.3.4"  # save_as mends the file meta to match: so does encoded_file
    assert encoded_file(images[2]) == _encoded(images[2])
    if japanese:
        assert str(pydicom.dcmread(io.BytesIO(encoded_file(images[0]))).PatientName) == JAPANESE[1]


def test_images_of_a_series_share_no_state(tmp_path: Path) -> None:
    """Changing what the images of a series have in common, in one image, leaves the others as they were."""
    series = _series(tmp_path, "sagittal", "classic")
    images = build_derived_series(series, _values(series), "T2", PROVENANCE, series_number=312)
    before = _encoded(images[1])
    flag_result(images[0], REASONS)
    images[0].RealWorldValueMappingSequence[0].LUTLabel = "CHANGED"
    images[0].DerivationCodeSequence[0].CodeMeaning = "CHANGED"
    images[0].file_meta.ImplementationVersionName = "CHANGED"
    assert _encoded(images[1]) == before
    assert str(images[1].SeriesDescription).startswith("synthMRF T2 map")


# ---- writing many files: all or nothing -------------------------------------------------------------------


@pytest.fixture(scope="module")
def files_to_write(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], list[tuple[Path, Dataset]]]:
    series = _series(tmp_path_factory.mktemp("write"), "sagittal", "classic")
    images = build_derived_series(series, _values(series), "T2", PROVENANCE, series_number=312)[:6]
    return lambda folder: [(folder / f"T2_mr_{int(im.InstanceNumber):04d}.dcm", im) for im in images]


def test_write_datasets_writes_every_file_and_nothing_else(files_to_write: Callable[[Path], list[tuple[Path, Dataset]]],
                                                           tmp_path: Path) -> None:
    files = files_to_write(tmp_path)
    assert writer_module.write_datasets(files) == [path for path, _ in files]
    assert sorted(tmp_path.iterdir()) == sorted(path for path, _ in files)  # no hidden file left
    for path, ds in files:
        assert path.read_bytes() == _encoded(ds)


@pytest.mark.parametrize("stage", ["flush", "rename"])
def test_write_datasets_failing_late_leaves_nothing(files_to_write: Callable[[Path], list[tuple[Path, Dataset]]],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    stage: str) -> None:
    """A failure after every file was written (flushing one, or renaming the fourth) removes them all."""
    calls: list[Path] = []
    real_fsync, real_replace = writer_module._fsync, os.replace

    def failing_fsync(path: Path) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("I/O error (simulated)")
        real_fsync(path)

    def failing_replace(source: str | Path, target: str | Path) -> None:
        if str(source).endswith(".staged"):
            calls.append(Path(target))
            if len(calls) == 4:
                raise OSError("I/O error (simulated)")
        real_replace(source, target)

    if stage == "flush":
        monkeypatch.setattr(writer_module, "_fsync", failing_fsync)
    else:
        monkeypatch.setattr(os, "replace", failing_replace)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match=r"I/O error \(simulated\)"):
        writer_module.write_datasets(files_to_write(tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []
