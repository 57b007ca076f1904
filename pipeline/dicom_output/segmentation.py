"""The anatomical regions of one source series as a DICOM Segmentation (highdicom, BINARY) in a new series of the
source study.

One segment per region that has voxels in the label volume, in label order. Segment numbers: PS3.3
C.8.20.2.4 wants those of a BINARY segmentation to run 1..n, so a region's segment number is its rank among the
regions present (:func:`pipeline.regions.segment_numbers`): its Region.label when every region is present,
smaller after a region left out. The segment label is the region's name, its Tracking ID too; the SR report
finds a region's segment by it (:mod:`pipeline.dicom_output.region_report`).

Each segment: category Anatomical Structure, type the structure's code (SNOMED CT, or the atlas' private
scheme) with the side as Segmented Property Type Modifier, anatomic region Brain, algorithm AUTOMATIC (the
AAL3 atlas carried onto the patient by deformable registration). The geometry is the source grid: frames
lie on the source slices, each with its plane position and a reference to the source frame; frames without
a voxel of their segment are left out. highdicom orders each segment's frames along the slice normal (its
own convention, as in the Parametric Maps: possibly the reverse of the source's order).
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from highdicom import (
    AlgorithmIdentificationSequence,
    CoordinateSystemNames,
    PlanePositionSequence,
)
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.seg import SegmentAlgorithmTypeValues, Segmentation, SegmentationTypeValues, SegmentDescription
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.dicom_output.provenance import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    Provenance,
)
from pipeline.dicom_output.quantities import check_series_number
from pipeline.dicom_output.source import (
    DEFAULT_BODY_PART,
    copy_character_set,
    copy_retired_patient_attributes,
    grid_orientation,
    grid_pixel_measures,
    read_source_headers,
    source_attribute,
)
from pipeline.dicom_output.uids import new_uid
from pipeline.dicom_series import DicomSeries

if TYPE_CHECKING:  # pipeline.regions brings nibabel, scipy and the atlas code: not at import time
    from pipeline.regions import Region

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "synthMRF regions (AAL3 atlas)"
CONTENT_LABEL = "REGIONS"
ALGORITHM_NAME = "synthMRF regions AAL3"
# CID 7162 has no atlas-based family; the atlas is deformed onto the patient's head (demons registration).
ALGORITHM_FAMILY = codes.DCM.DeformableModels
CATEGORY = codes.SCT.AnatomicalStructure  # CID 7150: the segments are named structures, not tissue classes
ANATOMIC_REGION = codes.SCT.Brain
MAX_SEGMENTS = 255  # the segment numbers of the label-map array passed to highdicom are uint8


def private_coding_schemes(concepts: Iterable[Code]) -> list[CodingSchemeIdentificationItem] | None:
    """Coding Scheme Identification items of the private ("99...") schemes among ``concepts``; None without any."""
    designators = sorted({c.scheme_designator for c in concepts if c.scheme_designator.startswith("99")})
    return [CodingSchemeIdentificationItem(d, responsible_organization=MANUFACTURER) for d in designators] or None


def _regions_by_label(regions: Sequence[Region], argument: str) -> dict[int, Region]:
    by_label: dict[int, Region] = {}
    for region in regions:
        if not 0 < region.label <= MAX_SEGMENTS:
            raise ValueError(f"{argument}: label of {region.name!r} must be in 1..{MAX_SEGMENTS}, got {region.label}")
        if region.label in by_label:
            raise ValueError(f"{argument}: label {region.label} twice ({by_label[region.label].name!r}, "
                             f"{region.name!r})")
        by_label[region.label] = region
    return by_label


def label_frames(labels: object, series: DicomSeries, regions: Sequence[Region] | None = None,
                 argument: str = "labels") -> tuple[np.ndarray, dict[int, int]]:
    """``labels`` (a non-negative integer (i, j, k) volume on ``series.grid``; with ``regions``, 0 or a label of
    theirs) as frames (k, rows, columns), and the number of voxels of each label present."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{argument}: expected a numpy array, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"{argument}: expected integer labels, got dtype {labels.dtype}")
    if labels.shape != series.grid.shape:
        raise ValueError(f"{argument}: expected shape {series.grid.shape} (columns, rows, frames of the source grid), "
                         f"got {labels.shape}")
    low, top = int(labels.min()), int(labels.max())
    if low < 0 or top > MAX_SEGMENTS:
        raise ValueError(f"{argument}: values must be in 0..{MAX_SEGMENTS} (0 or a region's label), got {low}..{top}")
    labels = labels.astype(np.uint8, copy=False)  # 0..MAX_SEGMENTS (also what bincount takes of any dtype)
    counts = np.bincount(labels.ravel(), minlength=top + 1)
    present = {int(v): int(counts[v]) for v in np.flatnonzero(counts[1:]) + 1}
    if regions is not None:
        known = {r.label for r in regions}
        unknown = sorted(set(present) - known)
        if unknown:
            raise ValueError(f"{argument}: values {unknown[:10]} are no region's label (regions have {sorted(known)})")
    return series.grid.to_frames(labels), present


