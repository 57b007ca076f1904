"""Where a map came from: model, MRF sequence and software, as the DICOM results record it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from highdicom.sr import CodedConcept, ContainerContentItem, ContentSequence, RelationshipTypeValues, TextContentItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipeline.contrasts import Contrast
from pipeline.dicom_series import RESULT_MANUFACTURER

MANUFACTURER = RESULT_MANUFACTURER  # read_series refuses this manufacturer's objects as input
MANUFACTURER_MODEL_NAME = "synthMRF"
DEVICE_SERIAL_NUMBER = "synthmrf"  # software: no hardware serial number
LO_MAX = 64  # DICOM Long String
MODEL_LABEL_MAX = 40  # "synthMRF T1 map; model " + label fits one LO (ContentDescription)
SOFTWARE_PREFIX = "synthmrf "
SEQUENCE_PREFIX = "MRF sequence "
SEQUENCE_HASH_SHOWN = 16  # hex digits of the sequence hash in SoftwareVersions (the full hash is in the text)
FLAG_PREFIX = "OUT OF RANGE: "  # SeriesDescription of every result series of a flagged study
FLAG_NOTE = "FLAGGED: input or result outside the model's validated range, interpret with caution"
READING_NOTE_LEAD = "How to read these values: "  # a report's Comment carrying the model's reading note
READING_NOTE_MAX = 400  # a model's reading note in DerivationDescription (ST, 1024) beside the provenance and a flag
COMMENT_MAX = 1024  # of ImageComments (LT allows 10240): reasons are one line each, a few of them
CONTRAST_COMMENT = ("Synthetic image, not acquired: computed from the synthMRF T1, T2 and PD maps by a signal "
                    "equation (see Derivation Description); not for primary diagnosis without the acquired images")
QUALITY_COMMENT = ("Q: how well the synthesised MRF signal fits the dictionary; 1 = on the dictionary manifold, "
                   "0 = misfit angle of 15 degrees or more")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # the flag in an SR (TID 1500 row 12)
_HEX = re.compile(r"[0-9a-f]{16,64}")
_PRINTABLE = re.compile(r"[ -\[\]-~]+")  # printable ASCII without the backslash (DICOM's value delimiter)


@dataclass(frozen=True)
class Provenance:
    """Model name and version, the MRF sequence hash (lower-case hex), the synthmrf version and the model's reading
    note (how to read its maps; empty for a model without one)."""

    model_name: str
    model_version: str
    sequence_hash: str
    software_version: str
    reading_note: str = ""

    def __post_init__(self) -> None:
        for field in ("model_name", "model_version", "software_version"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"{field}: expected str, got {type(value).__name__}")
            if not _PRINTABLE.fullmatch(value) or value != value.strip():
                raise ValueError(f"{field}: must be non-empty printable ASCII without backslash or surrounding "
                                 f"spaces, got {value!r}")
        if self.reading_note and (not isinstance(self.reading_note, str) or len(self.reading_note) > READING_NOTE_MAX
                                  or not _PRINTABLE.fullmatch(self.reading_note)):
            raise ValueError(f"reading_note: at most {READING_NOTE_MAX} characters of printable ASCII without "
                             f"backslash, got {str(self.reading_note)[:60]!r}")
        if not isinstance(self.sequence_hash, str) or not _HEX.fullmatch(self.sequence_hash):
            raise ValueError(f"sequence_hash: expected 16 to 64 lower-case hex digits, got {self.sequence_hash!r}")
        if len(self.model_label) > MODEL_LABEL_MAX:
            raise ValueError(f"model_name, model_version: {self.model_label!r} is {len(self.model_label)} characters "
                             f"together, at most {MODEL_LABEL_MAX} fit the DICOM descriptions")
        if len(SOFTWARE_PREFIX + self.software_version) > LO_MAX:
            raise ValueError(f"software_version: at most {LO_MAX - len(SOFTWARE_PREFIX)} characters, got "
                             f"{len(self.software_version)}")

    @property
    def model_label(self) -> str:
        return f"{self.model_name} {self.model_version}"

    @property
    def software_versions(self) -> tuple[str, str, str]:
        """SoftwareVersions values (each a DICOM LO): synthmrf, the model, the sequence hash (abbreviated)."""
        return (SOFTWARE_PREFIX + self.software_version, self.model_label,
                SEQUENCE_PREFIX + self.sequence_hash[:SEQUENCE_HASH_SHOWN])

    def content_description(self, quantity: str) -> str:
        """A one-line summary for ContentDescription (LO)."""
        return f"synthMRF {quantity} map; model {self.model_label}"

    def contrast_derivation(self, contrast: Contrast) -> str:
        """DerivationDescription of a synthetic contrast: computed, not acquired, how, and the model's reading note."""
        return (f"synthetic {contrast.description}, NOT ACQUIRED: computed from the synthMRF T1, T2 and PD maps by "
                f"{contrast.equation}; model {self.model_label}; MRF sequence sha256 {self.sequence_hash}; "
                f"synthmrf {self.software_version}{self._note()}")

    def regions_derivation(self) -> str:
        """DerivationDescription of the regions' Segmentation: how the regions were found, on which maps."""
        return ("synthMRF regions: the AAL3 atlas carried onto the patient by affine and demons registration to the "
                "MNI template, kept inside the brain mask where the tissue class of the T1/T2 maps fits the structure; "
                f"model {self.model_label}; MRF sequence sha256 {self.sequence_hash}; synthmrf {self.software_version}")

    def derivation_description(self, quantity: str) -> str:
        """Full provenance for DerivationDescription (ST), the sequence hash unabbreviated, and the model's reading
        note."""
        return (f"synthMRF {quantity} map from a 3D T1-weighted (MPRAGE) series by synthetic MR fingerprinting; "
                f"model {self.model_label}; MRF sequence sha256 {self.sequence_hash}; "
                f"synthmrf {self.software_version}{self._note()}")

    def _note(self) -> str:
        return f"; how to read it: {self.reading_note}" if self.reading_note else ""


