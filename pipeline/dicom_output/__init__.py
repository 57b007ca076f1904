"""DICOM results of one source series: Parametric Maps, viewer-friendly derived MR series, and the anatomical
regions as a Segmentation with a TID 1500 SR report of their T1/T2/PD.

Public surface: :func:`write_result_series` (all results of a series, written atomically), the constructors
:func:`build_parametric_map`, :func:`build_derived_series`, :func:`build_segmentation` and
:func:`build_region_report`, :class:`Provenance`, and the quantity table :data:`QUANTITIES`.
"""

from pipeline.dicom_output.derived_series import DerivedMRImage, build_derived_series
from pipeline.dicom_output.parametric_map import build_parametric_map
from pipeline.dicom_output.provenance import Provenance
from pipeline.dicom_output.quantities import QUANTITIES, QuantitySpec
from pipeline.dicom_output.region_report import build_region_report
from pipeline.dicom_output.segmentation import build_segmentation
from pipeline.dicom_output.source import read_source_headers
from pipeline.dicom_output.writer import write_result_series

__all__ = [
    "QUANTITIES",
    "DerivedMRImage",
    "Provenance",
    "QuantitySpec",
    "build_derived_series",
    "build_parametric_map",
    "build_region_report",
    "build_segmentation",
    "read_source_headers",
    "write_result_series",
]
