"""Apparent T1: the MPRAGE-family signal equation inverted, so that every protocol shows the networks one scale.

An inversion-prepared 3D gradient-echo image (Siemens MPRAGE, GE IR-FSPGR, Philips TFE) is, up to the receive
gain and proton density, a known function f(T1) of the acquisition: the longitudinal magnetisation at the
k-space centre's readout, in the steady state of inversion, free recovery and a train of readout pulses
(Deichmann et al. 2000, NeuroImage 12:112). Between events the magnetisation evolves affinely, Mz -> a Mz + b
(inversion: a = -efficiency, b = 0; recovery for t: a = E, b = 1 - E with E = exp(-t/T1); a readout pulse and
one echo spacing: a = cos(flip) E_es, b = 1 - E_es), so a whole shot is one affine map whose fixed point is the
steady state before the inversion.

The networks see the image twice: normalised (divided by the brain's 95th percentile, :mod:`pipeline.normalise`,
which lies in white matter) and as the apparent T1 of each voxel: the T1 whose signal, relative to white matter
of the field's literature T1 (:func:`reference_t1_ms`), equals the voxel's normalised intensity, on the branch
shorter than the inversion null (a magnitude image cannot tell the two branches apart: what is darker reads as
the null; with a long readout train even CSF stays above zero and reads as up to 6 s).
A protocol's contrast (TI, timing, flip, family) is so undone before the networks, instead of being learnt from
the protocol features alone, which cannot reach a family or TI outside the training data.

What a header does not say takes typical values: 176 readouts per shot; the k-space centre in the middle of the
train for MPRAGE and TFE (InversionTime runs to it) and a quarter into it for IR-FSPGR (whose InversionTime is
the prep time to the first readout); inversion efficiency 0.95; no T2* decay (a factor common to the
tissues at these echo times). The plane is log2(T1_app / 1000 ms). It is a first-order undoing only: proton
density (grey matter's is about 15 % above white matter's) and partial volume make cortex read shorter than its
T1 (14 world-v2 phantoms: white matter's median apparent T1 -11 to +19 % off the truth, cortex -32 to +6 %).
"""

from __future__ import annotations

import numpy as np

from pipeline.protocol import AcquisitionProtocol, Family

READOUTS_PER_SHOT = 176
CENTRE_FRACTION = {Family.MPRAGE: 0.5, Family.TFE: 0.5, Family.IR_FSPGR: 0.25}
INVERSION_EFFICIENCY = 0.95
T1_GRID_MS = np.geomspace(100.0, 6000.0, 1024)


def reference_t1_ms(field_strength_t: float) -> float:
    """White matter's T1 at ``field_strength_t``: 650 ms at 1.5 T (Rooney et al. 2007, MRM 57:308: 656), 850 ms
    at 3 T (Wansapura et al. 1999, JMRI 9:531: 832; Marques et al. 2010: 810; Bojorquez et al. 2017: 940),
    a power law in between and beyond."""
    return float(650.0 * (field_strength_t / 1.5) ** np.log2(850.0 / 650.0))


def _affine(t1: np.ndarray, duration_ms: float) -> tuple[np.ndarray, np.ndarray]:
    e = np.exp(-max(duration_ms, 0.0) / t1)
    return e, 1 - e


def _then(first: tuple[np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``second`` after ``first``."""
    return second[0] * first[0], second[0] * first[1] + second[1]


def _pulses(t1: np.ndarray, n: int, flip_rad: float, spacing_ms: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` readout pulses, each followed by one echo spacing of recovery."""
    e, one_minus = _affine(t1, spacing_ms)
    a, b = np.cos(flip_rad) * e, one_minus
    a_n = a**n
    unit = np.isclose(a, 1.0)  # no flip and no relaxation: the geometric sum is n
    return a_n, b * np.where(unit, n, (1 - a_n) / np.where(unit, 1.0, 1 - a))


def centre_signal(protocol: AcquisitionProtocol, t1_ms: np.ndarray) -> np.ndarray:
    """Steady-state longitudinal magnetisation (M0 = 1, signed) just before the k-space centre's readout pulse."""
    t1 = np.asarray(t1_ms, dtype=np.float64)
    n = READOUTS_PER_SHOT
    centre = int(round(CENTRE_FRACTION[protocol.family] * n))
    spacing = protocol.echo_spacing_ms
    if protocol.family is Family.IR_FSPGR:
        before = protocol.ti_ms  # GE's prep time: inversion to the first readout
    else:
        centre = min(centre, int(protocol.ti_ms // spacing))  # TI runs to the centre readout
        before = protocol.ti_ms - centre * spacing
    after = protocol.shot_interval_ms - before - n * spacing
    flip = np.deg2rad(protocol.flip_angle_deg)
    inversion = (np.full_like(t1, -INVERSION_EFFICIENCY), np.zeros_like(t1))
    to_centre = _then(_then(inversion, _affine(t1, before)), _pulses(t1, centre, flip, spacing))
    rest = _then(_pulses(t1, n - centre, flip, spacing), _affine(t1, after))
    a, b = _then(to_centre, rest)  # one shot, from just before the inversion
    before_inversion = b / (1 - a)
    return to_centre[0] * before_inversion + to_centre[1]


def apparent_t1_plane(normalised: np.ndarray, protocol: AcquisitionProtocol) -> np.ndarray:
    """log2(apparent T1 / 1000 ms) of every voxel of ``normalised`` (intensity / the brain's 95th percentile),
    float32, same shape; intensities brighter than the shortest T1 tabulated (100 ms) take it, zero and below take
    the inversion null."""
    signal = centre_signal(protocol, T1_GRID_MS)
    crossing = np.flatnonzero(signal <= 0)
    last = int(crossing[0]) if crossing.size else signal.size
    branch = np.minimum.accumulate(signal[:last])  # falls with T1 up to the null (made strictly monotone below)
    reference = float(centre_signal(protocol, np.array([reference_t1_ms(protocol.field_strength_t)]))[0])
    if last < 2 or reference <= 0:
        raise ValueError(f"protocol: white matter ({reference_t1_ms(protocol.field_strength_t):.0f} ms) is not on "
                         f"the bright branch of this acquisition's signal ({protocol.family.value}, TI "
                         f"{protocol.ti_ms:g} ms)")
    null_t1 = T1_GRID_MS[min(last, T1_GRID_MS.size - 1)]
    relative = np.append(branch / reference, 0.0)[::-1]  # increasing, from the null
    log_t1 = np.log2(np.append(T1_GRID_MS[:last], null_t1) / 1000.0)[::-1]
    relative = relative + np.arange(relative.size) * 1e-12  # ties (saturated short T1) broken in grid order
    return np.interp(np.asarray(normalised, np.float64), relative, log_t1).astype(np.float32)


def brain_apparent_t1(normalised: np.ndarray, mask: np.ndarray, protocol: AcquisitionProtocol) -> np.ndarray:
    """:func:`apparent_t1_plane` inside ``mask``, zero outside (float32): the plane the networks take."""
    return np.where(mask, apparent_t1_plane(normalised, protocol), np.float32(0))
