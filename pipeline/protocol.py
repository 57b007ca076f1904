"""The acquisition of an MPRAGE-family series, as the networks see it.

Vendors name the same timing differently: Siemens' RepetitionTime is the time between inversions and
InversionTime runs from the inversion to the centre of k-space; GE (IR-FSPGR/BRAVO) and Philips (3D
T1-TFE) put the *echo spacing* in RepetitionTime, and the time between inversions is not in a public
attribute. :class:`AcquisitionProtocol` holds the physical quantities; readers of headers and sidecars
fill in what they know and say what they assumed.

The networks receive the protocol as :func:`protocol_features`: a short vector of scaled numbers and
a one-hot family, given to every U-Net as constant input planes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np


class Family(StrEnum):
    """MPRAGE-type sequence families: inversion-prepared 3D spoiled gradient echo."""

    MPRAGE = "mprage"  # Siemens MPRAGE (tfl3d), also GE/Philips sequences that call themselves MPRAGE
    IR_FSPGR = "ir-fspgr"  # GE IR-prepared fast SPGR (BRAVO)
    TFE = "tfe"  # Philips 3D T1-TFE with an inversion prepulse


FAMILY_DEFAULTS: dict[Family, dict[str, float]] = {
    # Typical values, used where a header does not say (the reader records each one it assumed).
    Family.MPRAGE: {"shot_interval_ms": 2300.0, "echo_spacing_ms": 7.0, "ti_ms": 900.0, "flip_angle_deg": 9.0,
                    "te_ms": 2.9},
    Family.IR_FSPGR: {"shot_interval_ms": 2000.0, "echo_spacing_ms": 7.5, "ti_ms": 450.0, "flip_angle_deg": 12.0,
                      "te_ms": 3.0},
    Family.TFE: {"shot_interval_ms": 2500.0, "echo_spacing_ms": 8.0, "ti_ms": 900.0, "flip_angle_deg": 8.0,
                 "te_ms": 3.7},
}


@dataclass(frozen=True)
class AcquisitionProtocol:
    """Physical timing of one MPRAGE-family acquisition (ms, degrees, tesla).

    ``ti_ms`` is the InversionTime as the header states it (Siemens and Philips: inversion to the
    k-space centre; GE: the "prep time"); ``shot_interval_ms`` the time between inversions;
    ``assumed`` names the fields that came from :data:`FAMILY_DEFAULTS`, not from the data.
    """

    family: Family
    field_strength_t: float
    ti_ms: float
    shot_interval_ms: float
    echo_spacing_ms: float
    flip_angle_deg: float
    te_ms: float
    manufacturer: str = ""
    assumed: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, object]:
        doc = asdict(self)
        doc["family"] = self.family.value
        doc["assumed"] = list(self.assumed)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, object]) -> AcquisitionProtocol:
        values = dict(doc)
        values["family"] = Family(str(values["family"]))
        values["assumed"] = tuple(values.get("assumed", ()))  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


PAPER_PROTOCOL = AcquisitionProtocol(Family.MPRAGE, 3.0, 900.0, 2130.0, 7.0, 8.0, 2.6, "GE MEDICAL SYSTEMS")
"""McGee 2024's MPRAGE (GE 3 T): the protocol of the phantom world v1 and of models up to 0.2."""

FEATURE_NAMES = ("field_strength", "ti", "shot_interval", "echo_spacing", "flip_angle", "te",
                 *(f"family_{f.value}" for f in Family))
N_FEATURES = len(FEATURE_NAMES)


def protocol_features(protocol: AcquisitionProtocol) -> np.ndarray:
    """The networks' view of ``protocol``: (N_FEATURES,) float32, each number scaled to about [-1, 1]."""
    numbers = [
        (protocol.field_strength_t - 2.25) / 0.75,  # 1.5 T -> -1, 3 T -> +1
        (protocol.ti_ms - 800.0) / 400.0,
        (protocol.shot_interval_ms - 2300.0) / 500.0,
        (protocol.echo_spacing_ms - 7.0) / 2.0,
        (protocol.flip_angle_deg - 9.0) / 3.0,
        (protocol.te_ms - 3.0) / 1.5,
    ]
    one_hot = [1.0 if protocol.family is f else 0.0 for f in Family]
    return np.asarray(numbers + one_hot, dtype=np.float32)


RANGED_FIELDS = ("field_strength_t", "ti_ms", "shot_interval_ms", "echo_spacing_ms", "flip_angle_deg", "te_ms")


def protocol_ranges(protocols: list[AcquisitionProtocol]) -> dict[str, object]:
    """What a model was trained on: the families and (min, max) of every ranged field, for its package."""
    if not protocols:
        raise ValueError("protocols: empty")
    doc: dict[str, object] = {"families": sorted({p.family.value for p in protocols}),
                              "field_strengths_t": sorted({float(p.field_strength_t) for p in protocols})}
    for name in RANGED_FIELDS[1:]:
        values = [float(getattr(p, name)) for p in protocols]
        doc[name] = [round(min(values), 3), round(max(values), 3)]
    return doc


def out_of_range(protocol: AcquisitionProtocol, ranges: dict[str, object], *,
                 tolerance: float = 0.05) -> list[str]:
    """Reasons ``protocol`` lies outside ``ranges`` (empty when inside), each naming the parameter.

    Numeric ranges are widened by ``tolerance`` (relative) on each side; fields the reader only
    assumed are not judged (they say nothing about the data).
    """
    reasons = []
    families = ranges.get("families", [])
    if isinstance(families, list) and protocol.family.value not in families:
        reasons.append(f"sequence family {protocol.family.value!r} (trained on {', '.join(families)})")
    fields = ranges.get("field_strengths_t", [])
    if isinstance(fields, list) and fields and "field_strength_t" not in protocol.assumed and not any(
            abs(protocol.field_strength_t - f) <= 0.1 * f for f in fields):
        reasons.append(f"MagneticFieldStrength {protocol.field_strength_t:g} T (trained on "
                       f"{', '.join(f'{f:g}' for f in fields)} T)")
    for name in RANGED_FIELDS[1:]:
        span = ranges.get(name)
        if not isinstance(span, list) or len(span) != 2 or name in protocol.assumed:
            continue
        lo, hi = float(span[0]), float(span[1])
        value = float(getattr(protocol, name))
        if not lo * (1 - tolerance) <= value <= hi * (1 + tolerance):
            reasons.append(f"{name} {value:g} outside the trained range {lo:g}-{hi:g}")
    return reasons
