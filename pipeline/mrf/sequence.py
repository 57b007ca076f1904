"""MRF sequence files: load, validate, hash, and the design of the default schedule.

A sequence file is JSON: ``{"name", "tr_ms", "te_ms", "flip_angle_deg", "inversion_ti_ms"}`` plus
optional fields (``description``, ``design``). ``tr_ms`` and ``te_ms`` may be a number (constant) or a
list with one entry per frame. Everything downstream (dictionary, SVD basis, models) is keyed by
:func:`Sequence.hash`, the SHA-256 of the canonical JSON of the *physics* fields, so reformatting the
file or editing its description does not invalidate caches, while any change to timing does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHYSICS_FIELDS = ("tr_ms", "te_ms", "flip_angle_deg", "inversion_ti_ms")
DEFAULT_SEQUENCE = "fisp_ir_tr9.3_1000"
STORED_RANK = 32  # singular components a dictionary file keeps
DEFAULT_RANK = 4  # singular components the product matches with (the paper's K)


def sequence_dir() -> Path:
    """Folder of shipped sequence files (``config/sequences``), overridable by ``SYNTHMRF_SEQUENCE_DIR``."""
    env = os.environ.get("SYNTHMRF_SEQUENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "config" / "sequences"


@dataclass(frozen=True)
class Sequence:
    """An inversion-prepared FISP schedule: one entry per frame, times in ms, angles in degrees."""

    name: str
    tr_ms: np.ndarray
    te_ms: np.ndarray
    flip_angle_deg: np.ndarray
    inversion_ti_ms: float | None
    description: str = ""

    def __post_init__(self) -> None:
        n = self.flip_angle_deg.shape[0]
        for field in ("tr_ms", "te_ms"):
            value = getattr(self, field)
            if value.shape != (n,):
                raise ValueError(f"{field}: expected {n} entries (one per flip angle), got shape {value.shape}")
        if n == 0:
            raise ValueError("flip_angle_deg: the schedule has no frames")
        if np.any(self.tr_ms <= 0):
            raise ValueError(f"tr_ms: must be > 0, got minimum {self.tr_ms.min()}")
        if np.any(self.te_ms < 0) or np.any(self.te_ms >= self.tr_ms):
            raise ValueError("te_ms: must satisfy 0 <= TE < TR for every frame")
        if np.any(np.abs(self.flip_angle_deg) > 180):
            raise ValueError(f"flip_angle_deg: |angle| must be <= 180, got {np.abs(self.flip_angle_deg).max()}")
        if self.inversion_ti_ms is not None and self.inversion_ti_ms < 0:
            raise ValueError(f"inversion_ti_ms: must be >= 0 or null, got {self.inversion_ti_ms}")

    @property
    def n_frames(self) -> int:
        return int(self.flip_angle_deg.shape[0])

    @property
    def duration_ms(self) -> float:
        """Time from the inversion pulse to the end of the last TR."""
        return float((self.inversion_ti_ms or 0.0) + self.tr_ms.sum())

    def physics_dict(self) -> dict[str, object]:
        """The fields that determine the signal, in canonical form."""
        return {
            "tr_ms": [float(v) for v in self.tr_ms],
            "te_ms": [float(v) for v in self.te_ms],
            "flip_angle_deg": [float(v) for v in self.flip_angle_deg],
            "inversion_ti_ms": None if self.inversion_ti_ms is None else float(self.inversion_ti_ms),
        }

    def hash(self) -> str:
        """SHA-256 (hex) of the canonical JSON of the physics fields."""
        canonical = json.dumps(self.physics_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self, design: dict[str, object] | None = None) -> str:
        """The sequence as a file: constant TR/TE written as numbers, lists otherwise."""
        doc: dict[str, object] = {"name": self.name, "description": self.description}
        for field in ("tr_ms", "te_ms"):
            values = getattr(self, field)
            doc[field] = float(values[0]) if np.all(values == values[0]) else [float(v) for v in values]
        doc["flip_angle_deg"] = [round(float(v), 4) for v in self.flip_angle_deg]
        doc["inversion_ti_ms"] = self.inversion_ti_ms
        if design is not None:
            doc["design"] = design
        return json.dumps(doc, indent=1) + "\n"


def _per_frame(doc: dict[str, object], key: str, n: int) -> np.ndarray:
    value = doc.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return np.full(n, float(value))
    if isinstance(value, list):
        return np.asarray(value, dtype=np.float64)
    raise ValueError(f"{key}: expected a number or a list of numbers, got {value!r}")


def parse_sequence(doc: dict[str, object]) -> Sequence:
    """Build a :class:`Sequence` from a parsed sequence file, with errors that name the field."""
    missing = [k for k in ("name", "tr_ms", "te_ms", "flip_angle_deg", "inversion_ti_ms") if k not in doc]
    if missing:
        raise ValueError(f"sequence file is missing field(s): {', '.join(missing)}")
    flips = doc["flip_angle_deg"]
    if not isinstance(flips, list) or not all(isinstance(v, int | float) for v in flips):
        raise ValueError(f"flip_angle_deg: expected a list of numbers, got {type(flips).__name__}")
    n = len(flips)
    ti = doc["inversion_ti_ms"]
    if ti is not None and not isinstance(ti, int | float):
        raise ValueError(f"inversion_ti_ms: expected a number or null, got {ti!r}")
    return Sequence(
        name=str(doc["name"]),
        tr_ms=_per_frame(doc, "tr_ms", n),
        te_ms=_per_frame(doc, "te_ms", n),
        flip_angle_deg=np.asarray(flips, dtype=np.float64),
        inversion_ti_ms=None if ti is None else float(ti),
        description=str(doc.get("description", "")),
    )


def find_sequence_file(name_or_path: str | Path) -> Path:
    """The file of a sequence given by path, or by name in :func:`sequence_dir`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = sequence_dir() / f"{name_or_path}.json"
    if not candidate.is_file():
        known = sorted(p.stem for p in sequence_dir().glob("*.json"))
        raise FileNotFoundError(f"sequence {str(name_or_path)!r}: no such file, and not one of {known}")
    return candidate


