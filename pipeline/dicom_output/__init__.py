"""DICOM results of one source series: Parametric Maps and viewer-friendly derived MR series.

Public surface: :func:`write_result_series` (all results of a series, written atomically), the two
constructors :func:`build_parametric_map` and :func:`build_derived_series`, :class:`Provenance`, and
the quantity table :data:`QUANTITIES`.
"""

from pipeline.dicom_output.derived_series import DerivedMRImage, build_derived_series
from pipeline.dicom_output.parametric_map import build_parametric_map
from pipeline.dicom_output.provenance import Provenance
from pipeline.dicom_output.quantities import QUANTITIES, QuantitySpec
from pipeline.dicom_output.source import read_source_headers
from pipeline.dicom_output.writer import write_result_series

__all__ = [
    "QUANTITIES",
    "DerivedMRImage",
    "Provenance",
    "QuantitySpec",
    "build_derived_series",
    "build_parametric_map",
    "read_source_headers",
    "write_result_series",
]
