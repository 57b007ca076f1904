"""The acquisition protocol of an MPRAGE-family series, read from its DICOM header or BIDS sidecar.

Vendors put different quantities into the same attributes (:mod:`pipeline.protocol`):

- Siemens MPRAGE (``*tfl3d1``): RepetitionTime is the time between inversions (the shot interval);
  the echo spacing is not in a public attribute.
- GE IR-FSPGR / BRAVO (``efgre3d``, ScanOptions ``IR_GEMS``): RepetitionTime is the echo spacing;
  InversionTime is the prep time; the shot interval is not in a public attribute.
- Philips 3D T1-TFE (``T1TFE``): RepetitionTime is the echo spacing; InversionTime is often absent.

One rule holds for every vendor: a RepetitionTime below 30 ms is the echo spacing, above 500 ms the
shot interval; anything between is refused. A value a header does not state (absent, empty or zero)
comes from :data:`pipeline.protocol.FAMILY_DEFAULTS` and is named in ``assumed``; so is the family
when nothing in the header points to one, and the field strength (3 T) when neither
MagneticFieldStrength nor ImagingFrequency is given. Impossible values raise :class:`ProtocolError`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pipeline.protocol import FAMILY_DEFAULTS, AcquisitionProtocol, Family

logger = logging.getLogger(__name__)

ECHO_SPACING_MAX_MS = 30.0  # a RepetitionTime below this is the echo spacing (GE, Philips)
SHOT_INTERVAL_MIN_MS = 500.0  # above this, the time between inversions (Siemens)
GYROMAGNETIC_MHZ_PER_T = 42.577  # 1H
FIELD_STRENGTHS_T = (1.5, 3.0, 7.0)  # ImagingFrequency is snapped to these when within 10 %
DEFAULT_FIELD_STRENGTH_T = 3.0
OVERRIDABLE = ("family", "field_strength_t", "ti_ms", "shot_interval_ms", "echo_spacing_ms", "flip_angle_deg",
               "te_ms")
# Names that identify a family, whatever the Manufacturer says (anonymisers sometimes blank it).
NAME_FAMILIES = ((re.compile(r"mp.?rage|tfl", re.IGNORECASE), Family.MPRAGE),
                 (re.compile(r"bravo|fspgr|efgre3d", re.IGNORECASE), Family.IR_FSPGR),
                 (re.compile(r"tfe", re.IGNORECASE), Family.TFE))


class ProtocolError(ValueError):
    """A header, sidecar or override states an impossible acquisition; the message names the value."""


@dataclass(frozen=True)
class _Header:
    """What a header or sidecar says, vendor-neutral: times in ms, None where not stated."""

    where: str
    manufacturer: str
    sequence_names: tuple[str, ...]  # SequenceName, PulseSequenceName, PulseSequenceDetails
    other_names: tuple[str, ...]  # ProtocolName, SeriesDescription
    scanning: tuple[str, ...]  # ScanningSequence words
    variant: tuple[str, ...]  # SequenceVariant words
    scan_options: tuple[str, ...]  # ScanOptions values, upper case
    inversion_recovery: bool  # Enhanced MR InversionRecovery YES
    repetition_ms: float | None
    inversion_ms: float | None
    echo_ms: float | None
    flip_deg: float | None
    field_t: float | None
    frequency_mhz: float | None


def _number(value: object, name: str, where: str) -> float | None:
    """A stated, non-negative number (the first of several); None where absent, empty or zero."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{where}: {name} {value!r} is not a number") from exc
    if number != number or number < 0:  # NaN or negative
        raise ProtocolError(f"{where}: {name} {value!r} is impossible")
    return number or None


def _words(value: object) -> tuple[str, ...]:
    """Code strings of a CS value, upper case: a DICOM multi-value or backslash-joined text."""
    if value is None:
        return ()
    items = [str(v) for v in value] if isinstance(value, MultiValue | list | tuple) else str(value).split("\\")
    return tuple(w.strip().upper() for w in items if w.strip())


