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

A series is built fast: :class:`DerivedMRImage` constructs (and validates) its first image only; every image
then is what the series' images share, encoded once, plus its own few attributes (UID, number, creation
time, source references, position, pixels). The result is what constructing each image would give, byte
for byte as written (tests/test_dicom_output_fast_path.py). Writing is fast too: :func:`encoded_file` gives the
bytes ``save_as`` would write, reusing the encoding of every shared attribute an image still holds unchanged.
"""

from __future__ import annotations

import copy
import datetime
import io
import logging
from collections.abc import Sequence

import numpy as np
from highdicom import SOPClass
from highdicom.sr import CodedConcept
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage
from pydicom.valuerep import DA, TM, format_number_as_ds

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
PIXEL_DATA = 0x7FE00010
# What differs between the images of one derived series; the rest is built and encoded once (_SeriesTemplate).
INSTANCE_ATTRIBUTES = ("SOPInstanceUID", "InstanceNumber", "InstanceCreationDate", "InstanceCreationTime",
                       "SourceImageSequence", "ReferencedSeriesSequence", "ImagePositionPatient", "SliceLocation",
                       "PixelData")


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
        self.DerivationDescription = derivation or provenance.derivation_description(quantity.name)
        self.DerivationCodeSequence = [DERIVATION]
        # Image Plane
        self.PixelSpacing = [_ds(v) for v in pixel_spacing]
        self.ImageOrientationPatient = [_ds(v) for v in orientation]
        self.SliceThickness = _ds(slice_thickness)
        self.SpacingBetweenSlices = _ds(spacing_between_slices)
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
        _set_slice(self, source_frame, source.SeriesInstanceUID, position, _normal(orientation), pixel_array)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def _set_slice(image: Dataset, source_frame: SourceFrame, source_series_uid: str, position: Sequence[float],
               normal: np.ndarray, pixel_array: np.ndarray) -> None:
    """The attributes of one slice: references to its source frame, its position, its pixels (the rest of
    :data:`INSTANCE_ATTRIBUTES` is set where the image is made)."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source_frame.sop_class_uid
    reference.ReferencedSOPInstanceUID = source_frame.sop_instance_uid
    if source_frame.frame_number is not None:
        reference.ReferencedFrameNumber = source_frame.frame_number
    reference.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
    reference.SpatialLocationsPreserved = "YES"
    image.SourceImageSequence = [reference]
    instance = Dataset()
    instance.ReferencedSOPClassUID = source_frame.sop_class_uid
    instance.ReferencedSOPInstanceUID = source_frame.sop_instance_uid
    series_reference = Dataset()
    series_reference.SeriesInstanceUID = source_series_uid
    series_reference.ReferencedInstanceSequence = [instance]
    image.ReferencedSeriesSequence = [series_reference]
    image.ImagePositionPatient = [_ds(v) for v in position]
    image.SliceLocation = _ds(float(np.asarray(position, float) @ normal))
    # OW: what writing makes of the keyword's "OB or OW" for 16-bit pixels, in a pass it skips for an image of a
    # _SeriesTemplate (whose shared attributes are written as encoded)
    image.add_new(PIXEL_DATA, "OW", np.ascontiguousarray(pixel_array, dtype="<u2").tobytes())


