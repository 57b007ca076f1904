"""What the results take from the source series' headers, wherever single- or multi-frame objects keep it."""

from __future__ import annotations

import copy

import pydicom
from pydicom.dataset import Dataset

from pipeline.dicom_series import DicomSeries


def read_source_headers(series: DicomSeries) -> list[Dataset]:
    """The headers (no pixel data) of the series' files, as highdicom needs them for references."""
    headers: list[Dataset] = []
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "SliceThickness" not in ds and "PerFrameFunctionalGroupsSequence" not in ds:
            ds.SliceThickness = None  # Type 2 (may be empty), but highdicom reads it
        headers.append(ds)
    return headers


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
    """SliceThickness of the source (single- or multi-frame), ``default`` where it has none."""
    value = source_attribute(header, "SliceThickness")
    measures = _shared(header, "PixelMeasuresSequence")
    if value in (None, "") and measures is not None:
        value = measures.get("SliceThickness")
    return default if value in (None, "") else float(value)  # type: ignore[arg-type]


def copy_anatomy(target: Dataset, header: Dataset, *, multiframe: bool) -> None:
    """Body part of the source on ``target``, so that General Series Laterality (Type 2C) is not needed.

    A single-frame source has BodyPartExamined; an enhanced one a shared Frame Anatomy item, copied as
    such to a multi-frame target and as AnatomicRegionSequence and ImageLaterality to a single-frame one.
    Without either, Laterality is written empty (unknown).
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
        target.Laterality = None
