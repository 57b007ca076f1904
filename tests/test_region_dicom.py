"""The regions as DICOM: the Segmentation and its TID 1500 SR report (dciodvfy; read back with highdicom and
pydicom).

Sources are small phantom series (24 columns x 28 rows x 40 slices), classic and Legacy Converted Enhanced.
The label volume has five regions (boxes, one of them sparse; left, right and unsided; labels with gaps, so
segment numbers differ from labels); the maps are ramps with seeded noise. The expected statistics are
computed here with numpy; the label volume is rebuilt from the SEG's frames placed by their own positions
on the phantom's grid, and the SR's values are checked against the maps over the voxels of those frames.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from pipeline.dicom_output import Provenance, build_region_report, build_segmentation, write_result_series
from pipeline.dicom_series import DicomSeries, read_series
from pipeline.regions import QuantityStats, RegionStats, report_regions
from pipeline.result_kinds import PARAMETRIC_MAPS, SEGMENTATION, SR, kind_of
from training.phantom.dicom_series import DicomStyle, Vendor, make_identity, write_mprage_series
from training.phantom.geometry import Orientation, VolumeGrid, acquisition_grid
from training.phantom.mprage import MprageProtocol

MATRIX = (24, 28, 40)  # columns, rows, slices (read_series wants 40 slices at least)
PIXEL_MM, SLICE_MM = 2.5, 2.4
VOXEL_ML = PIXEL_MM * PIXEL_MM * SLICE_MM / 1000.0
PROVENANCE = Provenance("synthmrf-unet", "1.2.0", "0123456789abcdef" * 4, "0.1.0")
CASES = ["sagittal-classic", "oblique-enhanced"]
# region name -> (i, j, k) box; "sparse" keeps a random 30 % of its box
BOXES = {
    "Hippocampus left": (slice(2, 8), slice(3, 10), slice(4, 14)),
    "Hippocampus right": (slice(12, 20), slice(3, 10), slice(6, 12)),
    "Cerebellar vermis": (slice(5, 15), slice(15, 24), slice(20, 33)),
    "Cerebral white matter left": (slice(16, 23), slice(18, 27), slice(25, 38)),
    "Thalamus left": (slice(2, 10), slice(18, 26), slice(34, 40)),
}
SPARSE = "Thalamus left"
RAMP = {"T1": (800.0, 3.1, 5.3, 7.7, 20.0), "T2": (60.0, 0.31, 0.53, 0.77, 3.0),  # base, per i, j, k, noise SD
        "PD": (0.5, 0.0021, 0.0033, 0.0047, 0.02)}
REASONS = ["protocol: MagneticFieldStrength 1.5 T (trained on 3 T)"]
REGIONS = {r.name: r for r in report_regions()}
FLAG_NOTE = "FLAGGED: input or result outside the model's validated range, interpret with caution"


@dataclass
class Written:
    """One source series, its labels, maps and statistics, and the region results written for it."""

    series: DicomSeries
    truth: VolumeGrid
    source_files: list[Path]
    labels: np.ndarray
    maps: dict[str, np.ndarray]
    stats: list[RegionStats]
    paths: list[Path]

    def path(self, name: str) -> Path:
        return next(p for p in self.paths if p.name == name)


def _labels(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    labels = np.zeros(shape, np.int16)
    for name, box in BOXES.items():
        region = np.ones(labels[box].shape, bool)
        if name == SPARSE:
            region = rng.random(region.shape) < 0.3
        assert not labels[box][region].any(), "boxes overlap"
        labels[box][region] = REGIONS[name].label
    return labels


def _maps(shape: tuple[int, int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return {q: (base + a * i + b * j + c * k + rng.normal(0.0, noise, shape)).astype(np.float32)
            for q, (base, a, b, c, noise) in RAMP.items()}


def _stats(labels: np.ndarray, maps: dict[str, np.ndarray]) -> list[RegionStats]:
    """The statistics of each region, by numpy over its voxels (float64)."""
    stats = []
    for name in BOXES:
        region = REGIONS[name]
        inside = labels == region.label
        values = {q: QuantityStats(float(np.mean(v[inside], dtype=np.float64)), float(np.std(v[inside].astype(float))),
                                   float(np.median(v[inside].astype(float)))) for q, v in maps.items()}
        stats.append(RegionStats(region, int(inside.sum()), float(inside.sum()) * VOXEL_ML, values))
    return stats


def _source(root: Path, case: str) -> tuple[DicomSeries, VolumeGrid, list[Path]]:
    orientation, style = case.split("-")
    truth = acquisition_grid(Orientation(orientation), matrix=MATRIX, pixel_mm=PIXEL_MM, slice_mm=SLICE_MM,
                             centre_mm=np.array([10.0, -20.0, 30.0]))
    rng = np.random.default_rng(11)
    identity = make_identity("sub-011", f"region-dicom-test/{case}", rng)
    image = rng.integers(0, 4000, truth.shape).astype(np.uint16)
    files = write_mprage_series(image, truth, root / "source", protocol=MprageProtocol(), identity=identity,
                                vendor=Vendor.SIEMENS, style=DicomStyle(style))
    return read_series(root / "source"), truth, files


def _make(root: Path, case: str) -> Written:
    series, truth, files = _source(root, case)
    rng = np.random.default_rng(5)
    labels = _labels(truth.shape, rng)
    maps = _maps(truth.shape, rng)
    stats = _stats(labels, maps)
    paths = write_result_series(series, maps, root / "out", PROVENANCE, derived=False, quantities=("T1", "T2", "PD"),
                                regions=(labels, stats))
    return Written(series, truth, files, labels, maps, stats, paths)


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


# ---- reading back --------------------------------------------------------------------------------------------


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy is not installed (Debian: dicom3tools); the test needs it"
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return (run.stdout + run.stderr).splitlines()


def _truth_positions(truth: VolumeGrid) -> np.ndarray:
    k = np.arange(truth.shape[2])
    return (truth.lps_affine @ np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)]))[:3].T


def _truth_orientation(truth: VolumeGrid) -> np.ndarray:
    a, s = truth.lps_affine, truth.spacing_mm
    return np.concatenate([a[:3, 0] / s[0], a[:3, 1] / s[1]])


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


def _segment_volume(written: Written, seg: Dataset) -> np.ndarray:
    """Segment numbers (i, j, k) on the phantom grid from the SEG's frames, each placed by its plane position,
    which must be the position of the source frame it references."""
    sources = _source_positions(written)
    truth_positions = _truth_positions(written.truth)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               _truth_orientation(written.truth), atol=1e-5)
    np.testing.assert_allclose(np.asarray(shared.PixelMeasuresSequence[0].PixelSpacing, float), [PIXEL_MM] * 2)
    pixels = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    volume = np.zeros(written.truth.shape, np.int16)
    slices: dict[int, list[int]] = {}  # segment -> slice of each of its frames, in frame order
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        number = source.get("ReferencedFrameNumber")
        key = (str(source.ReferencedSOPInstanceUID), None if number is None else int(number))
        np.testing.assert_allclose(position, sources[key], atol=1e-3)
        distances = np.linalg.norm(truth_positions - position, axis=1)
        k = int(np.argmin(distances))
        assert distances[k] < 1e-3, f"frame at {position} is not on a source slice"
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        on = frame.T > 0  # (rows, columns) -> (i, j)
        assert on.any(), "an empty frame was written"
        assert not volume[:, :, k][on].any(), f"segment {segment} overlaps another in slice {k}"
        volume[:, :, k][on] = segment
        slices.setdefault(segment, []).append(k)
    for segment, ks in slices.items():  # along the slice normal, one way or the other
        steps = np.diff(ks)
        assert np.all(steps > 0) or np.all(steps < 0), f"segment {segment}: frames of slices {ks}"
    return volume


def _seg_and_sr(written: Written) -> tuple[Dataset, hd.sr.Comprehensive3DSR, hd.sr.MeasurementReport]:
    """The SEG, the SR and its content, parsed as a TID 1500 report (highdicom)."""
    sr = hd.sr.srread(written.path("SR_regions.dcm"))
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and isinstance(sr.content, hd.sr.MeasurementReport)
    return hd.seg.segread(written.path("SEG_regions.dcm")), sr, sr.content


# ---- validity, identity, references --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_reports_no_errors(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    for name, iod in (("SEG_regions.dcm", "Segmentation"), ("SR_regions.dcm", "Comprehensive3DSR")):
        lines = _dciodvfy(written.path(name))
        assert iod in lines, f"{name}: dciodvfy did not verify it as {iod}: {lines[:3]}"
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{name}: {errors}"


@pytest.mark.parametrize("case", CASES)
def test_results_are_new_series_of_the_source_study(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    series = written.series
    assert [kind_of(p.name) for p in written.paths] == [PARAMETRIC_MAPS] * 3 + [SEGMENTATION, SR]
    seg, sr, _ = _seg_and_sr(written)
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    for ds in (seg, sr):
        assert ds.StudyInstanceUID == series.study_instance_uid
        assert ds.PatientID == series.header.PatientID and ds.Manufacturer == "synthmrf"
        assert ds.SeriesInstanceUID != series.series_instance_uid
        assert list(ds.SoftwareVersions)[1] == PROVENANCE.model_label
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert (int(seg.SeriesNumber), int(sr.SeriesNumber)) == (330, 331)
    assert seg.SeriesDescription == "synthMRF regions (AAL3 atlas)"
    assert seg.FrameOfReferenceUID == series.frame_of_reference_uid
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [series.series_instance_uid]
    assert PROVENANCE.sequence_hash in seg.DerivationDescription
    evidence = {uid for _, series_uid, uid, _ in sr.get_evidence() if series_uid == series.series_instance_uid}
    assert evidence == {f.sop_instance_uid for f in series.frames}
    assert (series.study_instance_uid, seg.SeriesInstanceUID, seg.SOPInstanceUID, SegmentationStorage) in \
        sr.get_evidence()


# ---- the Segmentation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_segments_give_back_the_label_volume(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    seg = hd.seg.segread(written.path("SEG_regions.dcm"))
    numbers = _segment_volume(written, seg)
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(segments) == list(range(1, len(BOXES) + 1))  # 1..n, whatever the labels (PS3.3 C.8.20.2.4)
    labels = np.zeros_like(numbers)
    for number, segment in segments.items():
        labels[numbers == number] = REGIONS[str(segment.SegmentLabel)].label
    np.testing.assert_array_equal(labels, written.labels)
    frames_with_voxels = sum(len(np.unique(np.nonzero(written.labels == REGIONS[n].label)[2])) for n in BOXES)
    assert int(seg.NumberOfFrames) == frames_with_voxels  # empty frames left out


def test_segment_descriptions(classic: Written) -> None:
    seg = hd.seg.segread(classic.path("SEG_regions.dcm"))
    for segment in seg.SegmentSequence:
        region = REGIONS[str(segment.SegmentLabel)]
        assert segment.TrackingID == region.name and segment.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("synthMRF regions AAL3", "1.2.0")
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == (region.structure.code.value,
                                                                 region.structure.code.scheme_designator)
        modifiers = [m.CodeValue for m in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([] if region.laterality is None else [region.laterality.value]), region.name
        assert segment.AnatomicRegionSequence[0].CodeValue == codes.SCT.Brain.value


# ---- the SR ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_report_values_are_the_maps_over_the_segments(results: Callable[[str], Written], case: str) -> None:
    written = results(case)
    seg, _, report = _seg_and_sr(written)
    numbers = _segment_volume(written, seg)
    segments = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(BOXES)
    for group in groups:
        reference = group.referenced_segment
        assert reference is not None
        item = reference[0]
        assert item.value == (SegmentationStorage, seg.SOPInstanceUID)
        (number,) = item.referenced_segment_numbers
        assert reference[1].value == written.series.series_instance_uid  # Source Series for Segmentation
        segment = segments[number]
        assert group.tracking_identifier == segment.SegmentLabel and group.tracking_uid == segment.TrackingUID
        region = REGIONS[str(segment.SegmentLabel)]
        (site,) = group.finding_sites
        assert site.value.value == region.structure.code.value
        assert (site.laterality.value if site.laterality else None) == (
            region.laterality.value if region.laterality else None)
        inside = numbers == number
        for q, concept, unit in (("T1", codes.DCM.T1, "ms"), ("T2", codes.DCM.T2, "ms"),
                                 ("PD", codes.DCM.ProtonDensity, "[arb'U]")):
            values = written.maps[q][inside].astype(np.float64)
            expected = {codes.SCT.Mean: values.mean(), codes.SCT.StandardDeviation: values.std(),
                        codes.SCT.Median: np.median(values)}
            measurements = group.get_measurements(name=concept)
            assert {m.derivation for m in measurements} == set(expected), f"{region.name} {q}"
            for m in measurements:
                assert m.unit.value == unit
                assert m.value == pytest.approx(expected[m.derivation], rel=1e-6), f"{region.name} {q} {m.derivation}"
        (volume,) = group.get_measurements(name=codes.SCT.Volume)
        assert volume.unit.value == "ml" and volume.value == pytest.approx(inside.sum() * VOXEL_ML, rel=1e-9)


def _texts(ds: Dataset, concept: str) -> list[str]:
    """TextValue of every TEXT item named ``concept`` (code value) anywhere in the content tree."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == concept:
            found.append(str(item.TextValue))
        found += _texts(item, concept)
    return found