def flag_comment(reasons: Sequence[str]) -> str:
    """ImageComments text of a flagged result: the note and the reasons, printable ASCII, at most COMMENT_MAX."""
    text = f"{FLAG_NOTE}: " + "; ".join(r.strip() for r in reasons)
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= COMMENT_MAX else text[: COMMENT_MAX - 3] + "..."


def comment_in_report(sr: Dataset, text: str) -> None:
    """``text`` as a Comment in the Qualitative Evaluations container of a TID 1500 report (at its end)."""
    contains = RelationshipTypeValues.CONTAINS
    container = next((item for item in sr.ContentSequence if item.ValueType == "CONTAINER"
                      and CodedConcept.from_dataset(item.ConceptNameCodeSequence[0]) == QUALITATIVE_EVALUATIONS), None)
    if container is None:
        container = ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
        container.ContentSequence = ContentSequence()
        sr.ContentSequence.append(container)
    container.ContentSequence.append(TextContentItem(name=codes.DCM.Comment, value=text, relationship_type=contains))


def flag_result(ds: Dataset, reasons: Sequence[str]) -> None:
    """Mark ``ds`` (a result instance) as flagged: SeriesDescription and, in an image, ImageComments and
    DerivationDescription; an SR (which has neither) gets the comment in its report's Qualitative Evaluations."""
    ds.SeriesDescription = (FLAG_PREFIX + str(ds.SeriesDescription))[:LO_MAX]
    comment = flag_comment(reasons)
    if ds.Modality == "SR":
        comment_in_report(ds, comment)
        return
    ds.ImageComments = f"{ds.ImageComments}\n{comment}" if ds.get("ImageComments") else comment
    ds.DerivationDescription = f"{ds.DerivationDescription}; {FLAG_NOTE} (reasons in Image Comments)"
