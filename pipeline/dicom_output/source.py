"""What the results take from the source series' headers, wherever single- or multi-frame objects keep it.

The results are built from in-memory copies of the source headers, prepared so that highdicom accepts
what scanners send: absent Type 2 patient and study attributes present (empty), an empty first value of
Specific Character Set written out (ISO 2022 IR 6), and the grid's exact geometry
(:func:`read_source_headers`).
"""

from __future__ import annotations

import copy

import pydicom
from highdicom import CoordinateSystemNames, PixelMeasuresSequence, PlaneOrientationSequence
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.dicom_series import DicomSeries

# Patient and General Study attributes of Type 2 (may be empty, but present): highdicom reads most of them
# directly, and the results must carry them all.
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
# Retired Patient module attributes that highdicom does not copy but a PACS may still match on.
RETIRED_PATIENT = ("OtherPatientIDs",)
LOSSY_ATTRIBUTES = ("LossyImageCompressionRatio", "LossyImageCompressionMethod")
DEFAULT_BODY_PART = "HEAD"  # PS3.16 Annex L
DEFAULT_REPERTOIRE = "ISO 2022 IR 6"  # what an empty first value of Specific Character Set means (PS3.3 C.12.1.1.2)


def _prepare(header: Dataset) -> Dataset:
    """``header`` (a copy) with its Type 2 patient and study attributes present and no empty character set value."""
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    charset = header.get("SpecificCharacterSet")
    if charset == "":
        del header.SpecificCharacterSet  # empty: the default repertoire
    elif isinstance(charset, MultiValue) and charset[0] == "":
        header.SpecificCharacterSet = [DEFAULT_REPERTOIRE, *charset[1:]]
    return header


def grid_orientation(series: DicomSeries) -> PlaneOrientationSequence:
    """The grid's ImageOrientationPatient, as the results and the prepared source headers carry it."""
    return PlaneOrientationSequence(CoordinateSystemNames.PATIENT, series.grid.orientation.tolist())


def grid_pixel_measures(series: DicomSeries) -> PixelMeasuresSequence:
    """Pixel spacing and slice spacing of the grid, the source's slice thickness (the grid spacing without one)."""
    grid = series.grid
    return PixelMeasuresSequence(pixel_spacing=list(grid.pixel_spacing),
                                 slice_thickness=slice_thickness(series.header, grid.slice_spacing),
                                 spacing_between_slices=grid.slice_spacing)


def _set_grid_orientation(header: Dataset, orientation: PlaneOrientationSequence) -> None:
    """The grid's orientation on every frame (read_series allows small differences; highdicom none).

    A multi-frame header gets it in its shared functional group, and per-frame pixel measures move there
    too (frame 1's: read_series has checked that the frames agree); highdicom reads both only there.
    """
    if "PerFrameFunctionalGroupsSequence" not in header:
        header.ImageOrientationPatient = copy.deepcopy(orientation[0].ImageOrientationPatient)
        if "SliceThickness" not in header:
            header.SliceThickness = None  # Type 2 (may be empty), but highdicom reads it
        return
    if not header.get("SharedFunctionalGroupsSequence"):
        header.SharedFunctionalGroupsSequence = [Dataset()]
    shared = header.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence = copy.deepcopy(orientation)
    frames = header.PerFrameFunctionalGroupsSequence
    if frames and "PixelMeasuresSequence" in frames[0]:
        shared.PixelMeasuresSequence = frames[0].PixelMeasuresSequence
    for frame in frames:
        for sequence in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            if sequence in frame:
                delattr(frame, sequence)


def read_source_headers(series: DicomSeries) -> list[Dataset]:
    """The headers (no pixel data) of the series' files, prepared as highdicom needs them (module docstring)."""
    orientation = grid_orientation(series)
    headers: list[Dataset] = []
    for path in series.files:
        ds = _prepare(pydicom.dcmread(path, stop_before_pixels=True))
        _set_grid_orientation(ds, orientation)
        headers.append(ds)
    return headers