def test_report_observer_procedure_and_algorithms(classic: Written) -> None:
    _, sr, _ = _seg_and_sr(classic)
    assert "synthmrf-unet 1.2.0" in _texts(sr, "121015")  # Device Observer Model Name
    procedure = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058")
    assert procedure.ConceptCodeSequence[0].CodeValue == codes.LN.BrainMRI.value
    names = _texts(sr, "111001")  # Algorithm Name: one per measurement (3 maps x 3 statistics, the volume)
    assert names.count("synthMRF") == 9 * len(BOXES) and names.count("synthMRF regions AAL3") == len(BOXES)
    assert f"MRF sequence sha256 {PROVENANCE.sequence_hash}" in _texts(sr, "111002")  # Algorithm Parameters
    assert not _texts(sr, "121106")  # no flag comment


# ---- flagged study, bad input ---------------------------------------------------------------------------------


def test_flagged_study_marks_segmentation_and_report(classic: Written, tmp_path: Path) -> None:
    paths = write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False,
                                quantities=("T1",), warnings=REASONS, regions=(classic.labels, classic.stats))
    seg = pydicom.dcmread(tmp_path / "SEG_regions.dcm", stop_before_pixels=True)
    sr = pydicom.dcmread(tmp_path / "SR_regions.dcm")
    assert seg.SeriesDescription == "OUT OF RANGE: synthMRF regions (AAL3 atlas)"
    assert seg.ImageComments == f"{FLAG_NOTE}: {REASONS[0]}" and FLAG_NOTE in seg.DerivationDescription
    assert sr.SeriesDescription.startswith("OUT OF RANGE: synthMRF ")
    assert _texts(sr, "121106") == [f"{FLAG_NOTE}: {REASONS[0]}"]  # Comment in Qualitative Evaluations
    assert sr.ContentSequence[-1].ConceptNameCodeSequence[0].CodeValue == "C0034375"
    for path in paths[1:]:
        errors = [line for line in _dciodvfy(path) if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_report_carries_the_models_reading_note_before_a_flag(classic: Written, tmp_path: Path) -> None:
    note = "White-matter T1 is the value typical of the protocol; T2 that of the tissue class."
    noted = Provenance("synthmrf-unet", "1.2.0", "0123456789abcdef" * 4, "0.1.0", note)
    paths = write_result_series(classic.series, classic.maps, tmp_path, noted, derived=False, quantities=("T1",),
                                warnings=REASONS, regions=(classic.labels, classic.stats))
    sr = pydicom.dcmread(tmp_path / "SR_regions.dcm")
    assert _texts(sr, "121106") == [f"How to read these values: {note}", f"{FLAG_NOTE}: {REASONS[0]}"]
    assert pydicom.dcmread(tmp_path / "T1_map.dcm", stop_before_pixels=True).DerivationDescription.endswith(note
        + f"; {FLAG_NOTE} (reasons in Image Comments)")
    for path in paths:
        errors = [line for line in _dciodvfy(path) if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_bad_regions_are_refused_before_writing(classic: Written, tmp_path: Path) -> None:
    out = tmp_path / "out"
    labels, stats = classic.labels, classic.stats

    def write(regions: tuple[np.ndarray, list[RegionStats]]) -> None:
        write_result_series(classic.series, classic.maps, out, PROVENANCE, derived=False, regions=regions)

    with pytest.raises(ValueError, match=r"regions\[0\]: expected integer labels, got dtype float32"):
        write((labels.astype(np.float32), stats))
    with pytest.raises(ValueError, match=r"regions\[0\]: expected shape \(24, 28, 40\)"):
        write((labels[:, :, :-1], stats))
    with pytest.raises(ValueError, match=r"regions\[0\]: values must be in 0\.\.255"):
        write((labels - 1, stats))
    with pytest.raises(ValueError, match=r"regions\[1\]: no statistics for labels \[\d+\] of the label volume"):
        write((labels, stats[1:]))
    absent = RegionStats(REGIONS["Putamen right"], 10, 10 * VOXEL_ML, stats[0].values)
    with pytest.raises(ValueError, match=r"regions\[1\]: region 'Putamen right' \(label \d+\) has no voxel"):
        write((labels, [*stats, absent]))
    shrunk = RegionStats(stats[0].region, stats[0].voxels - 1, stats[0].volume_ml, stats[0].values)
    with pytest.raises(ValueError, match=r"regions\[1\]: region 'Hippocampus left' has \d+ voxels, the label"):
        write((labels, [shrunk, *stats[1:]]))
    no_t2 = RegionStats(stats[0].region, stats[0].voxels, stats[0].volume_ml, {"T1": stats[0].values["T1"]})
    with pytest.raises(ValueError, match=r"regions\[1\]: region 'Hippocampus left' has no statistics of \['T2'\]"):
        write((labels, [no_t2, *stats[1:]]))
    nan = RegionStats(stats[0].region, stats[0].voxels, stats[0].volume_ml,
                      {**stats[0].values, "T2": QuantityStats(float("nan"), 1.0, 1.0)})
    with pytest.raises(ValueError, match=r"regions\[1\]: mean of T2 in 'Hippocampus left' is nan"):
        write((labels, [nan, *stats[1:]]))
    assert not out.exists()


def test_region_without_voxels_is_no_segment(classic: Written, tmp_path: Path) -> None:
    """A region left out of the labels has no segment; the others are numbered 1..n in label order."""
    dropped = REGIONS["Hippocampus right"]
    labels = np.where(classic.labels == dropped.label, 0, classic.labels).astype(np.int16)
    stats = [s for s in classic.stats if s.region != dropped]
    write_result_series(classic.series, classic.maps, tmp_path, PROVENANCE, derived=False, quantities=("T1",),
                        regions=(labels, stats))
    seg = pydicom.dcmread(tmp_path / "SEG_regions.dcm", stop_before_pixels=True)
    names = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert names == sorted((s.region.name for s in stats), key=lambda n: REGIONS[n].label)
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(stats) + 1))


