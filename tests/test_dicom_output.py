"""DICOM results (Parametric Maps and derived MR series): dciodvfy, and read back with pydicom alone.

Sources are small phantom series (40 columns x 48 rows x 42 slices, non-square so that a transposed
frame shows) in four orientations, classic and Legacy Converted Enhanced. The maps are ramps with a
bright 3x3x3 cube around a known patient point; where it lands is checked against the phantom's own
grid, never against ``pipeline.dicom_series``.
"""

from __future__ import annotations

import copy
import logging
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, ParametricMapStorage

from pipeline.contrasts import DEFAULT_CONTRASTS, synthesise
from pipeline.dicom_output import (
    QUANTITIES,
    Provenance,
    build_derived_series,
    build_parametric_map,
    read_source_headers,
    write_result_series,
)
from pipeline.dicom_output import writer as writer_module
from pipeline.dicom_output.quantities import map_frames
from pipeline.dicom_output.source import PATIENT_STUDY_TYPE2
from pipeline.dicom_series import DicomSeries, read_series
from training.phantom.dicom_series import DicomStyle, SeriesIdentity, Vendor, make_identity, write_mprage_series
from training.phantom.geometry import Orientation, VolumeGrid, acquisition_grid
from training.phantom.mprage import MprageProtocol

MATRIX = (40, 48, 42)  # columns, rows, slices
CENTRE_RAS = np.array([10.0, -20.0, 30.0])
TARGET_LPS = np.array([-24.0, 29.0, 37.0])  # 14, 9 and 7 mm off the slab centre (LPS -10, 20, 30)
BACKGROUND = {"T1": 800.0, "T2": 60.0, "PD": 0.5}
RAMP = {"T1": (3.1, 5.3, 7.7), "T2": (0.31, 0.53, 0.77), "PD": (0.0021, 0.0033, 0.0047)}  # per i, j, k step
CUBE = {"T1": 2500.4, "T2": 250.37, "PD": 1.1937}
THRESHOLD = {"T1": 2000.0, "T2": 200.0, "PD": 1.0}
UNITS = {"T1": ("ms", "UCUM"), "T2": ("ms", "UCUM"), "PD": ("[arb'U]", "UCUM")}
CONCEPTS = {"T1": "113063", "T2": "113065", "PD": "113058"}
WINDOWS = {"T1": (1000.0, 2000.0), "T2": (60.0, 120.0), "PD": (0.5, 1.0)}
PROVENANCE = Provenance("synthmrf-unet", "1.2.0", "0123456789abcdef" * 4, "0.1.0")
CASES = ["sagittal-classic", "axial-classic", "coronal-classic", "oblique-classic", "oblique-enhanced"]
DCIODVFY_CASES = ["sagittal-classic", "oblique-enhanced"]


@dataclass
class Written:
    """One source series, the maps written for it and what came back."""

    series: DicomSeries
    truth: VolumeGrid  # the phantom grid that wrote the source
    identity: SeriesIdentity
    source_files: list[Path]
    maps: dict[str, np.ndarray]
    cube_ijk: np.ndarray
    paths: list[Path]
    outputs: dict[tuple[str, str], list[Dataset]] = field(default_factory=dict)  # (sop kind, quantity)


def _maps(truth: VolumeGrid) -> tuple[dict[str, np.ndarray], np.ndarray]:
    ijk = np.rint(np.linalg.solve(truth.lps_affine, np.append(TARGET_LPS, 1.0))[:3]).astype(int)
    assert np.all(ijk >= 2) and np.all(ijk < np.asarray(truth.shape) - 2), "target outside the test grid"
    i, j, k = np.meshgrid(*(np.arange(n) for n in truth.shape), indexing="ij")
    maps = {}
    for q in QUANTITIES:
        a, b, c = RAMP[q]
        volume = (BACKGROUND[q] + a * i + b * j + c * k).astype(np.float32)
        volume[ijk[0] - 1:ijk[0] + 2, ijk[1] - 1:ijk[1] + 2, ijk[2] - 1:ijk[2] + 2] = CUBE[q]
        maps[q] = volume
    return maps, ijk


def _quantity(ds: Dataset) -> str:
    if ds.SOPClassUID == ParametricMapStorage:
        return str(ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].LUTLabel)
    return str(ds.RealWorldValueMappingSequence[0].LUTLabel)