def _named_family(names: tuple[str, ...]) -> Family | None:
    return next((family for pattern, family in NAME_FAMILIES if any(pattern.search(n) for n in names)), None)


def _family(h: _Header) -> tuple[Family, bool]:
    """The family and whether it is only assumed (nothing in the header points to one).

    Sequence names first, then GE's IR_GEMS scan option, then protocol and series names, then the vendor.
    """
    gems_ir = any("IR_GEMS" in option for option in h.scan_options)
    family = _named_family(h.sequence_names) or (Family.IR_FSPGR if gems_ir else _named_family(h.other_names))
    if family is not None:
        return family, False
    vendor = h.manufacturer.upper()
    if "SIEMENS" in vendor or ("MP" in h.variant and (h.repetition_ms or 0) > SHOT_INTERVAL_MIN_MS):
        return Family.MPRAGE, False
    if re.search(r"\bGE\b", vendor):
        return Family.IR_FSPGR, False
    if "PHILIPS" in vendor:
        return Family.TFE, False
    return Family.MPRAGE, True


def _field_strength(h: _Header) -> float | None:
    if h.field_t is not None:
        return h.field_t / 10000.0 if h.field_t > 100 else h.field_t  # some old headers give gauss
    if h.frequency_mhz is None:
        return None
    tesla = h.frequency_mhz / GYROMAGNETIC_MHZ_PER_T
    nearest = min(FIELD_STRENGTHS_T, key=lambda f: abs(f - tesla))
    return nearest if abs(nearest - tesla) <= 0.1 * nearest else round(tesla, 2)


def _protocol(h: _Header) -> AcquisitionProtocol:
    family, family_assumed = _family(h)
    values = dict(FAMILY_DEFAULTS[family])
    assumed: list[str] = []
    tr = h.repetition_ms
    if tr is None:
        assumed += ["shot_interval_ms", "echo_spacing_ms"]
    elif tr < ECHO_SPACING_MAX_MS:
        values["echo_spacing_ms"] = tr
        assumed.append("shot_interval_ms")
    elif tr > SHOT_INTERVAL_MIN_MS:
        values["shot_interval_ms"] = tr
        assumed.append("echo_spacing_ms")
    else:
        raise ProtocolError(f"{h.where}: RepetitionTime {tr:g} ms is neither an echo spacing (< "
                            f"{ECHO_SPACING_MAX_MS:g} ms, GE and Philips) nor a time between inversions (> "
                            f"{SHOT_INTERVAL_MIN_MS:g} ms, Siemens)")
    for name, stated in (("ti_ms", h.inversion_ms), ("flip_angle_deg", h.flip_deg), ("te_ms", h.echo_ms)):
        if stated is None:
            assumed.append(name)
        else:
            values[name] = stated
    field_t = _field_strength(h)
    if field_t is None:
        field_t = DEFAULT_FIELD_STRENGTH_T
        assumed.append("field_strength_t")
    if family_assumed:
        assumed.append("family")
    inverted = ("IR" in h.scanning or "MP" in h.variant or h.inversion_recovery or h.inversion_ms is not None
                or any(o == "IR" or "IR_GEMS" in o for o in h.scan_options) or _named_family(h.sequence_names))
    if not inverted:
        logger.warning("%s: no inversion in the header (ScanningSequence, SequenceVariant, InversionTime, name); "
                       "read as an MPRAGE-family series with the %s defaults", h.where, family.value)
    protocol = AcquisitionProtocol(family, round(field_t, 3), **{k: round(v, 3) for k, v in values.items()},
                                   manufacturer=h.manufacturer, assumed=tuple(assumed))
    return _checked(protocol, h.where)