def test_builders_refuse_what_does_not_fit(classic: Written) -> None:
    seg = pydicom.dcmread(classic.path("SEG_regions.dcm"))
    regions = [s.region for s in classic.stats]
    with pytest.raises(ValueError, match=r"labels: no region has a voxel"):
        build_segmentation(classic.series, np.zeros_like(classic.labels), regions, PROVENANCE, series_number=330)
    with pytest.raises(ValueError, match=r"labels: values \[\d+\] are no region's label"):
        build_segmentation(classic.series, classic.labels, regions[1:], PROVENANCE, series_number=330)
    with pytest.raises(ValueError, match=r"regions: label \d+ twice"):
        build_segmentation(classic.series, classic.labels, [*regions, regions[0]], PROVENANCE, series_number=330)
    with pytest.raises(ValueError, match=r"series_number: 3 is the source series' own number"):
        build_segmentation(classic.series, classic.labels, regions, PROVENANCE, series_number=3)
    other = RegionStats(REGIONS["Amygdala right"], 5, 5 * VOXEL_ML, classic.stats[0].values)
    with pytest.raises(ValueError, match=r"stats: regions \['Amygdala right'\] have no segment in the segmentation"):
        build_region_report(classic.series, seg, [*classic.stats, other], PROVENANCE, series_number=331)
    with pytest.raises(ValueError, match=r"stats: no region to report"):
        build_region_report(classic.series, seg, [], PROVENANCE, series_number=331)
    moved = copy.deepcopy(seg)
    moved.FrameOfReferenceUID = "1.2.3"
    with pytest.raises(ValueError, match=r"segmentation: FrameOfReferenceUID 1\.2\.3 is not the source series'"):
        build_region_report(classic.series, moved, classic.stats, PROVENANCE, series_number=331)
    with pytest.raises(ValueError, match=r"segmentation: expected a Segmentation"):
        build_region_report(classic.series, pydicom.dcmread(classic.path("T1_map.dcm"), stop_before_pixels=True),
                            classic.stats, PROVENANCE, series_number=331)


