"""One quantitative map as a DICOM Parametric Map (highdicom) in a new series of the source study.

The map keeps the source grid: one float32 frame per source slice, each frame's plane position taken
from the source, shared orientation and pixel measures, and per-frame references to the source frame
it lies on. Values are stored as they are (Float Pixel Data) and the Real World Value Mapping is the
identity with the quantity's code and UCUM unit. highdicom orders the frames along the slice normal
(its own convention), so the frame order may be the reverse of the source's; every frame carries its
position.
"""

from __future__ import annotations

import datetime
import logging
import warnings
from collections.abc import Sequence

import numpy as np
from highdicom import CoordinateSystemNames, PlanePositionSequence, VOILUTTransformation
from highdicom.pm import ParametricMap
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from pipeline.dicom_output.provenance import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    Provenance,
)
from pipeline.dicom_output.quantities import (
    check_series_number,
    map_frames,
    quantity_spec,
    real_world_value_mapping,
)
from pipeline.dicom_output.source import (
    copy_anatomy,
    copy_character_set,
    copy_retired_patient_attributes,
    grid_orientation,
    grid_pixel_measures,
    read_source_headers,
)
from pipeline.dicom_output.uids import new_uid
from pipeline.dicom_series import DicomSeries

logger = logging.getLogger(__name__)


def _check_sources(source_images: Sequence[Dataset], series: DicomSeries) -> None:
    expected = {f.sop_instance_uid for f in series.frames}
    given = {str(ds.get("SOPInstanceUID", "")) for ds in source_images}
    if given != expected:
        raise ValueError(f"source_images: expected the {len(expected)} instances of series "
                         f"{series.series_instance_uid}, got {len(given)} different SOP Instance UIDs "
                         f"({len(given - expected)} not in the series, {len(expected - given)} missing)")


def build_parametric_map(series: DicomSeries, values: np.ndarray, quantity: str, provenance: Provenance, *,
                         series_number: int, source_images: Sequence[Dataset] | None = None,
                         uid_root: str | None = None) -> ParametricMap:
    """A Parametric Map of ``values`` ((i, j, k) on ``series.grid``, in the quantity's unit) in a new series.

    ``source_images`` are the headers of ``series.files`` as :func:`read_source_headers` prepares them (read
    when not given; pass them to share one read between several maps).
    """
    spec = quantity_spec(quantity)
    frames = map_frames(values, series.grid)
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance: expected Provenance, got {type(provenance).__name__}")
    check_series_number(series_number, series)
    sources = read_source_headers(series) if source_images is None else list(source_images)
    _check_sources(sources, series)
    if series.multiframe:  # highdicom takes one multi-frame source; further files are referenced only
        first = str(series.frames[0].sop_instance_uid)
        main = [ds for ds in sources if ds.SOPInstanceUID == first]
        further = [ds for ds in sources if ds.SOPInstanceUID != first]
    else:
        main, further = sources, []
    grid = series.grid
    measures = grid_pixel_measures(series)
    now = datetime.datetime.now()
    with warnings.catch_warnings():
        # highdicom warns about single-component person names *with the name in the message*: no PHI in logs.
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        pm = ParametricMap(
            source_images=main,
            further_source_images=further or None,
            pixel_array=frames,
            series_instance_uid=new_uid(uid_root),
            series_number=series_number,
            sop_instance_uid=new_uid(uid_root),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=provenance.software_versions[0],  # all three set below (highdicom types one)
            device_serial_number=DEVICE_SERIAL_NUMBER,
            contains_recognizable_visual_features=True,  # a head volume: the skin surface may show the face
            real_world_value_mappings=[real_world_value_mapping(spec, (float(frames.min()), float(frames.max())))],
            # lists: highdicom 0.28 splits a str window_explanation into characters
            voi_lut_transformations=[VOILUTTransformation(window_center=[spec.window_center],
                                                          window_width=[spec.window_width],
                                                          window_explanation=[f"{spec.name} [{spec.unit_label}]"])],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            content_label=f"{spec.name}_MAP",
            content_description=provenance.content_description(spec.name),
            plane_orientation=grid_orientation(series),
            plane_positions=[PlanePositionSequence(CoordinateSystemNames.PATIENT, p.tolist()) for p in grid.positions],
            pixel_measures=measures,
            series_description=f"synthMRF {spec.name} map [{spec.unit_label}]",
            series_date=now.date(),
            series_time=now.time(),
            content_date=now.date(),
            content_time=now.time(),
            specific_character_set=None,  # not highdicom's check: copy_character_set below
        )
    copy_character_set(pm, main[0])
    # highdicom takes the source's pixel measures where the pixel spacing matches: the grid's are the map's
    pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = measures
    pm["SoftwareVersions"].value = list(provenance.software_versions)
    pm.DerivationDescription = provenance.derivation_description(spec.name)
    # highdicom only knows the generic QUANTITY; the MR terms say which map it is
    image_type = [*pm.ImageType[:3], spec.pixel_contrast]
    pm.ImageType = image_type
    pm.SharedFunctionalGroupsSequence[0].ParametricMapFrameTypeSequence[0].FrameType = image_type
    copy_anatomy(pm, series.header, multiframe=True)
    copy_retired_patient_attributes(pm, series.header)
    logger.info("parametric map %s: series %s in study %s, %d frames", spec.name, pm.SeriesInstanceUID,
                series.study_instance_uid, int(pm.NumberOfFrames))
    return pm
