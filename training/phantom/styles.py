"""How a phantom MPRAGE series is written: the DICOM style and whose headers it imitates."""

from __future__ import annotations

from enum import StrEnum


class DicomStyle(StrEnum):
    CLASSIC = "classic"
    ENHANCED = "enhanced"
    COMPRESSED = "compressed"


class Vendor(StrEnum):
    SIEMENS = "siemens"
    GE = "ge"
    PHILIPS = "philips"
