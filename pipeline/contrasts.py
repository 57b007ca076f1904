"""Synthetic contrasts: what conventional sequences would show, computed from the T1, T2 and PD maps.

Closed-form magnitude signal equations (instantaneous pulses, perfect spoiling of transverse
magnetisation between repetitions, readout by a 90 degree excitation that leaves no longitudinal
magnetisation, refocused echo at TE; no T2* or stimulated echoes, no coil or B1 shading)::

    spin echo                      S = PD (1 - e^(-TR/T1)) e^(-TE/T2)
    inversion recovery (FLAIR)     S = PD |1 - 2 e^(-TI/T1) + e^(-TR/T1)| e^(-TE/T2)
    double inversion recovery      S = PD |1 - 2 e^(-TI2/T1) + 2 e^(-TI1/T1) - e^(-TR/T1)| e^(-TE/T2)

(TI from the inversion to the readout; for DIR, TI1 from the first and TI2 from the second inversion,
TI1 > TI2.) The defaults are typical 3 T clinical settings: FLAIR's TI nulls CSF (T1 about 4000 ms) at
TR 9000 ms; DIR's TI1/TI2 null CSF and white matter (T1 about 830 ms) at TR 11000 ms. These images are
computed, not acquired: lesion conspicuity, artefacts and partial volume differ from a real sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Contrast:
    """One synthetic contrast: its name, what it imitates, and its timing (ms)."""

    name: str  # short, used in file names and series descriptions: "T1w", "FLAIR", ...
    description: str  # "T1-weighted spin echo"
    tr_ms: float
    te_ms: float
    ti_ms: tuple[float, ...] = ()  # (): spin echo; (TI,): inversion recovery; (TI1, TI2): double inversion

    def __post_init__(self) -> None:
        if not (self.name.isidentifier() and len(self.name) <= 16):
            raise ValueError(f"contrast name {self.name!r}: letters, digits and _ only, at most 16 characters")
        if not 0 < self.te_ms < self.tr_ms:
            raise ValueError(f"contrast {self.name}: need 0 < TE < TR, got TE {self.te_ms}, TR {self.tr_ms}")
        if len(self.ti_ms) > 2 or any(not 0 < t < self.tr_ms for t in self.ti_ms):
            raise ValueError(f"contrast {self.name}: TI must be one or two times in (0, TR), got {self.ti_ms}")
        if len(self.ti_ms) == 2 and self.ti_ms[0] <= self.ti_ms[1]:
            raise ValueError(f"contrast {self.name}: double inversion needs TI1 > TI2, got {self.ti_ms}")

    @property
    def equation(self) -> str:
        """The signal equation with this contrast's timing, for provenance and the DICOM derivation text."""
        timing = f"TR {self.tr_ms:g} ms, TE {self.te_ms:g} ms"
        if not self.ti_ms:
            return f"S = PD (1 - exp(-TR/T1)) exp(-TE/T2); {timing}"
        if len(self.ti_ms) == 1:
            return f"S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2); {timing}, TI {self.ti_ms[0]:g} ms"
        return (f"S = PD |1 - 2 exp(-TI2/T1) + 2 exp(-TI1/T1) - exp(-TR/T1)| exp(-TE/T2); {timing}, "
                f"TI1 {self.ti_ms[0]:g} ms, TI2 {self.ti_ms[1]:g} ms")


MAX_CONTRASTS = 8  # result series numbers keep room for this many

DEFAULT_CONTRASTS: tuple[Contrast, ...] = (
    Contrast("T1w", "T1-weighted spin echo", tr_ms=500.0, te_ms=10.0),
    Contrast("T2w", "T2-weighted fast spin echo", tr_ms=4000.0, te_ms=100.0),
    Contrast("PDw", "proton-density-weighted spin echo", tr_ms=3000.0, te_ms=10.0),
    Contrast("FLAIR", "T2-weighted FLAIR", tr_ms=9000.0, te_ms=100.0, ti_ms=(2500.0,)),
    Contrast("DIR", "double inversion recovery (CSF and white matter nulled)", tr_ms=11000.0, te_ms=20.0,
             ti_ms=(3600.0, 550.0)),
)


def longitudinal(contrast: Contrast, t1_ms: np.ndarray) -> np.ndarray:
    """Longitudinal magnetisation (fraction of M0, signed) just before the readout excitation."""
    t1 = np.asarray(t1_ms, dtype=np.float64)

    def e(t: float) -> np.ndarray:
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            return np.exp(-t / t1)

    if not contrast.ti_ms:
        return 1 - e(contrast.tr_ms)
    if len(contrast.ti_ms) == 1:
        return 1 - 2 * e(contrast.ti_ms[0]) + e(contrast.tr_ms)
    ti1, ti2 = contrast.ti_ms
    return 1 - 2 * e(ti2) + 2 * e(ti1) - e(contrast.tr_ms)


def synthesise(contrast: Contrast, t1_ms: np.ndarray, t2_ms: np.ndarray, pd: np.ndarray,
               mask: np.ndarray | None = None) -> np.ndarray:
    """The contrast's magnitude signal (float32, PD units) where T1 and T2 are positive (and in ``mask``),
    zero elsewhere."""
    t1, t2, rho = (np.asarray(a, dtype=np.float64) for a in (t1_ms, t2_ms, pd))
    if not t1.shape == t2.shape == rho.shape:
        raise ValueError(f"t1, t2, pd: expected one shape, got {t1.shape}, {t2.shape}, {rho.shape}")
    valid = (t1 > 0) & (t2 > 0) & np.isfinite(t1) & np.isfinite(t2) & np.isfinite(rho)
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    out = np.zeros(t1.shape, dtype=np.float32)
    out[valid] = (np.abs(rho[valid]) * np.abs(longitudinal(contrast, t1[valid]))
                  * np.exp(-contrast.te_ms / t2[valid])).astype(np.float32)
    return out