def _make(root: Path, case: str) -> Written:
    orientation, style = case.split("-")
    truth = acquisition_grid(Orientation(orientation), matrix=MATRIX, pixel_mm=2.5, slice_mm=2.4,
                             centre_mm=CENTRE_RAS)
    rng = np.random.default_rng(7)
    identity = make_identity("sub-007", f"dicom-output-test/{case}", rng)
    image = rng.integers(0, 4000, truth.shape).astype(np.uint16)
    source_files = write_mprage_series(image, truth, root / "source", protocol=MprageProtocol(), identity=identity,
                                       vendor=Vendor.SIEMENS, style=DicomStyle(style))
    series = read_series(root / "source")
    assert series.grid.shape == truth.shape
    maps, ijk = _maps(truth)
    paths = write_result_series(series, maps, root / "out", PROVENANCE, quantities=("T1", "T2", "PD"))
    written = Written(series, truth, identity, source_files, maps, ijk, paths)
    for path in paths:
        ds = pydicom.dcmread(path)
        kind = "map" if ds.SOPClassUID == ParametricMapStorage else "mr"
        written.outputs.setdefault((kind, _quantity(ds)), []).append(ds)
    for datasets in written.outputs.values():
        datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    return written


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Written]]:
    """Each case written once per module, when a test first asks for it."""
    cache: dict[str, Written] = {}

    def get(case: str) -> Written:
        if case not in cache:
            cache[case] = _make(tmp_path_factory.mktemp(case), case)
        return cache[case]

    yield get


@pytest.fixture(scope="module")
def classic(results: Callable[[str], Written]) -> Written:
    return results("sagittal-classic")


# ---- reading the results back with pydicom alone ------------------------------------------------------


@dataclass(frozen=True)
class Plane:
    position: np.ndarray  # ImagePositionPatient
    orientation: np.ndarray  # ImageOrientationPatient
    spacing: np.ndarray  # PixelSpacing (between rows, between columns)
    values: np.ndarray  # (rows, columns), real-world values
    source: tuple[str, int | None]  # referenced source SOP Instance UID, frame number


def _reference(item: Dataset) -> tuple[str, int | None]:
    frame = item.get("ReferencedFrameNumber")
    return str(item.ReferencedSOPInstanceUID), None if frame is None else int(frame)


def _planes(datasets: list[Dataset]) -> list[Plane]:
    planes = []
    for ds in datasets:
        if ds.SOPClassUID == ParametricMapStorage:
            shared = ds.SharedFunctionalGroupsSequence[0]
            mapping = shared.RealWorldValueMappingSequence[0]
            values = ds.pixel_array * float(mapping.RealWorldValueSlope) + float(mapping.RealWorldValueIntercept)
            orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
            spacing = np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float)
            for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
                source = frame.DerivationImageSequence[0].SourceImageSequence[0]
                planes.append(Plane(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float),
                                    orientation, spacing, values[n], _reference(source)))
        else:
            values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            planes.append(Plane(np.asarray(ds.ImagePositionPatient, float),
                                np.asarray(ds.ImageOrientationPatient, float), np.asarray(ds.PixelSpacing, float),
                                values, _reference(ds.SourceImageSequence[0])))
    return planes


def _patient_points(plane: Plane, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """LPS mm of pixels (row, column) of ``plane``: DICOM PS3.3 C.7.6.2.1.1."""
    row_dir, col_dir = plane.orientation[:3], plane.orientation[3:]
    return (plane.position + np.outer(columns * plane.spacing[1], row_dir)
            + np.outer(rows * plane.spacing[0], col_dir))


def _source_positions(written: Written) -> dict[tuple[str, int | None], np.ndarray]:
    out: dict[tuple[str, int | None], np.ndarray] = {}
    for path in written.source_files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:
            for n, frame in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
                out[(str(ds.SOPInstanceUID), n)] = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient,
                                                              float)
        else:
            out[(str(ds.SOPInstanceUID), None)] = np.asarray(ds.ImagePositionPatient, float)
    return out


def _truth_positions(truth: VolumeGrid) -> np.ndarray:
    k = np.arange(truth.shape[2])
    return (truth.lps_affine @ np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)]))[:3].T


def _truth_orientation(truth: VolumeGrid) -> np.ndarray:
    a, s = truth.lps_affine, truth.spacing_mm
    return np.concatenate([a[:3, 0] / s[0], a[:3, 1] / s[1]])


def _slice_index(truth: VolumeGrid, position: np.ndarray) -> int:
    """The phantom slice k whose position is ``position`` (asserted to be one within 1e-3 mm)."""
    distances = np.linalg.norm(_truth_positions(truth) - position, axis=1)
    k = int(np.argmin(distances))
    assert distances[k] < 1e-3, f"plane at {position} is not on a source slice (nearest {distances[k]:.4f} mm)"
    return k


# ---- validity -------------------------------------------------------------------------------------------


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy is not installed (Debian: dicom3tools); the test needs it"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr).splitlines()