def _checked(protocol: AcquisitionProtocol, where: str) -> AcquisitionProtocol:
    """``protocol`` if it is physically possible, else :class:`ProtocolError` naming the value."""
    numbers = {name: float(getattr(protocol, name)) for name in OVERRIDABLE[1:]}
    bad = [f"{name} {value:g}" for name, value in numbers.items() if not value > 0]
    if bad:
        raise ProtocolError(f"{where}: {', '.join(bad)}: must be positive")
    if protocol.flip_angle_deg > 90:
        raise ProtocolError(f"{where}: flip angle {protocol.flip_angle_deg:g} deg: at most 90 in an MPRAGE-family "
                            "readout")
    if protocol.echo_spacing_ms >= ECHO_SPACING_MAX_MS:
        raise ProtocolError(f"{where}: echo spacing {protocol.echo_spacing_ms:g} ms: expected < "
                            f"{ECHO_SPACING_MAX_MS:g} ms (the time between readout pulses)")
    if protocol.shot_interval_ms <= SHOT_INTERVAL_MIN_MS:
        raise ProtocolError(f"{where}: shot interval {protocol.shot_interval_ms:g} ms: expected > "
                            f"{SHOT_INTERVAL_MIN_MS:g} ms (the time between inversions; GE and Philips write the "
                            "echo spacing as RepetitionTime)")
    if protocol.ti_ms >= protocol.shot_interval_ms:
        which = " (assumed)" if "shot_interval_ms" in protocol.assumed else ""
        raise ProtocolError(f"{where}: InversionTime {protocol.ti_ms:g} ms is not shorter than the shot interval "
                            f"{protocol.shot_interval_ms:g} ms{which}")
    return protocol


def functional_group_items(ds: Dataset) -> Iterator[Dataset]:
    """``ds``, then its shared and first per-frame functional groups and the items one level below them."""
    yield ds
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(keyword)
        if not seq:
            continue
        yield seq[0]
        for elem in seq[0]:
            if elem.VR == "SQ" and elem.value:
                yield elem.value[0]


def _lookup(ds: Dataset, *keywords: str) -> object:
    """The first stated value of any of ``keywords`` (classic, Enhanced or Legacy Converted MR); None if absent."""
    for item in functional_group_items(ds):
        for keyword in keywords:
            try:
                value = item.get(keyword)
            except ValueError as exc:  # pydicom converts raw values on access
                raise ProtocolError(f"series {ds.get('SeriesInstanceUID', '?')}: {keyword} unreadable ({exc})") from exc
            if value not in (None, ""):
                return value
    return None


def protocol_from_dicom(ds: Dataset) -> AcquisitionProtocol:
    """The protocol of the series whose (representative) header is ``ds``."""
    where = f"series {ds.get('SeriesInstanceUID', '?')}"

    def number(name: str, *keywords: str) -> float | None:
        return _number(_lookup(ds, *keywords), name, where)

    def names(*keywords: str) -> tuple[str, ...]:
        return tuple(str(v) for k in keywords if (v := _lookup(ds, k)) is not None)

    header = _Header(
        where, str(ds.get("Manufacturer", "") or ""), names("SequenceName", "PulseSequenceName"),
        names("ProtocolName", "SeriesDescription"), _words(_lookup(ds, "ScanningSequence")),
        _words(_lookup(ds, "SequenceVariant")), _words(_lookup(ds, "ScanOptions")),
        str(_lookup(ds, "InversionRecovery") or "").upper() == "YES",
        number("RepetitionTime", "RepetitionTime"), number("InversionTime", "InversionTime", "InversionTimes"),
        number("EchoTime", "EchoTime", "EffectiveEchoTime"), number("FlipAngle", "FlipAngle"),
        number("MagneticFieldStrength", "MagneticFieldStrength"),
        number("ImagingFrequency", "ImagingFrequency", "TransmitterFrequency"))
    return _protocol(header)


