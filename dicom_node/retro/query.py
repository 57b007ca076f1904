"""C-FIND SCU (Study Root): studies, their series, a series' instances; the user's ``KEY=VALUE`` keys;
and the MPRAGE pre-filter on series-level attributes.

``--query KEY=VALUE`` takes DICOM keywords. Patient and study attributes (PatientID, StudyDate,
AccessionNumber, StudyDescription, ModalitiesInStudy ...) go into the study-level query; every other
keyword (Modality, SeriesDescription, ProtocolName, SeriesNumber ...) into the series-level query.
``Modality=MR`` also narrows the study level (``ModalitiesInStudy=MR``). Values use DICOM matching
(PS3.4 C.2.2.2): ``*`` and ``?`` wildcards, ``A-B`` ranges for dates and times, ``\\``-separated UID
lists; a query with a non-ASCII value is sent as UTF-8 (SpecificCharacterSet ``ISO_IR 192``).
Archives differ in what they honour, so every key is checked again on what comes back
(case-insensitively; an attribute the archive did not return is not held against a match). Series-level
text keys with wildcards (``SeriesDescription=*MPRAGE*``) are not sent to the archive at all but matched
here, case-insensitively: archives match them case-sensitively and vendors differ in case. Study-level
keys are always sent (they narrow the search); their text wildcards are then case-sensitive.

The pre-filter runs the node's own rules (:func:`dicom_node.node.series_rules.classify`) on the
series-level answer. C-FIND answers often lack the acquisition attributes; a rule whose attributes
came back empty is not applied (the node applies every rule to the received series anyway), so the
pre-filter only drops series that the answer shows are not MPRAGE-like (2D, spin echo, a localizer,
derived, a non-MR modality ...).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import MRImageStorage
from pynetdicom.association import Association

from dicom_node.config import MprageSection
from dicom_node.dimse.status import (
    CANCELLED,
    PENDING,
    PENDING_OPTIONAL_KEYS,
    SUCCESS,
)
from dicom_node.node.series_rules import Decision, classify
from dicom_node.retro.association import (
    FIND_MODEL,
    Archive,
    ArchiveError,
    ArchiveUnavailableError,
    status_text,
)

logger = logging.getLogger(__name__)

STUDY_KEYS = frozenset({
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "OtherPatientIDs", "IssuerOfPatientID",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ModalitiesInStudy", "ReferringPhysicianName", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    "SOPClassesInStudy", "InstitutionName",
})
STUDY_RETURN = ("StudyInstanceUID", "PatientID", "IssuerOfPatientID", "StudyDate", "StudyDescription",
                "ModalitiesInStudy", "NumberOfStudyRelatedSeries")
SERIES_RETURN = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "ProtocolName", "SequenceName",
                 "ImageType", "MRAcquisitionType", "ScanningSequence", "SequenceVariant", "InversionTime",
                 "NumberOfSeriesRelatedInstances", "BodyPartExamined", "SeriesDate")
RESERVED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
UTF8 = "ISO_IR 192"  # PS3.3 C.12.1.1.2: Unicode in UTF-8


class QueryError(ValueError):
    """A ``KEY=VALUE`` query term is malformed or names no DICOM attribute."""


@dataclass(frozen=True)
class Query:
    """The user's matching keys, split by level."""

    study: Mapping[str, str]
    series: Mapping[str, str]

    @property
    def terms(self) -> dict[str, str]:
        return {**self.study, **self.series}


def parse_query(terms: Sequence[str] | Mapping[str, str]) -> Query:
    """``["Modality=MR", "StudyDate=20100101-20151231"]`` (or a mapping) as a :class:`Query`."""
    pairs: list[tuple[str, str]] = []
    if isinstance(terms, Mapping):
        pairs = [(str(k), str(v)) for k, v in terms.items()]
    else:
        for term in terms:
            key, sep, value = term.partition("=")
            if not sep or not key.strip():
                raise QueryError(f"query term {term!r}: expected KEY=VALUE with a DICOM keyword, e.g. Modality=MR")
            pairs.append((key.strip(), value.strip()))
    study: dict[str, str] = {}
    series: dict[str, str] = {}
    for key, value in pairs:
        if key in RESERVED or tag_for_keyword(key) is None:
            raise QueryError(f"query key {key!r}: not a DICOM keyword usable in a query (e.g. StudyDate, "
                             "SeriesDescription, PatientID)")
        if key in study or key in series:
            raise QueryError(f"query key {key!r}: given twice")
        (study if key in STUDY_KEYS else series)[key] = value
    if "Modality" in series and "ModalitiesInStudy" not in study and series["Modality"]:
        study["ModalitiesInStudy"] = series["Modality"]
    return Query(study, series)


def redacted(terms: Mapping[str, str]) -> dict[str, str]:
    """Query terms for a log line: values of patient-identifying keys replaced by ``***``."""
    identifying = ("Patient", "OtherPatient", "AccessionNumber", "ReferringPhysician", "IssuerOfPatient")
    return {k: ("***" if k.startswith(identifying) else v) for k, v in terms.items()}


def _value_matches(pattern: str, value: str, vr: str) -> bool:
    pattern, value = pattern.strip(), value.strip()
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, _, high = pattern.partition("-")
        return (not low or value >= low.strip()) and (not high or value[:len(high.strip())] <= high.strip())
    if vr == "UI":
        return value in {p.strip() for p in pattern.split("\\")}
    return fnmatch.fnmatchcase(value.upper(), pattern.upper().replace("[", "[[]"))