@pytest.mark.parametrize("case", DCIODVFY_CASES)
def test_dciodvfy_reports_no_errors(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    assert len(written.paths) == 3 * (1 + MATRIX[2])
    for path in written.paths:
        lines = _dciodvfy(path)
        iod = "ParametricMap" if path.name.endswith("_map.dcm") else "MRImage"
        assert iod in lines, f"{path.name}: dciodvfy did not verify it as {iod}: {lines[:3]}"
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


# ---- geometry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["map", "mr"])
def test_cube_lands_at_its_patient_coordinates(results: Callable[[str], Written], case: str, kind: str) -> None:
    written = results(case)
    expected = (written.truth.lps_affine @ np.append(written.cube_ijk, 1.0))[:3]
    for q in QUANTITIES:
        points = []
        for plane in _planes(written.outputs[(kind, q)]):
            rows, columns = np.nonzero(plane.values > THRESHOLD[q])
            points.append(_patient_points(plane, rows, columns))
        found = np.concatenate(points)
        assert len(found) == 27, f"{kind} {q}: {len(found)} cube voxels, expected 27"
        assert np.linalg.norm(found.mean(axis=0) - expected) < 1.0, f"{kind} {q}: cube at {found.mean(axis=0)}"
        assert np.linalg.norm(expected - TARGET_LPS) < 2.5  # the nearest voxel centre to the target


@pytest.mark.parametrize("case", CASES)
def test_frame_order_and_direction_cosines(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    truth_positions = _truth_positions(written.truth)
    orientation = _truth_orientation(written.truth)
    normal = np.cross(orientation[:3], orientation[3:])
    sources = _source_positions(written)
    for q in QUANTITIES:
        derived = _planes(written.outputs[("mr", q)])
        assert len(derived) == MATRIX[2]
        for k, plane in enumerate(derived):  # instance k + 1 is source slice k
            np.testing.assert_allclose(plane.position, truth_positions[k], atol=1e-3)
            np.testing.assert_allclose(plane.orientation, _truth_orientation(written.truth), atol=1e-5)
            np.testing.assert_allclose(plane.spacing, [2.5, 2.5], atol=1e-6)
            np.testing.assert_allclose(sources[plane.source], plane.position, atol=1e-3)
        (pm,) = written.outputs[("map", q)]
        assert int(pm.NumberOfFrames) == MATRIX[2] and (pm.Rows, pm.Columns) == (MATRIX[1], MATRIX[0])
        planes = _planes([pm])
        steps = np.diff([p.position @ normal for p in planes])
        assert np.allclose(np.abs(steps), 2.4, atol=1e-3) and (np.all(steps > 0) or np.all(steps < 0))
        for plane in planes:
            np.testing.assert_allclose(plane.orientation, _truth_orientation(written.truth), atol=1e-5)
            np.testing.assert_allclose(sources[plane.source], plane.position, atol=1e-3)


# ---- values, identity, references -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["sagittal-classic", "oblique-enhanced"])
def test_values_come_back_through_rwvm_and_rescale(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    for q, spec in QUANTITIES.items():
        # the map stores float32 as it is; the derived series quantises to its rescale slope
        for kind, tolerance in (("map", 0.0), ("mr", spec.derived_slope / 2 + 1e-9)):
            for plane in _planes(written.outputs[(kind, q)]):
                k = _slice_index(written.truth, plane.position)
                expected = written.maps[q][:, :, k].T.astype(np.float64)  # rows = j, columns = i
                assert plane.values.shape == expected.shape
                np.testing.assert_allclose(plane.values, expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("case", ["sagittal-classic", "oblique-enhanced"])
def test_identity_references_and_description(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    source = written.series.header
    series_uids = set()
    numbers = set()
    for (kind, q), datasets in written.outputs.items():
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        series_uids.add(datasets[0].SeriesInstanceUID)
        numbers.add(int(datasets[0].SeriesNumber))
        for ds in datasets:
            assert ds.SOPClassUID == (ParametricMapStorage if kind == "map" else MRImageStorage)
            assert ds.PatientID == written.identity.patient_id
            assert str(ds.PatientName) == written.identity.patient_name
            assert ds.StudyInstanceUID == written.identity.study_uid
            assert ds.FrameOfReferenceUID == written.identity.frame_of_reference_uid
            assert ds.AccessionNumber == source.AccessionNumber
            assert [r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence] == [written.identity.series_uid]
            assert list(ds.SoftwareVersions) == ["synthmrf 0.1.0", "synthmrf-unet 1.2.0",
                                                 "MRF sequence 0123456789abcdef"]
            assert PROVENANCE.sequence_hash in ds.DerivationDescription
            unit = "ms" if q != "PD" else "a.u."
            assert ds.SeriesDescription.startswith(f"synthMRF {q} map [{unit}]")
            mapping = (ds.SharedFunctionalGroupsSequence[0] if kind == "map" else ds).RealWorldValueMappingSequence[0]
            units = mapping.MeasurementUnitsCodeSequence[0]
            assert (units.CodeValue, units.CodingSchemeDesignator) == UNITS[q]
            concept = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
            assert (concept.CodeValue, concept.CodingSchemeDesignator) == (CONCEPTS[q], "DCM")
        first = datasets[0]
        if kind == "map":
            assert first.ContentDescription == f"synthMRF {q} map; model synthmrf-unet 1.2.0"
            voi = first.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
            assert (float(voi.WindowCenter), float(voi.WindowWidth)) == WINDOWS[q]
            assert len(first.SourceImageSequence) == len(written.source_files)
        else:
            assert list(first.ImageType) == ["DERIVED", "SECONDARY", QUANTITIES[q].mr_image_type]
            assert (float(first.WindowCenter), float(first.WindowWidth)) == WINDOWS[q]
            assert float(first.RescaleSlope) == QUANTITIES[q].derived_slope
    assert len(series_uids) == 6 and written.identity.series_uid not in series_uids
    assert numbers == {301, 302, 303, 311, 312, 313}


def test_file_names_are_deterministic(classic: Written) -> None:
    names = [p.name for p in classic.paths]
    assert names[:4] == ["T1_map.dcm", "T2_map.dcm", "PD_map.dcm", "T1_mr_0001.dcm"]  # the maps go first
    assert "PD_mr_0042.dcm" in names
    assert len(set(names)) == len(names) == 3 * (1 + MATRIX[2])


def test_writing_again_replaces_the_files(classic: Written, tmp_path: Path) -> None:
    first = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False)
    uid = pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID
    second = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False)
    assert first == second == [tmp_path / "T1_map.dcm", tmp_path / "T2_map.dcm"]
    assert sorted(tmp_path.iterdir()) == sorted(second)
    assert pydicom.dcmread(second[0], stop_before_pixels=True).SeriesInstanceUID != uid


def test_every_created_uid_is_under_the_configured_root(classic: Written, tmp_path: Path) -> None:
    root = "1.2.826.0.1.3680043.10.999"
    paths = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, quantities=("T1",),
                                uid_root=root)
    created = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        created |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)}
        assert ds.StudyInstanceUID == classic.identity.study_uid  # the source's, not ours
    assert len(created) == len(paths) + 2  # one SOP per file, two new series (map and derived)
    assert all(u.startswith(root + ".") and len(u) <= 64 for u in created)
    with pytest.raises(ValueError, match="uid_root: expected an organisational root"):
        write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, uid_root="1.02.x")