def source_header(series: DicomSeries) -> Dataset:
    """A prepared copy of ``series.header`` (patient and study attributes as :func:`read_source_headers`)."""
    return _prepare(copy.deepcopy(series.header))


def _shared(header: Dataset, sequence: str) -> Dataset | None:
    shared = header.get("SharedFunctionalGroupsSequence")
    items = shared[0].get(sequence) if shared else None
    return items[0] if items else None


def source_attribute(header: Dataset, keyword: str) -> object:
    """``keyword`` of the source, also where Legacy Converted Enhanced images keep it; None if absent."""
    if keyword in header:
        return header[keyword].value
    unassigned = _shared(header, "UnassignedSharedConvertedAttributesSequence")
    if unassigned is not None and keyword in unassigned:
        return unassigned[keyword].value
    return None


def slice_thickness(header: Dataset, default: float) -> float:
    """SliceThickness of the source (single- or multi-frame, shared or frame 1's), ``default`` where it has none."""
    value = source_attribute(header, "SliceThickness")
    measures = _shared(header, "PixelMeasuresSequence")
    if measures is None and header.get("PerFrameFunctionalGroupsSequence"):
        items = header.PerFrameFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        measures = items[0] if items else None
    if value in (None, "") and measures is not None:
        value = measures.get("SliceThickness")
    return default if value in (None, "") else float(value)  # type: ignore[arg-type]


def copy_anatomy(target: Dataset, header: Dataset, *, multiframe: bool) -> None:
    """Body part of the source on ``target``, so that General Series Laterality (Type 2C) is not needed.

    A single-frame source has BodyPartExamined; an enhanced one a shared Frame Anatomy item, copied as
    such to a multi-frame target and as AnatomicRegionSequence and ImageLaterality to a single-frame one.
    Without either, BodyPartExamined is HEAD (the input is a head MPRAGE, as RecognizableVisualFeatures
    says too): Laterality is for paired body parts, and a verifier needs the body part to know it is not.
    """
    anatomy = _shared(header, "FrameAnatomySequence")
    if "BodyPartExamined" in header:
        target.BodyPartExamined = header.BodyPartExamined
    elif anatomy is not None and multiframe:
        target.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [copy.deepcopy(anatomy)]
    elif anatomy is not None:
        target.AnatomicRegionSequence = copy.deepcopy(anatomy.AnatomicRegionSequence)
        target.ImageLaterality = anatomy.FrameLaterality
    else:
        target.BodyPartExamined = DEFAULT_BODY_PART


def copy_character_set(target: Dataset, header: Dataset) -> None:
    """The (prepared) source's Specific Character Set on ``target``.

    Set here rather than through highdicom, whose check (0.28) refuses ISO 2022 IR 149 (its Korean term
    reads IR 159); the results hold the source's own text, so the source's character set encodes it.
    """
    if "SpecificCharacterSet" in header:
        target.SpecificCharacterSet = copy.deepcopy(header.SpecificCharacterSet)


def copy_retired_patient_attributes(target: Dataset, header: Dataset) -> None:
    """Retired Patient module attributes of the source (highdicom's module tables leave them out)."""
    for keyword in RETIRED_PATIENT:
        if keyword in header:
            target.add(copy.deepcopy(header[keyword]))


def copy_lossy_compression(target: Dataset, header: Dataset) -> None:
    """Lossy Image Compression "01" with its ratio and method where the source has it, else "00" (PS3.3 C.7.6.1.1.5)."""
    if source_attribute(header, "LossyImageCompression") != "01":
        target.LossyImageCompression = "00"
        return
    target.LossyImageCompression = "01"
    for keyword in LOSSY_ATTRIBUTES:
        value = source_attribute(header, keyword)
        if value not in (None, ""):
            setattr(target, keyword, value)
