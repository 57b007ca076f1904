"""The summary page (:mod:`pipeline.summary_page`) as a Secondary Capture image in a new series of the source
study, for a PACS or viewer without Segmentation and SR support (destinations that list "summary")."""

from __future__ import annotations

import datetime
import warnings

import numpy as np
import pydicom
from highdicom import CoordinateSystemNames
from highdicom.sc import SCImage
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from pipeline.dicom_output.provenance import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    Provenance,
)
from pipeline.dicom_output.quantities import check_series_number
from pipeline.dicom_output.source import (
    copy_anatomy,
    copy_character_set,
    copy_retired_patient_attributes,
    read_source_headers,
)
from pipeline.dicom_output.uids import new_uid
from pipeline.dicom_series import DicomSeries

SUMMARY_DESCRIPTION = "synthMRF summary, not for diagnosis"
SUMMARY_COMMENT = ("Summary page of the synthMRF results (QC panels and regional T1/T2 table); not for diagnosis: "
                   "the maps are synthesised from a T1-weighted series")


def build_summary(series: DicomSeries, page: np.ndarray, provenance: Provenance, *, series_number: int,
                  uid_root: str | None = None) -> Dataset:
    """A Secondary Capture of ``page`` ((H, W, 3) uint8 RGB) in a new series of ``series``' study."""
    if page.ndim != 3 or page.shape[2] != 3 or page.dtype != np.uint8:
        raise ValueError(f"page: expected an (H, W, 3) uint8 RGB image, got {page.shape} {page.dtype}")
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance: expected Provenance, got {type(provenance).__name__}")
    check_series_number(series_number, series)
    header = read_source_headers(series)[0]
    now = datetime.datetime.now()
    with warnings.catch_warnings():
        # highdicom warns about single-component person names *with the name in the message*: no PHI in logs.
        warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent", category=UserWarning)
        sc = SCImage.from_ref_dataset(
            header, pixel_array=np.ascontiguousarray(page), photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system=CoordinateSystemNames.PATIENT, series_instance_uid=new_uid(uid_root),
            series_number=series_number, sop_instance_uid=new_uid(uid_root), instance_number=1,
            manufacturer=MANUFACTURER, transfer_syntax_uid=ExplicitVRLittleEndian,
            patient_orientation=("L", "P"),  # the QC panels: radiological view of axial slices
        )
    copy_character_set(sc, header)
    copy_anatomy(sc, series.header, multiframe=False)  # BodyPartExamined: no General Series Laterality needed
    copy_retired_patient_attributes(sc, header)
    sc.SeriesDescription = SUMMARY_DESCRIPTION
    sc.SeriesDate = sc.ContentDate = DA(now.strftime("%Y%m%d"))
    sc.SeriesTime = sc.ContentTime = TM(now.strftime("%H%M%S"))
    sc.ManufacturerModelName = MANUFACTURER_MODEL_NAME
    sc.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    sc["SoftwareVersions"] = pydicom.DataElement(0x00181020, "LO", list(provenance.software_versions))
    sc.ImageType = ["DERIVED", "SECONDARY", "SUMMARY"]
    sc.ConversionType = "WSD"  # workstation
    sc.BurnedInAnnotation = "NO"  # the page names no patient
    sc.ImageComments = SUMMARY_COMMENT
    sc.DerivationDescription = provenance.derivation_description("summary")
    return sc