def test_a_failed_write_leaves_nothing_behind(classic: Written, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = writer_module.write_dataset_atomic
    written: list[Path] = []

    def fail_on_sixth(ds: Dataset, path: Path) -> None:
        if len(written) == 5:
            raise OSError("disk full (simulated)")
        real(ds, path)
        written.append(path)

    monkeypatch.setattr(writer_module, "write_dataset_atomic", fail_on_sixth)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"disk full \(simulated\)"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE)
    assert len(written) == 5 and list(out.iterdir()) == []


def test_a_failed_build_after_a_staged_series_leaves_nothing_behind(classic: Written, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Series are written (hidden) as they are built: one failing later removes those already written."""
    real = writer_module.build_derived_series
    calls: list[str] = []

    def fail_on_second(*args: object, **kwargs: object) -> object:
        calls.append("build")
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(writer_module, "build_derived_series", fail_on_second)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"out of memory \(simulated\)"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE)
    assert len(calls) == 2 and list(out.iterdir()) == []


def test_atomic_write_removes_its_temporary_file(classic: Written, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ds = classic.outputs[("mr", "T1")][0]

    def broken_save(fh: object, **kwargs: object) -> None:
        fh.write(b"half a file")  # type: ignore[attr-defined]
        raise RuntimeError("encoder crashed (simulated)")

    monkeypatch.setattr(ds, "save_as", broken_save)
    with pytest.raises(RuntimeError, match=r"encoder crashed"):
        writer_module.write_dataset_atomic(ds, tmp_path / "x.dcm")
    assert list(tmp_path.iterdir()) == []


def test_derived_values_outside_the_range_are_clipped(classic: Written) -> None:
    values = np.full(classic.series.grid.shape, 100.0, np.float32)
    values[0, 0, 0], values[1, 0, 0] = 7000.0, -5.0
    first = build_derived_series(classic.series, values, "T2", PROVENANCE, series_number=12)[0]
    back = first.pixel_array * float(first.RescaleSlope)
    assert back[0, 0] == pytest.approx(6553.5) and back[0, 1] == 0.0 and back[1, 0] == pytest.approx(100.0)


def test_source_without_slice_thickness_or_series_number(classic: Written, tmp_path: Path) -> None:
    """Both are Type 2 (may be empty or, in the wild, absent): maps are still written, numbered 9000 + k."""
    for path in classic.source_files:
        ds = pydicom.dcmread(path)
        del ds.SliceThickness, ds.SeriesNumber
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    series = read_series(tmp_path)
    (path,) = write_result_series(series, classic.maps, tmp_path / "out", PROVENANCE, derived=False, quantities=("T2",))
    pm = pydicom.dcmread(path, stop_before_pixels=True)
    assert int(pm.SeriesNumber) == 9002
    assert not [line for line in _dciodvfy(path) if line.startswith("Error")]


def test_no_patient_name_reaches_warnings_or_logs(classic: Written, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """highdicom warns about single-component names with the name in the text; none may escape."""
    for path in classic.source_files:
        ds = pydicom.dcmread(path)
        ds.PatientName = "SECRETNAME"
        ds.save_as(tmp_path / path.name, enforce_file_format=True)
    series = read_series(tmp_path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        write_result_series(series, classic.maps, tmp_path / "out", PROVENANCE, quantities=("T1",))
    assert not [w for w in caught if "SECRETNAME" in str(w.message)]
    assert "SECRETNAME" not in caplog.text


# ---- sources as scanners send them (each a phantom series edited as one scanner or PACS writes it) -------


def _edited_results(written: Written, tmp_path: Path, edit: Callable[[Dataset], None], *,
                    derived: bool = True) -> tuple[Dataset, Dataset | None]:
    """``written``'s source with ``edit`` on every file, its T1 results written: (map, first MR image).

    Both are asserted free of dciodvfy errors.
    """
    source = tmp_path / "source"
    source.mkdir()
    for path in written.source_files:
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(source / path.name, enforce_file_format=True)
    paths = write_result_series(read_series(source), written.maps, tmp_path / "out", PROVENANCE, derived=derived,
                                quantities=("T1",))
    for path in paths[:2]:
        assert not [line for line in _dciodvfy(path) if line.startswith("Error")], path.name
    return pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1]) if derived else None


@pytest.mark.parametrize("sequence", ["PlaneOrientationSequence", "PixelMeasuresSequence"])
def test_enhanced_source_with_per_frame_geometry(results: Callable[[str], Written], tmp_path: Path,
                                                 sequence: str) -> None:
    """Philips-style Enhanced MR: orientation or pixel measures in every frame's group, none shared."""
    written = results("oblique-enhanced")

    def per_frame(ds: Dataset) -> None:
        shared = ds.SharedFunctionalGroupsSequence[0]
        item = shared[sequence].value[0]
        if sequence == "PixelMeasuresSequence":
            item.SliceThickness = "2.2"
        for frame in ds.PerFrameFunctionalGroupsSequence:
            setattr(frame, sequence, [copy.deepcopy(item)])
        delattr(shared, sequence)

    pm, _ = _edited_results(written, tmp_path, per_frame, derived=False)
    shared = pm.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               _truth_orientation(written.truth), atol=1e-5)
    measures = shared.PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [2.5, 2.5]
    assert float(measures.SliceThickness) == (2.2 if sequence == "PixelMeasuresSequence" else 2.4)