class _SeriesTemplate:
    """What all images of one derived series share, taken from its first image and encoded once.

    :meth:`image` makes an image of the series from it without re-encoding the shared attributes: they stay
    encoded (pydicom raw elements, decoded when read or changed, written as they are).
    """

    def __init__(self, first: DerivedMRImage) -> None:
        own = {Tag(keyword) for keyword in INSTANCE_ATTRIBUTES}
        shared = Dataset({tag: elem for tag, elem in first.items() if tag not in own})
        buffer = _explicit_little_endian()
        write_dataset(buffer, shared)
        self._shared = read_dataset(io.BytesIO(buffer.getvalue()), is_implicit_VR=False, is_little_endian=True)
        # The text encoding of the images' strings, as write_dataset finds it, and each element as write_dataset
        # takes it (get_item decodes an empty raw element): both decode in place, so before the elements are shared.
        self._charset = self._shared.get("SpecificCharacterSet", default_encoding)
        for tag in list(self._shared.keys()):
            self._shared.get_item(tag)
        self._elements: dict[BaseTag, DataElement | RawDataElement] = dict(self._shared.items())
        # Each shared element as write_dataset writes it; keyed by the element's identity (the template keeps every
        # element alive): an image holds the very element until it changes that attribute.
        self._encoded: dict[int, bytes] = {}
        for elem in self._elements.values():
            buffer = _explicit_little_endian()
            write_data_element(buffer, elem, self._charset)
            self._encoded[id(elem)] = buffer.getvalue()
        self._file_meta = first.file_meta
        self._preamble = first.preamble

    def image(self, sop_instance_uid: str, instance_number: int) -> DerivedMRImage:
        """An image of the series: the shared attributes, its UID, number and creation time (:func:`_set_slice`
        adds the rest of :data:`INSTANCE_ATTRIBUTES`)."""
        image = DerivedMRImage.__new__(DerivedMRImage)  # not constructed again: the first image was
        Dataset.__init__(image, dict(self._elements))
        image._series_template = self
        image.set_original_encoding(False, True, self._shared.original_character_set)
        image.preamble = self._preamble
        # own elements, of immutable values (UIDs, bytes, numbers): a shallow copy each, a fraction of a deep copy
        image.file_meta = FileMetaDataset({tag: copy.copy(elem) for tag, elem in self._file_meta.items()})
        image.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
        # as highdicom computed it for the first image; the UID (padded to even length) is all that varies
        image.file_meta.FileMetaInformationGroupLength += (
            _even(len(sop_instance_uid)) - _even(len(self._file_meta.MediaStorageSOPInstanceUID)))
        image.SOPInstanceUID = sop_instance_uid
        image.InstanceNumber = instance_number
        now = datetime.datetime.now()  # as highdicom sets them, in the image's own construction
        image.InstanceCreationDate = DA(now.date())
        image.InstanceCreationTime = TM(now.time())
        return image

    def encoded_file(self, image: Dataset) -> bytes | None:
        """What ``image.save_as(fp, enforce_file_format=True)`` writes, or None where this shortcut does not apply
        (the image's text encoding or its UID changed: save_as would re-encode the text or mend the file meta).
        Elements are written in tag order, as ``write_dataset`` writes them; a shared one the image still holds,
        from its encoding here."""
        charset_tag = BaseTag(0x00080005)
        if (image.original_encoding != (False, True) or image.original_character_set != image._character_set
                or image._dict.get(charset_tag) is not self._elements.get(charset_tag)
                or image.get("SOPInstanceUID") != image.file_meta.get("MediaStorageSOPInstanceUID")
                or image.get("SOPClassUID") != image.file_meta.get("MediaStorageSOPClassUID")):
            return None
        fp = _explicit_little_endian()
        fp.write(image.preamble or b"\x00" * 128)
        fp.write(b"DICM")
        # dcmwrite writes (and completes) a copy of the file meta; so here, a copy of its elements
        write_file_meta_info(fp, FileMetaDataset(dict(image.file_meta.items())), enforce_standard=True)
        for tag in sorted(image._dict):
            if tag.element == 0 and tag.group > 6:  # retired group lengths, skipped as write_dataset does
                continue
            elem = image._dict[tag]
            encoded = self._encoded.get(id(elem)) if self._elements.get(tag) is elem else None
            if encoded is None:
                write_data_element(fp, image.get_item(tag), self._charset)
            else:
                fp.write(encoded)
        return bytes(fp.getvalue())


def encoded_file(ds: Dataset) -> bytes:
    """``ds`` in the DICOM file format, byte for byte what ``ds.save_as(fp, enforce_file_format=True)`` writes; an
    image of a derived series is encoded from its series' shared attributes, encoded once (about 2x faster)."""
    template = getattr(ds, "_series_template", None)
    encoded = template.encoded_file(ds) if isinstance(template, _SeriesTemplate) else None
    if encoded is None:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        encoded = buffer.getvalue()
    return encoded


def _explicit_little_endian() -> DicomBytesIO:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False  # Explicit VR Little Endian, as written
    return buffer


def _even(n: int) -> int:
    return n + n % 2


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
    source = source_header(series)
    orientation = grid.orientation.tolist()
    positions = grid.positions.tolist()
    first = DerivedMRImage(source=source, source_frame=series.frames[0], pixel_array=stored[0], position=positions[0],
                           orientation=orientation, pixel_spacing=list(grid.pixel_spacing),
                           slice_thickness=slice_thickness(series.header, grid.slice_spacing),
                           spacing_between_slices=grid.slice_spacing, quantity=spec, provenance=provenance,
                           series_instance_uid=series_uid, series_number=series_number, instance_number=1,
                           series_datetime=datetime.datetime.now(), uid_root=uid_root,
                           series_description=series_description, derivation=derivation)
    template = _SeriesTemplate(first)
    normal = _normal(orientation)
    images = []
    for k, source_frame in enumerate(series.frames):
        # the first image keeps the UID its construction drew (UIDs are drawn in the order they always were)
        image = template.image(first.SOPInstanceUID if k == 0 else new_uid(uid_root), k + 1)
        _set_slice(image, source_frame, source.SeriesInstanceUID, positions[k], normal, stored[k])
        images.append(image)
    logger.info("derived %s series %s in study %s: %d images", spec.name, series_uid, series.study_instance_uid,
                len(images))
    return images
