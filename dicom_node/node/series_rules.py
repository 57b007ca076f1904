"""Is a received series an MPRAGE-like 3D T1 volume? Configurable rules with vendor defaults.

The decision reads one header of the series. Attributes are looked up at the top level, then in the
shared and the first per-frame functional group (and the items nested one level below them), so the
same rules work for classic MR, Enhanced MR and Legacy Converted Enhanced MR objects.

A series is accepted when, in this order:

1. its SOP class is an MR image class and its ImageType has none of ``exclude_image_types``;
2. none of its names (SeriesDescription, ProtocolName, SequenceName, PulseSequenceName) matches an
   ``exclude_patterns`` regular expression, and one matches ``name_patterns`` if ``require_name_match``;
3. it is 3D (``MRAcquisitionType``), gradient echo (``ScanningSequence`` GR or ``EchoPulseSequence``
   GRADIENT/BOTH) and inversion-prepared (``ScanningSequence`` IR, ``InversionTime`` > 0,
   ``InversionTimes`` or ``InversionRecovery`` YES) as far as the ``require_*`` switches ask; with
   ``inversion_implied_by_name`` a vendor name (MPRAGE, BRAVO, T1 TFE ...) stands in for inversion
   headers some scanners do not write (Philips 3D T1 TFE, e.g. T1W_3D_TFE).

Patterns are case-insensitive and searched anywhere in a name. The default patterns cover Siemens
(MPRAGE, ``*tfl3d``), GE (BRAVO, IR-FSPGR, ``efgre3d``) and Philips (3D T1 TFE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.config import MprageSection
from dicom_node.node.instances import MR_IMAGE_STORAGE
from pipeline.acquisition import functional_group_items

NAME_KEYWORDS = ("SeriesDescription", "ProtocolName", "SequenceName", "PulseSequenceName")


@dataclass(frozen=True)
class Decision:
    """Accepted or not, and why (one line for the log and ``synthmrf jobs``)."""

    accepted: bool
    reason: str


def lookup(ds: Dataset, keyword: str) -> object:
    """The first value of ``keyword`` at the top level or in the functional groups; None if absent."""
    for item in functional_group_items(ds):
        value = item.get(keyword)
        if value not in (None, ""):
            return value
    return None


def _words(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value.upper()]
    try:
        return [str(v).upper() for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return [str(value).upper()]


def _positive(value: object) -> bool:
    try:
        values = [float(v) for v in value] if not isinstance(value, str | int | float) else [float(value)]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return any(v > 0 for v in values)


def names_of(ds: Dataset) -> dict[str, str]:
    return {k: str(v) for k in NAME_KEYWORDS if (v := lookup(ds, k)) not in (None, "")}


def classify(ds: Dataset, rules: MprageSection) -> Decision:
    """Decide whether the series whose header is ``ds`` is processed, with the reason."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in MR_IMAGE_STORAGE:
        name = getattr(ds.get("SOPClassUID"), "name", sop_class) or "absent"
        return Decision(False, f"not an MR image (SOP class {name})")
    image_type = _words(lookup(ds, "ImageType")) + _words(lookup(ds, "FrameType"))
    excluded = sorted(set(image_type) & {t.upper() for t in rules.exclude_image_types})
    if excluded:
        return Decision(False, f"image type {'/'.join(excluded)} is excluded")
    names = names_of(ds)
    shown = ", ".join(f"{k} {v!r}" for k, v in names.items()) or "no series/protocol/sequence names"
    for pattern in rules.exclude_patterns:
        hit = next((k for k, v in names.items() if re.search(pattern, v, re.IGNORECASE)), None)
        if hit:
            return Decision(False, f"{hit} {names[hit]!r} matches exclude pattern '{pattern}'")
    name_match = next((p for p in rules.name_patterns for v in names.values() if re.search(p, v, re.IGNORECASE)),
                      None)
    if rules.require_name_match and name_match is None:
        return Decision(False, f"no name matches the MPRAGE patterns ({shown})")
    acquisition = str(lookup(ds, "MRAcquisitionType") or "").upper()
    if rules.require_3d and acquisition != "3D":
        return Decision(False, f"not a 3D acquisition (MRAcquisitionType {acquisition or 'absent'})")
    scanning = _words(lookup(ds, "ScanningSequence"))
    echo = str(lookup(ds, "EchoPulseSequence") or "").upper()
    gradient = "GR" in scanning or echo in ("GRADIENT", "BOTH")
    if rules.require_gradient_echo and not gradient:
        return Decision(False, f"not gradient echo (ScanningSequence {'/'.join(scanning) or 'absent'}"
                               f"{', EchoPulseSequence ' + echo if echo else ''})")
    inversion_evidence = [
        "ScanningSequence IR" if "IR" in scanning else "",
        "InversionTime" if _positive(lookup(ds, "InversionTime")) else "",
        "InversionTimes" if _positive(lookup(ds, "InversionTimes")) else "",
        "InversionRecovery YES" if str(lookup(ds, "InversionRecovery") or "").upper() == "YES" else "",
    ]
    evidence = [e for e in inversion_evidence if e]
    if rules.require_inversion and not evidence:
        if rules.inversion_implied_by_name and name_match is not None:
            evidence = [f"name pattern '{name_match}'"]
        else:
            return Decision(False, "not inversion-prepared (no IR in ScanningSequence, no InversionTime, no "
                                   f"InversionRecovery; {shown})")
    parts = [f"3D {'gradient echo' if gradient else 'sequence'}"]
    if evidence:
        parts.append("inversion-prepared (" + ", ".join(evidence) + ")")
    if name_match:
        parts.append(f"name matches '{name_match}'")
    return Decision(True, "MPRAGE-like: " + ", ".join(parts))
