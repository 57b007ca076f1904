"""The regional statistics of one source series as a Comprehensive 3D SR with a TID 1500 Measurement Report
(highdicom), a new series of the source study.

Observer: the device (synthMRF and its model). Procedure reported: Brain MRI (LOINC 24590-2). One TID 1411
Volumetric ROI group per region, in the order of ``stats``: tracking identifier the region's name, tracking
UID that of its segment, the segment referenced (the Segmentation's SOP class and instance, the segment
number, the source series), finding site the structure's code with its side as laterality. Measurements: of
T1, T2 (and PD where given) the mean, standard deviation and median over the region (the quantity's code
and UCUM unit, derivation Mean / Standard Deviation / Median), each with the algorithm that made the map
(synthMRF, the model version, the MRF sequence hash); and the region's volume in ml, with the region
algorithm of the Segmentation.
"""

from __future__ import annotations

import datetime
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    ObservationContext,
    ObserverContext,
    ReferencedSegment,
    SourceSeriesForSegmentation,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from pipeline.dicom_output.provenance import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    READING_NOTE_LEAD,
    Provenance,
    comment_in_report,
)
from pipeline.dicom_output.quantities import check_series_number, quantity_spec
from pipeline.dicom_output.segmentation import ALGORITHM_FAMILY, ALGORITHM_NAME, private_coding_schemes
from pipeline.dicom_output.source import copy_character_set, copy_retired_patient_attributes, source_header
from pipeline.dicom_output.uids import new_uid, stable_uid
from pipeline.dicom_series import DicomSeries

if TYPE_CHECKING:  # pipeline.regions brings nibabel, scipy and the atlas code: not at import time
    from pipeline.regions import RegionStats

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "synthMRF regional T1/T2 (AAL3 atlas)"
PROCEDURE = codes.LN.BrainMRI
MAP_ALGORITHM_NAME = "synthMRF"
REQUIRED, OPTIONAL = ("T1", "T2"), ("PD",)  # the maps reported; Q (match quality) is not
STATISTICS = (("mean", codes.SCT.Mean), ("sd", codes.SCT.StandardDeviation), ("median", codes.SCT.Median))
VOLUME = codes.SCT.Volume
MILLILITRE = Code("ml", "UCUM", "milliliter")


def _finite(value: float, what: str, argument: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{argument}: {what} is {value}; expected a finite number")
    return value


def _check_stats(stats: Sequence[RegionStats], argument: str) -> None:
    seen: set[int] = set()
    for s in stats:
        name, label = s.region.name, s.region.label
        if label in seen:
            raise ValueError(f"{argument}: region label {label} ({name!r}) twice")
        seen.add(label)
        missing = [q for q in REQUIRED if q not in s.values]
        if missing:
            raise ValueError(f"{argument}: region {name!r} has no statistics of {missing}; it has {sorted(s.values)}")
        for q in (*REQUIRED, *OPTIONAL):
            if q in s.values:
                for field, _ in STATISTICS:
                    _finite(getattr(s.values[q], field), f"{field} of {q} in {name!r}", argument)
        if not _finite(s.volume_ml, f"volume of {name!r}", argument) > 0:
            raise ValueError(f"{argument}: region {name!r} has volume {s.volume_ml} ml; expected > 0")


def check_region_stats(stats: Sequence[RegionStats], voxels: Mapping[int, int], argument: str = "stats") -> None:
    """``stats`` are one per label of ``voxels`` (label -> voxels present in the label volume), each with the
    voxel count of its label and finite T1 and T2 (and PD, if given) statistics and a positive volume."""
    _check_stats(stats, argument)
    for s in stats:
        if s.region.label not in voxels:
            raise ValueError(f"{argument}: region {s.region.name!r} (label {s.region.label}) has no voxel in the "
                             f"label volume")
        if s.voxels != voxels[s.region.label]:
            raise ValueError(f"{argument}: region {s.region.name!r} has {s.voxels} voxels, the label volume "
                             f"{voxels[s.region.label]} (statistics of another volume?)")
    without = sorted(set(voxels) - {s.region.label for s in stats})
    if without:
        raise ValueError(f"{argument}: no statistics for labels {without[:10]} of the label volume")


def _segments_by_name(segmentation: Dataset, series: DicomSeries) -> dict[str, Dataset]:
    if segmentation.get("SOPClassUID") != SegmentationStorage:
        raise ValueError(f"segmentation: expected a Segmentation (SOP class {SegmentationStorage}), got "
                         f"{segmentation.get('SOPClassUID')}")
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID"):
        if segmentation.get(keyword) != series.header.get(keyword):
            raise ValueError(f"segmentation: {keyword} {segmentation.get(keyword)} is not the source series' "
                             f"{series.header.get(keyword)}")
    return {str(item.SegmentLabel): item for item in segmentation.SegmentSequence}


def _group(s: RegionStats, segment: Dataset, segmentation: Dataset, series: DicomSeries,
           maps: AlgorithmIdentification, regions: AlgorithmIdentification
           ) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    measurements = []
    for q in (*REQUIRED, *OPTIONAL):
        if q not in s.values:
            continue
        spec = quantity_spec(q)
        for field, derivation in STATISTICS:
            measurements.append(Measurement(name=spec.concept, value=float(getattr(s.values[q], field)),
                                            unit=spec.unit, derivation=derivation, algorithm_id=maps))
    measurements.append(Measurement(name=VOLUME, value=float(s.volume_ml), unit=MILLILITRE, algorithm_id=regions))
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=str(segment.TrackingUID), identifier=s.region.name),
        referenced_segment=ReferencedSegment(
            sop_class_uid=segmentation.SOPClassUID, sop_instance_uid=segmentation.SOPInstanceUID,
            segment_number=int(segment.SegmentNumber),
            source_series=SourceSeriesForSegmentation(series.series_instance_uid)),
        finding_sites=[FindingSite(s.region.structure.code, laterality=s.region.laterality)],
        measurements=measurements)


