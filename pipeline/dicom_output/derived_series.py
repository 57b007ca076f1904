"""A viewer-friendly copy of one map: a classic MR Image series, one 16-bit slice per source frame.

Why classic MR Image Storage (1.2.840.10008.5.1.4.1.1.4) with Rescale Slope/Intercept:

- It is what every PACS viewer displays, and how scanner mapping packages send their T1/T2 maps:
  single-frame MR images, ImageType DERIVED\\SECONDARY\\T1 MAP (T2 MAP, DENSITY MAP: the MR Image
  module's own value-3 terms). Multi-frame objects (Enhanced MR, Parametric Map) are what many viewers
  still open poorly or not at all, and the Parametric Map already is this node's multi-frame result.
- Rescale Slope/Intercept is what viewers apply to show, and measure ROIs in, the real unit. The MR
  Image IOD does not list the Modality LUT module, so dciodvfy calls the instance a "Standard Extended
  SOP Class" and warns about the two attributes (warnings, no errors), as for the scanners that write
  them the same way. Rescale Type is left out (one warning less; viewers do not need it). The
  standard's own description of the same mapping, a Real World Value Mapping with the quantity code
  and UCUM unit (General Image module), is written as well.
- Enhanced MR Image with a Pixel Value Transformation functional group would be fully conformant, but
  it is a multi-frame object again, so it would not serve the viewers this series is for.

Encoding (unsigned 16 bit, intercept 0): T1 in whole ms (slope 1, so a viewer that ignores the
rescale still shows ms; up to 65535 ms), T2 in 0.1 ms (slope 0.1; up to 6553.5 ms), PD in 1e-4
(slope 0.0001; up to 6.5535). Values outside the range are clipped (and logged). Window centre and
width are in the real unit (they apply after the rescale).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence

import numpy as np
from highdicom import SOPClass
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import format_number_as_ds

from pipeline.dicom_output.provenance import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    Provenance,
)
from pipeline.dicom_output.quantities import (
    QuantitySpec,
    check_series_number,
    map_frames,
    quantity_spec,
    real_world_value_mapping,
)
from pipeline.dicom_output.source import (
    copy_anatomy,
    copy_character_set,
    copy_lossy_compression,
    copy_retired_patient_attributes,
    slice_thickness,
    source_attribute,
    source_header,
)
from pipeline.dicom_output.uids import new_uid
from pipeline.dicom_series import DicomSeries, SourceFrame

logger = logging.getLogger(__name__)

STORED_MAX = int(np.iinfo(np.uint16).max)
# MR Image module: the Type 1 attributes and those that hold for the map too come from the source
# acquisition; its timing (TR, TE, TI, echo train) does not describe a map and is left empty (Type 2).
MR_TYPE1_FALLBACKS = {"ScanningSequence": "RM", "SequenceVariant": "NONE"}  # RM: research mode
MR_COPIED = ("MRAcquisitionType", "MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus")
MR_EMPTY = ("ScanOptions", "RepetitionTime", "EchoTime", "EchoTrainLength", "InversionTime")
DERIVATION = CodedConcept.from_code(codes.DCM.UnspecifiedMethodOfCalculation)
SOURCE_PURPOSE = CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


class DerivedMRImage(SOPClass):
    """One slice of a derived map series: MR Image Storage, ImageType DERIVED\\SECONDARY\\<map>.

    ``source`` is the source series' header as :func:`~pipeline.dicom_output.source.source_header` prepares it.
    """

    def __init__(self, *, source: Dataset, source_frame: SourceFrame, pixel_array: np.ndarray,
                 position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float],
                 slice_thickness: float, spacing_between_slices: float, quantity: QuantitySpec,
                 provenance: Provenance, series_instance_uid: str, series_number: int, instance_number: int,
                 series_datetime: datetime.datetime, uid_root: str | None = None,
                 series_description: str | None = None, derivation: str | None = None) -> None:
        if not isinstance(pixel_array, np.ndarray) or pixel_array.dtype != np.uint16:
            raise TypeError(f"pixel_array: expected a uint16 numpy array, got {getattr(pixel_array, 'dtype', None)!s} "
                            f"{type(pixel_array).__name__}")
        if pixel_array.ndim != 2:
            raise ValueError(f"pixel_array: expected one frame (rows, columns), got shape {pixel_array.shape}")
        for name, numbers, n in (("position", position, 3), ("orientation", orientation, 6),
                                 ("pixel_spacing", pixel_spacing, 2)):
            if len(numbers) != n:
                raise ValueError(f"{name}: expected {n} values, got {len(numbers)}")
        super().__init__(
            study_instance_uid=source.StudyInstanceUID, series_instance_uid=series_instance_uid,
            series_number=series_number, sop_instance_uid=new_uid(uid_root), sop_class_uid=MRImageStorage,
            instance_number=instance_number, modality="MR", manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME, device_serial_number=DEVICE_SERIAL_NUMBER,
            software_versions=provenance.software_versions[0],  # all three set below (highdicom types one)
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description or f"synthMRF {quantity.name} map [{quantity.unit_label}] (MR image)",
            series_date=series_datetime.date(), series_time=series_datetime.time(),
            content_date=series_datetime.date(), content_time=series_datetime.time())
        copy_character_set(self, source)
        self.copy_patient_and_study_information(source)
        copy_retired_patient_attributes(self, source)
        self["SoftwareVersions"].value = list(provenance.software_versions)
        # General Series, Frame of Reference
        if "PatientPosition" in source:
            self.PatientPosition = source.PatientPosition
        copy_anatomy(self, source, multiframe=False)
        self.FrameOfReferenceUID = source.FrameOfReferenceUID
        self.PositionReferenceIndicator = source.get("PositionReferenceIndicator")
        # General Image, General Reference, Common Instance Reference
        self.ImageType = ["DERIVED", "SECONDARY", quantity.mr_image_type]
        self.BurnedInAnnotation = "NO"
        self.RecognizableVisualFeatures = "YES"  # a head volume: the skin surface may show the face
        copy_lossy_compression(self, source)
        self.RealWorldValueMappingSequence = [
            real_world_value_mapping(quantity, (0, STORED_MAX), slope=quantity.derived_slope)]
        reference = Dataset()
        reference.ReferencedSOPClassUID = source_frame.sop_class_uid
        reference.ReferencedSOPInstanceUID = source_frame.sop_instance_uid
        if source_frame.frame_number is not None:
            reference.ReferencedFrameNumber = source_frame.frame_number
        reference.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
        reference.SpatialLocationsPreserved = "YES"
        self.SourceImageSequence = [reference]
        self.DerivationDescription = derivation or provenance.derivation_description(quantity.name)
        self.DerivationCodeSequence = [DERIVATION]
        instance = Dataset()
        instance.ReferencedSOPClassUID = source_frame.sop_class_uid
        instance.ReferencedSOPInstanceUID = source_frame.sop_instance_uid
        series_reference = Dataset()
        series_reference.SeriesInstanceUID = source.SeriesInstanceUID
        series_reference.ReferencedInstanceSequence = [instance]
        self.ReferencedSeriesSequence = [series_reference]
        # Image Plane
        self.PixelSpacing = [_ds(v) for v in pixel_spacing]
        self.ImageOrientationPatient = [_ds(v) for v in orientation]
        self.ImagePositionPatient = [_ds(v) for v in position]
        self.SliceThickness = _ds(slice_thickness)
        self.SpacingBetweenSlices = _ds(spacing_between_slices)
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        self.SliceLocation = _ds(float(np.asarray(position, float) @ normal))
        # MR Image (the source acquisition the map derives from)
        for keyword, fallback in MR_TYPE1_FALLBACKS.items():
            value = source_attribute(source, keyword)
            setattr(self, keyword, fallback if value in (None, "") else value)
        for keyword in MR_COPIED:
            value = source_attribute(source, keyword)
            if value not in (None, ""):
                setattr(self, keyword, value)
        for keyword in MR_EMPTY:
            setattr(self, keyword, None)
        # Image Pixel, Modality LUT (see the module docstring), VOI LUT
        self.SamplesPerPixel = 1
        self.PhotometricInterpretation = "MONOCHROME2"
        self.Rows, self.Columns = (int(n) for n in pixel_array.shape)
        self.BitsAllocated, self.BitsStored, self.HighBit = 16, 16, 15
        self.PixelRepresentation = 0
        self.RescaleIntercept = "0"
        self.RescaleSlope = _ds(quantity.derived_slope)
        self.WindowCenter = _ds(quantity.window_center)
        self.WindowWidth = _ds(quantity.window_width)
        self.WindowCenterWidthExplanation = f"{quantity.name} [{quantity.unit_label}]"
        self.PixelData = np.ascontiguousarray(pixel_array, dtype="<u2").tobytes()


def encode(frames: np.ndarray, spec: QuantitySpec) -> tuple[np.ndarray, int]:
    """Stored uint16 values of ``frames`` (in the quantity's unit) and how many were clipped: float64 (so a value
    half a step from two stored values rounds as written), one array, in place."""
    stored = frames.astype(np.float64)
    stored /= spec.derived_slope
    np.rint(stored, out=stored)
    clipped = int(np.count_nonzero(stored < 0)) + int(np.count_nonzero(stored > STORED_MAX))
    np.clip(stored, 0, STORED_MAX, out=stored)
    return stored.astype(np.uint16), clipped


def build_derived_series(series: DicomSeries, values: np.ndarray, quantity: str | QuantitySpec,
                         provenance: Provenance, *, series_number: int, uid_root: str | None = None,
                         series_description: str | None = None, derivation: str | None = None
                         ) -> list[DerivedMRImage]:
    """One :class:`DerivedMRImage` per source frame, in grid order, for ``values`` ((i, j, k) on the grid).

    ``quantity``: a name in :data:`~pipeline.dicom_output.quantities.QUANTITIES`, or a spec (the quality map's, a
    synthetic contrast's). ``series_description`` and ``derivation`` replace the map's (synthetic contrasts).
    """
    spec = quantity if isinstance(quantity, QuantitySpec) else quantity_spec(quantity)
    frames = map_frames(values, series.grid)
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance: expected Provenance, got {type(provenance).__name__}")
    check_series_number(series_number, series)
    stored, clipped = encode(frames, spec)
    grid = series.grid
    series_uid = new_uid(uid_root)
    if clipped:
        logger.warning("derived %s series %s: %d voxels outside 0..%g %s clipped", spec.name, series_uid, clipped,
                       spec.derived_max, spec.unit_label)
    now = datetime.datetime.now()
    thickness = slice_thickness(series.header, grid.slice_spacing)
    source = source_header(series)
    images = [
        DerivedMRImage(source=source, source_frame=source_frame, pixel_array=stored[k],
                       position=grid.positions[k].tolist(), orientation=grid.orientation.tolist(),
                       pixel_spacing=list(grid.pixel_spacing), slice_thickness=thickness,
                       spacing_between_slices=grid.slice_spacing, quantity=spec, provenance=provenance,
                       series_instance_uid=series_uid, series_number=series_number, instance_number=k + 1,
                       series_datetime=now, uid_root=uid_root, series_description=series_description,
                       derivation=derivation)
        for k, source_frame in enumerate(series.frames)]
    logger.info("derived %s series %s in study %s: %d images", spec.name, series_uid, series.study_instance_uid,
                len(images))
    return images