def _description(region: Region, number: int, algorithm: AlgorithmIdentificationSequence,
                 uid_root: str | None) -> SegmentDescription:
    description = SegmentDescription(
        segment_number=number, segment_label=region.name, segmented_property_category=CATEGORY,
        segmented_property_type=region.structure.code, algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_uid=new_uid(uid_root), tracking_id=region.name,
        anatomic_regions=[ANATOMIC_REGION])
    if region.laterality is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            CodedConcept.from_code(region.laterality)]
    return description


def build_segmentation(series: DicomSeries, labels: np.ndarray, regions: Sequence[Region], provenance: Provenance,
                       *, series_number: int, uid_root: str | None = None) -> Segmentation:
    """A BINARY Segmentation of the regions present in ``labels`` ((i, j, k) on ``series.grid``, 0 = background or
    a Region.label of ``regions``), one segment each (see the module docstring), in a new series."""
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance: expected Provenance, got {type(provenance).__name__}")
    check_series_number(series_number, series)
    by_label = _regions_by_label(regions, "regions")
    frames, voxels = label_frames(labels, series, list(by_label.values()))
    if not voxels:
        raise ValueError("labels: no region has a voxel; there is nothing to segment")
    from pipeline.regions import segment_numbers  # here: the module's import stays light (see above)

    numbers = segment_numbers(list(voxels))
    lut = np.zeros(max(numbers) + 1, np.uint8)
    for label, number in numbers.items():
        lut[label] = number
    algorithm = AlgorithmIdentificationSequence(ALGORITHM_NAME, ALGORITHM_FAMILY, provenance.model_version,
                                                source=MANUFACTURER)
    descriptions = [_description(by_label[label], number, algorithm, uid_root) for label, number in numbers.items()]
    sources = read_source_headers(series)
    if series.multiframe:  # highdicom takes one multi-frame source; further files are referenced only
        first = str(series.frames[0].sop_instance_uid)
        main = [ds for ds in sources if ds.SOPInstanceUID == first]
        further = [ds for ds in sources if ds.SOPInstanceUID != first]
    else:
        main, further = sources, []
    now = datetime.datetime.now()
    with warnings.catch_warnings():
        # highdicom warns about single-component person names *with the name in the message*: no PHI in logs.
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        seg = Segmentation(
            source_images=main,
            further_source_images=further or None,
            pixel_array=lut[frames],  # label-map style: every segment 1..n is described
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=new_uid(uid_root),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_root),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=provenance.software_versions[0],  # all three set below (highdicom types one)
            device_serial_number=DEVICE_SERIAL_NUMBER,
            content_label=CONTENT_LABEL,
            content_description=f"synthMRF regions; model {provenance.model_label}",  # LO: fits MODEL_LABEL_MAX
            transfer_syntax_uid=ExplicitVRLittleEndian,
            plane_orientation=grid_orientation(series),
            plane_positions=[PlanePositionSequence(CoordinateSystemNames.PATIENT, p.tolist())
                             for p in series.grid.positions],
            pixel_measures=grid_pixel_measures(series),
            omit_empty_frames=True,
            series_description=SERIES_DESCRIPTION,
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            coding_schemes=private_coding_schemes(by_label[label].structure.code for label in numbers),
            specific_character_set=None,  # not highdicom's check: copy_character_set below
        )
    copy_character_set(seg, main[0])
    seg["SoftwareVersions"].value = list(provenance.software_versions)
    seg.DerivationDescription = provenance.regions_derivation()
    # Body Part Examined (General Series): the Segmentation's functional groups have no Frame Anatomy
    seg.BodyPartExamined = source_attribute(series.header, "BodyPartExamined") or DEFAULT_BODY_PART
    copy_retired_patient_attributes(seg, series.header)
    logger.info("segmentation: series %s in study %s, %d segments, %d frames", seg.SeriesInstanceUID,
                series.study_instance_uid, len(descriptions), int(seg.NumberOfFrames))
    return seg