def _source_evidence(series: DicomSeries) -> list[Dataset]:
    """The source instances, as the SR's evidence (identifiers only: nothing is read)."""
    evidence: dict[str, Dataset] = {}
    for frame in series.frames:
        if frame.sop_instance_uid not in evidence:
            ds = Dataset()
            ds.StudyInstanceUID = series.study_instance_uid
            ds.SeriesInstanceUID = series.series_instance_uid
            ds.SOPClassUID = frame.sop_class_uid
            ds.SOPInstanceUID = frame.sop_instance_uid
            evidence[frame.sop_instance_uid] = ds
    return list(evidence.values())


def build_region_report(series: DicomSeries, segmentation: Dataset, stats: Sequence[RegionStats],
                        provenance: Provenance, *, series_number: int, uid_root: str | None = None
                        ) -> Comprehensive3DSR:
    """A TID 1500 report of ``stats`` (per region, as :func:`check_region_stats` wants them), each region
    referencing its segment in ``segmentation`` (:func:`~pipeline.dicom_output.segmentation.build_segmentation`
    of the same ``series``, found by the region's name), in a new series (see the module docstring)."""
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance: expected Provenance, got {type(provenance).__name__}")
    check_series_number(series_number, series)
    segments = _segments_by_name(segmentation, series)
    _check_stats(stats, "stats")
    if not stats:
        raise ValueError("stats: no region to report")
    absent = [s.region.name for s in stats if s.region.name not in segments]
    if absent:
        raise ValueError(f"stats: regions {absent[:10]} have no segment in the segmentation")
    maps = AlgorithmIdentification(MAP_ALGORITHM_NAME, provenance.model_version, manufacturer=MANUFACTURER,
                                   family=codes.DCM.ArtificialIntelligence,
                                   parameters=[f"model {provenance.model_label}",
                                               f"MRF sequence sha256 {provenance.sequence_hash}"])
    regions = AlgorithmIdentification(ALGORITHM_NAME, provenance.model_version, manufacturer=MANUFACTURER,
                                      family=ALGORITHM_FAMILY)
    device = DeviceObserverIdentifyingAttributes(
        uid=stable_uid(uid_root, MANUFACTURER, provenance.model_label), name=MANUFACTURER_MODEL_NAME,
        manufacturer_name=MANUFACTURER, model_name=provenance.model_label, serial_number=DEVICE_SERIAL_NUMBER)
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_device_context=ObserverContext(codes.DCM.Device, device)),
        procedure_reported=PROCEDURE,
        imaging_measurements=[_group(s, segments[s.region.name], segmentation, series, maps, regions)
                              for s in stats])
    header = source_header(series)
    now = datetime.datetime.now()
    with warnings.catch_warnings():
        # highdicom warns about single-component person names *with the name in the message*: no PHI in logs.
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        sr = Comprehensive3DSR(
            evidence=[segmentation, *_source_evidence(series)],
            content=report[0],
            series_instance_uid=new_uid(uid_root),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_root),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=provenance.software_versions[0],  # all three set below (highdicom types one)
            device_serial_number=DEVICE_SERIAL_NUMBER,
            series_description=SERIES_DESCRIPTION,
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            coding_schemes=private_coding_schemes(s.region.structure.code for s in stats),
            specific_character_set=None,  # not highdicom's check: copy_character_set below
        )
    copy_character_set(sr, header)
    copy_retired_patient_attributes(sr, header)
    sr["SoftwareVersions"].value = list(provenance.software_versions)
    if provenance.reading_note:
        comment_in_report(sr, f"{READING_NOTE_LEAD}{provenance.reading_note}")
    logger.info("region report: series %s in study %s, %d regions", sr.SeriesInstanceUID, series.study_instance_uid,
                len(stats))
    return sr