@pytest.mark.parametrize(("charset", "name"), [(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
                                               (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동")],
                         ids=["japanese", "korean"])
def test_character_set_with_empty_first_value(classic: Written, tmp_path: Path, charset: list[str],
                                              name: str) -> None:
    """Japanese and Korean scanners write the default repertoire as an empty first value."""
    def japanese_or_korean(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        ds.PatientName = name

    for ds in _edited_results(classic, tmp_path, japanese_or_korean):
        assert ds is not None
        assert list(ds.SpecificCharacterSet) == ["ISO 2022 IR 6", charset[1]]
        assert str(ds.PatientName) == name


def test_absent_type2_patient_and_study_attributes_are_written_empty(classic: Written, tmp_path: Path) -> None:
    """Type 2 attributes left out altogether (not empty), as some archives store them."""
    def strip(ds: Dataset) -> None:
        for keyword in PATIENT_STUDY_TYPE2:
            delattr(ds, keyword)

    for ds in _edited_results(classic, tmp_path, strip):
        assert ds is not None
        for keyword in PATIENT_STUDY_TYPE2:
            assert keyword in ds and ds[keyword].value in (None, ""), keyword


def test_map_pixel_measures_are_the_grids_not_the_sources(classic: Written, tmp_path: Path) -> None:
    """A negative SpacingBetweenSlices (a known scanner habit) must not reach the map; the thickness does."""
    def signed_spacing(ds: Dataset) -> None:
        ds.SpacingBetweenSlices = "-2.4"
        ds.SliceThickness = "1.0"

    pm, _ = _edited_results(classic, tmp_path, signed_spacing, derived=False)
    measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.4)
    assert float(measures.SliceThickness) == 1.0
    assert [float(v) for v in measures.PixelSpacing] == [2.5, 2.5]


def test_orientation_within_tolerance_is_written_as_the_grids(classic: Written, tmp_path: Path) -> None:
    """read_series allows direction cosines 1e-3 apart; highdicom wants them equal: the map gets the grid's."""
    def jitter(ds: Dataset) -> None:
        if int(ds.InstanceNumber) % 2:
            orientation = [float(v) for v in ds.ImageOrientationPatient]
            orientation[1] += 1e-5
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]

    pm, _ = _edited_results(classic, tmp_path, jitter, derived=False)
    orientation = pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    np.testing.assert_allclose(np.asarray(orientation, float), _truth_orientation(classic.truth), atol=1e-5)


def test_lossy_compression_of_the_source_is_kept(classic: Written, tmp_path: Path) -> None:
    """A map of a lossy compressed source stays marked lossy, with ratio and method (PS3.3 C.7.6.1.1.5)."""
    def lossy(ds: Dataset) -> None:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.LossyImageCompressionMethod = "ISO_10918_1"

    for ds in _edited_results(classic, tmp_path, lossy):
        assert ds is not None
        assert (ds.LossyImageCompression, ds.LossyImageCompressionRatio, ds.LossyImageCompressionMethod) == (
            "01", 10.0, "ISO_10918_1")


def test_retired_other_patient_ids_are_kept(classic: Written, tmp_path: Path) -> None:
    """Other Patient IDs (0010,1000) is retired, but archives still match patients on it."""
    def other_ids(ds: Dataset) -> None:
        ds.OtherPatientIDs = ["X123", "Y456"]

    for ds in _edited_results(classic, tmp_path, other_ids):
        assert ds is not None
        assert list(ds.OtherPatientIDs) == ["X123", "Y456"]


def test_source_without_body_part_gets_no_laterality(classic: Written, tmp_path: Path) -> None:
    """Laterality is for paired body parts: absent, with the body part (a head) saying why."""
    def no_body_part(ds: Dataset) -> None:
        del ds.BodyPartExamined

    pm, mr = _edited_results(classic, tmp_path, no_body_part)
    for ds in (pm, mr):
        assert ds is not None
        assert "Laterality" not in ds and ds.BodyPartExamined == "HEAD"
    for path in (tmp_path / "out" / "T1_map.dcm", tmp_path / "out" / "T1_mr_0001.dcm"):
        assert not [line for line in _dciodvfy(path) if "Laterality" in line]


# ---- constructor validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", [build_parametric_map, build_derived_series])
def test_constructors_reject_bad_maps(classic: Written, build: Callable[..., object]) -> None:
    series, good = classic.series, classic.maps["T1"]
    with pytest.raises(ValueError, match=r"values: expected shape \(40, 48, 42\) \(columns, rows, frames"):
        build(series, good.transpose(1, 0, 2), "T1", PROVENANCE, series_number=301)
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(ValueError, match=r"values: 1 voxels are NaN or infinite"):
        build(series, nan, "T1", PROVENANCE, series_number=301)
    with pytest.raises(ValueError, match=r"quantity: unknown quantity 'T3'; expected one of \['PD', 'T1', 'T2'\]"):
        build(series, good, "T3", PROVENANCE, series_number=301)
    with pytest.raises(TypeError, match=r"values: expected a numpy array, got list"):
        build(series, good.tolist(), "T1", PROVENANCE, series_number=301)
    with pytest.raises(ValueError, match=r"series_number: 3 is the source series' own number"):
        build(series, good, "T1", PROVENANCE, series_number=3)
    with pytest.raises(TypeError, match=r"provenance: expected Provenance, got dict"):
        build(series, good, "T1", {"model_name": "x"}, series_number=301)


def test_parametric_map_rejects_foreign_source_images(classic: Written, results: Callable[[str], Written]) -> None:
    other = read_source_headers(results("axial-classic").series)
    with pytest.raises(ValueError, match=r"source_images: expected the 42 instances of series"):
        build_parametric_map(classic.series, classic.maps["T1"], "T1", PROVENANCE, series_number=301,
                             source_images=other)


def test_write_result_series_rejects_bad_arguments_before_writing(classic: Written, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"maps: no volume for \['PD'\]"):
        write_result_series(classic.series, {"T1": classic.maps["T1"]}, out, PROVENANCE, quantities=("T1", "PD"))
    with pytest.raises(ValueError, match=r"quantities: unknown quantity 'R2'"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, quantities=("T1", "R2"))
    with pytest.raises(ValueError, match=r"quantities: duplicates"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, quantities=("T1", "T1"))
    bad = dict(classic.maps, T2=np.full(classic.series.grid.shape, np.inf, np.float32))
    with pytest.raises(ValueError, match=r"maps\['T2'\]: 80640 voxels are NaN or infinite"):
        write_result_series(classic.series, bad, out, PROVENANCE)
    assert not out.exists()


def test_provenance_is_validated() -> None:
    with pytest.raises(ValueError, match=r"sequence_hash: expected 16 to 64 lower-case hex digits, got 'XYZ'"):
        Provenance("m", "1", "XYZ", "0.1.0")
    with pytest.raises(ValueError, match=r"model_name, model_version: .* at most 40 fit"):
        Provenance("m" * 39, "1.0", "0123456789abcdef", "0.1.0")
    with pytest.raises(ValueError, match=r"model_version: must be non-empty printable ASCII"):
        Provenance("m", "1\\2", "0123456789abcdef", "0.1.0")
    with pytest.raises(TypeError, match=r"software_version: expected str, got int"):
        Provenance("m", "1", "0123456789abcdef", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"reading_note: at most 400 characters"):
        Provenance("m", "1", "0123456789abcdef", "0.1.0", "x" * 401)
    with pytest.raises(ValueError, match=r"reading_note: .* printable ASCII"):
        Provenance("m", "1", "0123456789abcdef", "0.1.0", "line one\nline two")


def test_a_reading_note_ends_every_maps_derivation() -> None:
    note = "White-matter T1 is a prior."
    noted = Provenance("m", "1", "0123456789abcdef" * 4, "0.1.0", note)
    assert noted.derivation_description("T1").endswith(f"; how to read it: {note}")
    assert PROVENANCE.derivation_description("T1").endswith(f"synthmrf {PROVENANCE.software_version}")
    assert noted.contrast_derivation(DEFAULT_CONTRASTS[0]).endswith(f"; how to read it: {note}")
    longest = Provenance("m" * 19, "1" * 20, "0123456789abcdef" * 4, "9" * 55, "x" * 400)
    texts = [longest.derivation_description("T1"), *(longest.contrast_derivation(c) for c in DEFAULT_CONTRASTS)]
    assert max(len(t) for t in texts) <= 1024 - 120  # ST, with room for a flag's note


# ---- out-of-range flag and the quality series -------------------------------------------------------------

REASONS = ["protocol: MagneticFieldStrength 1.5 T (trained on 3 T)",
           "median match quality 0.42 in the brain (expected >= 0.95)"]


def _quality(written: Written) -> np.ndarray:
    """A Q map in [0, 1]: the T1 ramp scaled, the cube at 0.834 (stored per mille)."""
    return np.clip(written.maps["T1"] / 3000.0, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def flagged(classic: Written, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The classic source's T1 results and a quality series, flagged with REASONS."""
    return write_result_series(classic.series, classic.maps, tmp_path_factory.mktemp("flagged"), PROVENANCE,
                               quantities=("T1",), quality=_quality(classic), warnings=REASONS)


def test_flagged_results_say_so_in_every_instance(flagged: list[Path]) -> None:
    assert [p.name for p in flagged].count("T1_map.dcm") == 1 and len(flagged) == 1 + 2 * MATRIX[2]
    for path in flagged:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SeriesDescription.startswith("OUT OF RANGE: synthMRF ") and len(ds.SeriesDescription) <= 64
        assert ds.ImageComments.endswith("FLAGGED: input or result outside the model's validated range, interpret "
                                         "with caution: " + "; ".join(REASONS)), path.name
        assert "FLAGGED" in ds.DerivationDescription and PROVENANCE.sequence_hash in ds.DerivationDescription
    for path in (flagged[0], flagged[1], flagged[-1]):
        lines = _dciodvfy(path)
        assert not [line for line in lines if line.startswith("Error")], path.name


def test_unflagged_results_carry_no_flag(classic: Written) -> None:
    for datasets in classic.outputs.values():
        for ds in datasets:
            assert ds.SeriesDescription.startswith("synthMRF ")
            assert "ImageComments" not in ds and "FLAGGED" not in ds.DerivationDescription


def test_quality_series_values_and_identity(classic: Written, flagged: list[Path]) -> None:
    quality = _quality(classic)
    images: list[Dataset] = sorted((pydicom.dcmread(p) for p in flagged if p.name.startswith("Q_mr_")),
                    key=lambda ds: int(ds.InstanceNumber))
    assert len(images) == MATRIX[2] and len({ds.SeriesInstanceUID for ds in images}) == 1
    first = images[0]
    assert int(first.SeriesNumber) == 314 and list(first.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    assert first.SeriesDescription == "OUT OF RANGE: synthMRF Q map [0-1] (MR image)"
    assert first.ImageComments.startswith("Q: how well the synthesised MRF signal fits the dictionary")
    mapping = first.RealWorldValueMappingSequence[0]
    units = mapping.MeasurementUnitsCodeSequence[0]
    assert (units.CodeValue, units.CodingSchemeDesignator) == ("1", "UCUM")
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "MATCHQ"
    for plane in _planes(images):
        k = _slice_index(classic.truth, plane.position)
        np.testing.assert_allclose(plane.values, quality[:, :, k].T, rtol=0, atol=5e-4 + 1e-9)
    assert [line for line in _dciodvfy(flagged[-1]) if line.startswith("Error")] == []


def test_quality_a_rounding_error_outside_0_to_1_is_accepted(classic: Written, tmp_path: Path) -> None:
    """A resampled map can leave [0, 1] by float rounding: stored as 0 and 1000 all the same."""
    quality = np.full(classic.series.grid.shape, 1.0 + 1e-6, np.float32)
    quality[0] = -1e-6
    paths = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False,
                                quantities=("T1",), quality=quality)
    first = pydicom.dcmread(tmp_path / "Q_mr_0001.dcm")
    assert len(paths) == 1 + MATRIX[2] and int(first.pixel_array.min()) == 0 and int(first.pixel_array.max()) == 1000


def test_flag_text_is_printable_ascii_and_bounded(classic: Written, tmp_path: Path) -> None:
    (path,) = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False,
                                  quantities=("T2",), warnings=["T2 ≥ 3000 ms\tin 40 % of voxels", "x" * 2000])
    comment = pydicom.dcmread(path, stop_before_pixels=True).ImageComments
    assert "T2 ? 3000 ms?in 40 % of voxels; xxx" in comment and len(comment) == 1024 and comment.endswith("...")
    assert not [line for line in _dciodvfy(path) if line.startswith("Error")]


def test_flag_and_quality_arguments_are_checked_before_writing(classic: Written, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"warnings: expected a sequence of non-empty reasons, got 'too hot'"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, warnings="too hot")
    with pytest.raises(ValueError, match=r"warnings: expected a sequence of non-empty reasons"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, warnings=["ok", " "])
    with pytest.raises(ValueError, match=r"quality: values must be in \[0, 1\], got 0\.4\.\.1\.25"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, quality=_quality(classic) * 1.5)
    with pytest.raises(ValueError, match=r"quality: values must be in \[0, 1\], got -0\.0"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, quality=_quality(classic) - 0.3)
    with pytest.raises(ValueError, match=r"quality: expected shape \(40, 48, 42\)"):
        write_result_series(classic.series, classic.maps, out, PROVENANCE, quality=_quality(classic)[:-1])
    assert not out.exists()


def test_synthetic_contrasts_are_derived_series_marked_not_acquired(classic: Written, tmp_path: Path) -> None:
    maps = {q: np.clip(v, 1e-3, None) for q, v in classic.maps.items()}
    synthetic = [(c, synthesise(c, maps["T1"], maps["T2"], maps["PD"])) for c in DEFAULT_CONTRASTS]
    paths = write_result_series(classic.series, maps, tmp_path, PROVENANCE, quantities=("T1",), contrasts=synthetic)
    by_series: dict[str, list[Dataset]] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        by_series.setdefault(str(ds.SeriesDescription), []).append(ds)
    numbers = set()
    for contrast, values in synthetic:
        images = sorted(by_series[f"synthMRF synthetic {contrast.name}, not acquired"], key=lambda d: d.InstanceNumber)
        assert len(images) == MATRIX[2]
        first = images[0]
        assert "NOT ACQUIRED" in first.DerivationDescription and contrast.equation in first.DerivationDescription
        assert first.ImageComments.startswith("Synthetic image, not acquired")
        assert first.StudyInstanceUID == classic.series.study_instance_uid
        assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == classic.series.series_instance_uid
        numbers.add(int(first.SeriesNumber))
        stored = np.stack([im.pixel_array for im in images]) * float(first.RescaleSlope)
        expected = map_frames(values, classic.series.grid) * 1000  # signal x 1000
        np.testing.assert_allclose(stored, expected, atol=0.05 + 1e-4)
        lines = _dciodvfy(tmp_path / f"{contrast.name}_mr_0001.dcm")
        assert "MRImage" in lines and not [line for line in lines if line.startswith("Error")], lines
    assert len(numbers) == len(DEFAULT_CONTRASTS)  # one series number each