def load_sequence(name_or_path: str | Path) -> Sequence:
    """Load a sequence by file path, or by name from :func:`sequence_dir`."""
    path = find_sequence_file(name_or_path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"sequence file {path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"sequence file {path}: expected a JSON object")
    return parse_sequence(doc)


def design_default_schedule(n_frames: int = 1000, tr_ms: float = 9.3, te_ms: float = 2.0,
                            ti_ms: float = 20.0) -> tuple[Sequence, dict[str, object]]:
    """The shipped default schedule and the recipe that made it.

    Jiang et al. 2015 (MRF-FISP) drive the transient state with half-sine flip-angle lobes separated
    by low-angle stretches; QTI-style schedules (Gomez et al. 2020) ramp smoothly up and down. We use
    five half-sine lobes of different peak angles (short and tall lobes alternate so that T2-driven
    stimulated echoes and T1-driven recovery are both encoded), each followed by a 5-degree
    plateau that lets longitudinal magnetisation recover (T1 sensitivity), after a perfect
    inversion. TR is constant at the paper's 9.3 ms.
    """
    lobes_deg = [60.0, 30.0, 70.0, 20.0, 45.0]
    floor_deg = 5.0
    lobe_len = int(round(n_frames * 0.16))
    plateau_len = n_frames // len(lobes_deg) - lobe_len
    flips: list[np.ndarray] = []
    for peak in lobes_deg:
        t = np.arange(lobe_len) / (lobe_len - 1)
        flips.append(floor_deg + (peak - floor_deg) * np.sin(np.pi * t) ** 2)
        flips.append(np.full(plateau_len, floor_deg))
    flip = np.concatenate(flips)[:n_frames]
    flip = np.pad(flip, (0, n_frames - flip.size), constant_values=floor_deg)
    seq = Sequence(
        name=DEFAULT_SEQUENCE,
        tr_ms=np.full(n_frames, tr_ms),
        te_ms=np.full(n_frames, te_ms),
        flip_angle_deg=np.round(flip, 4),
        inversion_ti_ms=ti_ms,
        description=(
            "Inversion-prepared FISP MRF, constant TR 9.3 ms (McGee 2024), five sin^2 flip-angle lobes "
            "(peaks 60/30/70/20/45 deg) each followed by a 5 deg recovery plateau (after Jiang 2015, "
            "QTI-style smooth ramps). Perfect inversion, TI 20 ms."
        ),
    )
    recipe: dict[str, object] = {
        "generator": "pipeline.mrf.sequence.design_default_schedule",
        "n_frames": n_frames, "lobe_peaks_deg": lobes_deg, "floor_deg": floor_deg,
        "lobe_frames": lobe_len, "plateau_frames": plateau_len,
    }
    return seq, recipe