def test_kind_of_region_files() -> None:
    assert kind_of("SEG_regions.dcm") == SEGMENTATION and kind_of("SR_regions.dcm") == SR


def test_summary_page_as_secondary_capture(classic: Written, tmp_path: Path) -> None:
    from pipeline.dicom_output.summary import SUMMARY_DESCRIPTION, build_summary
    from pipeline.dicom_output.writer import write_dataset_atomic
    from pipeline.qc_figure import qc_figure
    from pipeline.result_kinds import SUMMARY, SUMMARY_FILE_NAME
    from pipeline.summary_page import summary_page

    rng = np.random.default_rng(3)
    volume = rng.random((24, 24, 12)).astype(np.float32)
    qc = qc_figure(tmp_path / "qc.png", volume, {"T1": volume * 2000, "T2": volume * 100}, volume > 0.2, title="t")
    page = summary_page(qc, classic.stats, model_label="synthmrf-unet 1.2.0")
    assert page.ndim == 3 and page.shape[2] == 3 and page.dtype == np.uint8 and page.shape[1] == 1600
    noted = summary_page(qc, classic.stats, model_label="synthmrf-unet 1.2.0", reading_note="T2 is a prior. " * 20)
    assert noted.shape[0] == page.shape[0] + 2 * 22  # the note, wrapped to two lines under the model's name
    # (the wording is drawn, not checked here; its red pixels are)
    red = (noted[..., 0] > 100) & (noted[..., 1] < 60) & (noted[..., 2] < 60)
    assert red[80:140].sum() > red[80:140].size * 0.002
    sc = build_summary(classic.series, page, PROVENANCE, series_number=432)
    path = tmp_path / SUMMARY_FILE_NAME
    write_dataset_atomic(sc, path)
    assert kind_of(path.name) == SUMMARY
    assert not [line for line in _dciodvfy(path) if line.startswith("Error")]
    back = pydicom.dcmread(path)
    source = classic.series.header
    assert (back.StudyInstanceUID, back.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SeriesNumber == 432
    assert back.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert back.SeriesDescription == SUMMARY_DESCRIPTION and back.BurnedInAnnotation == "NO"
    assert np.array_equal(back.pixel_array, page)
    with pytest.raises(ValueError, match="page"):
        build_summary(classic.series, page[..., 0], PROVENANCE, series_number=432)