def _local_only(keyword: str, pattern: str) -> bool:
    """Text wildcards at series level are matched here only: archives match them case-sensitively (as PS3.4
    says for most VRs), and vendors differ in case ('t1_mprage_sag' versus 'Sag 3D MPRAGE')."""
    return ("*" in pattern or "?" in pattern) and dictionary_VR(keyword) in ("LO", "SH", "CS", "ST", "LT", "UT")


def matches(ds: Dataset, keys: Mapping[str, str]) -> bool:
    """Does ``ds`` (a C-FIND answer) match every key? Empty patterns and unreturned attributes match."""
    for key, pattern in keys.items():
        if not pattern or pattern == "*":
            continue
        raw = ds.get(key)
        if raw is None or raw == "":
            continue
        values = [str(v) for v in raw] if isinstance(raw, list | tuple | MultiValue) else [str(raw)]
        vr = dictionary_VR(key)
        if not any(_value_matches(pattern, v, vr) for v in values):
            return False
    return True


def _identifier(level: str, keys: Mapping[str, str], returned: Sequence[str]) -> Dataset:
    ds = Dataset()
    if not all(value.isascii() for value in keys.values()):
        ds.SpecificCharacterSet = UTF8  # the values are then encoded as UTF-8 (default repertoire: ASCII)
    ds.QueryRetrieveLevel = level
    for key in returned:
        setattr(ds, key, "")
    for key, value in keys.items():
        setattr(ds, key, value)
    return ds


def find(assoc: Association, archive: Archive, identifier: Dataset) -> Iterator[Dataset]:
    """Run one C-FIND and yield the matches as they come; raises :class:`ArchiveError` on a failure
    status, :class:`ArchiveUnavailableError` on a timeout or a lost association."""
    level = identifier.QueryRetrieveLevel
    assoc.dimse_timeout = archive.source.find_timeout_s  # the longest silence between two responses
    responses = assoc.send_c_find(identifier, FIND_MODEL)
    for status, found in responses:
        code = int(status.Status) if status is not None and "Status" in status else None
        if code in (PENDING, PENDING_OPTIONAL_KEYS):
            if found is not None:
                yield found
            continue
        if code == SUCCESS:
            return
        if code == CANCELLED:
            raise ArchiveError(f"{archive}: C-FIND at {level} level was cancelled by the archive")
        if code is None:
            raise ArchiveUnavailableError(f"{archive}: C-FIND at {level} level: no response within "
                                          f"{archive.source.find_timeout_s:g} s or association lost")
        comment = str(status.get("ErrorComment", "")).strip()
        raise ArchiveError(f"{archive}: C-FIND at {level} level failed with status {status_text(code)}"
                           f"{': ' + comment if comment else ''}")


def find_studies(assoc: Association, archive: Archive, query: Query) -> list[Dataset]:
    """Studies matching the study-level keys (checked again locally), in the archive's order."""
    found = find(assoc, archive, _identifier("STUDY", query.study, STUDY_RETURN))
    out = []
    seen = set()
    for ds in found:
        uid = str(ds.get("StudyInstanceUID", ""))
        if uid and uid not in seen and matches(ds, query.study):
            seen.add(uid)
            out.append(ds)
    return out


def find_series(assoc: Association, archive: Archive, study_uid: str, query: Query,
                returned: Sequence[str] = SERIES_RETURN) -> list[Dataset]:
    """Series of one study matching the series-level keys (checked again locally)."""
    sent = {k: v for k, v in query.series.items() if not _local_only(k, v)}
    ident = _identifier("SERIES", sent, tuple(dict.fromkeys([*returned, *query.series])))
    ident.StudyInstanceUID = study_uid
    out = []
    for ds in find(assoc, archive, ident):
        if str(ds.get("SeriesInstanceUID", "")) and matches(ds, query.series):
            out.append(ds)
    return out


def find_instances(assoc: Association, archive: Archive, study_uid: str, series_uid: str) -> list[str]:
    """SOP Instance UIDs of one series."""
    ident = _identifier("IMAGE", {}, ("SOPInstanceUID",))
    ident.StudyInstanceUID = study_uid
    ident.SeriesInstanceUID = series_uid
    return [str(ds.SOPInstanceUID) for ds in find(assoc, archive, ident) if ds.get("SOPInstanceUID")]


def _present(ds: Dataset, keyword: str) -> bool:
    value = ds.get(keyword)
    return value is not None and value != "" and not (isinstance(value, list) and not value)


def prefilter(series: Dataset, rules: MprageSection) -> Decision:
    """Could this C-FIND series answer be an MPRAGE? The node's rules, minus those the answer cannot decide."""
    modality = str(series.get("Modality", "")).upper()
    if modality and modality != "MR":
        return Decision(False, f"modality {modality} is not MR")
    header = Dataset()
    for elem in series:
        if elem.keyword and elem.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet") and elem.value != "":
            header.add(elem)
    header.SOPClassUID = MRImageStorage  # C-FIND does not say; any MR image class passes the first rule
    undecidable = {  # rule -> the attributes it reads; a rule is relaxed when none of them came back
        "require_3d": ("MRAcquisitionType",),
        "require_gradient_echo": ("ScanningSequence", "EchoPulseSequence"),
        "require_inversion": ("ScanningSequence", "InversionTime", "InversionRecovery"),
    }
    relax = {rule: False for rule, keys in undecidable.items() if not any(_present(series, k) for k in keys)}
    unknown = [undecidable[rule][-1 if rule == "require_inversion" else 0] for rule in relax]
    decision = classify(header, rules.model_copy(update=relax) if relax else rules)
    if decision.accepted and unknown:
        return Decision(True, f"{decision.reason} (not returned by the archive: {', '.join(unknown)})")
    return decision