def protocol_from_sidecar(path: Path) -> AcquisitionProtocol:
    """The protocol in a BIDS sidecar as dcm2niix writes it (times in seconds, FlipAngle in degrees)."""
    where = str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{where}: unreadable sidecar ({exc})") from exc
    if not isinstance(doc, dict):
        raise ProtocolError(f"{where}: expected a JSON object, got {type(doc).__name__}")

    def ms(key: str) -> float | None:
        seconds = _number(doc.get(key), key, where)
        if seconds is not None and seconds > 100:
            raise ProtocolError(f"{where}: {key} {seconds:g}: BIDS sidecars give seconds, not milliseconds")
        return None if seconds is None else seconds * 1000.0

    def codes(key: str) -> tuple[str, ...]:  # dcm2niix joins ScanningSequence and SequenceVariant with "_"
        return tuple(w for v in _words(doc.get(key)) for w in v.split("_"))

    def names(*keys: str) -> tuple[str, ...]:
        return tuple(str(doc[k]) for k in keys if doc.get(k) not in (None, ""))

    header = _Header(
        where, str(doc.get("Manufacturer", "") or ""),
        names("SequenceName", "PulseSequenceName", "PulseSequenceDetails"), names("ProtocolName", "SeriesDescription"),
        codes("ScanningSequence"), codes("SequenceVariant"), _words(doc.get("ScanOptions")), False,
        ms("RepetitionTime"), ms("InversionTime"), ms("EchoTime"),
        _number(doc.get("FlipAngle"), "FlipAngle", where),
        _number(doc.get("MagneticFieldStrength"), "MagneticFieldStrength", where),
        _number(doc.get("ImagingFrequency"), "ImagingFrequency", where))
    return _protocol(header)


def sidecar_for(nifti: Path) -> Path | None:
    """The BIDS sidecar beside ``nifti`` (``x.nii.gz`` or ``x.nii`` -> ``x.json``), if there is one."""
    name = nifti.name
    stem = name[:-len(".nii.gz")] if name.endswith(".nii.gz") else name[:-len(".nii")] if name.endswith(".nii") \
        else None
    if stem is None:
        return None
    sidecar = nifti.with_name(f"{stem}.json")
    return sidecar if sidecar.is_file() else None


def protocol_with_overrides(base: AcquisitionProtocol | None, **values: float | str | None) -> AcquisitionProtocol:
    """``base`` with the values a user gave (keywords of :data:`OVERRIDABLE`; None: not given).

    Overridden fields leave ``assumed``; a new family replaces the values ``base`` assumed with its
    own defaults. Without ``base``: the family's defaults (MPRAGE unless given) at 3 T, all assumed.
    """
    unknown = sorted(set(values) - set(OVERRIDABLE))
    if unknown:
        raise TypeError(f"protocol_with_overrides: unknown {unknown}; expected some of {list(OVERRIDABLE)}")
    given = {k: v for k, v in values.items() if v is not None}
    try:
        family = Family(str(given.pop("family"))) if "family" in given else None
    except ValueError as exc:
        raise ProtocolError(f"family {values['family']!r}: expected one of {[f.value for f in Family]}") from exc
    if base is None:
        start = family or Family.MPRAGE
        base = AcquisitionProtocol(start, DEFAULT_FIELD_STRENGTH_T, **FAMILY_DEFAULTS[start], manufacturer="",
                                   assumed=("field_strength_t", *FAMILY_DEFAULTS[start], "family"))
    changes: dict[str, object] = {}
    if family is not None:
        changes = {"family": family, **{k: v for k, v in FAMILY_DEFAULTS[family].items() if k in base.assumed}}
    for name, value in given.items():
        try:
            changes[name] = float(value)
        except ValueError as exc:
            raise ProtocolError(f"{name} {value!r}: not a number") from exc
    overridden = set(given) | ({"family"} if family is not None else set())
    assumed = tuple(a for a in base.assumed if a not in overridden)
    return _checked(replace(base, **changes, assumed=assumed), "override")  # type: ignore[arg-type]
