"""The apparent-T1 input plane: the MPRAGE-family signal equation against two independent formulations (pulse-by-
pulse stepping to the steady state, and the phantom simulator's closed form), and its inversion."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.apparent_t1 import (
    INVERSION_EFFICIENCY,
    READOUTS_PER_SHOT,
    apparent_t1_plane,
    centre_signal,
    reference_t1_ms,
)
from pipeline.protocol import AcquisitionProtocol, Family
from training.phantom.mprage import MprageProtocol, mprage_signal

PROTOCOLS = {
    "siemens 3T": AcquisitionProtocol(Family.MPRAGE, 3.0, 900.0, 2300.0, 7.0, 9.0, 2.9),
    "ge 3T": AcquisitionProtocol(Family.IR_FSPGR, 3.0, 450.0, 2000.0, 8.1, 12.0, 3.0),
    "philips 1.5T": AcquisitionProtocol(Family.TFE, 1.5, 1000.0, 2500.0, 8.0, 8.0, 3.7),
}


def _stepped(protocol: AcquisitionProtocol, t1: float, shots: int = 60) -> float:
    """Mz before the centre readout, by stepping every event of many shots from Mz = 1 (no closed forms)."""
    n, spacing = READOUTS_PER_SHOT, protocol.echo_spacing_ms
    centre = n // 4 if protocol.family is Family.IR_FSPGR else n // 2
    before = protocol.ti_ms if protocol.family is Family.IR_FSPGR else protocol.ti_ms - centre * spacing
    after = protocol.shot_interval_ms - before - n * spacing
    cos_flip = np.cos(np.deg2rad(protocol.flip_angle_deg))

    def relax(mz: float, t: float) -> float:
        return 1 - (1 - mz) * np.exp(-t / t1)

    mz, at_centre = 1.0, float("nan")
    for _ in range(shots):
        mz = relax(-INVERSION_EFFICIENCY * mz, before)
        for k in range(n):
            if k == centre:
                at_centre = mz
            mz = relax(mz * cos_flip, spacing)
        mz = relax(mz, after)
    return at_centre


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_signal_is_the_steady_state_of_stepping_every_pulse(name: str) -> None:
    protocol = PROTOCOLS[name]
    t1 = np.array([300.0, 650.0, 850.0, 1400.0, 4000.0])
    assert centre_signal(protocol, t1) == pytest.approx([_stepped(protocol, t) for t in t1], abs=1e-9)


def test_signal_agrees_with_the_phantom_simulator() -> None:
    """The phantom's closed form (sum of the train's geometric series) with the same timing, T2 decay removed."""
    protocol = PROTOCOLS["siemens 3T"]
    phantom = MprageProtocol(tr_ms=2300.0, ti_ms=900.0, te_ms=1e-6, flip_angle_deg=9.0, echo_spacing_ms=7.0,
                             echo_train_length=READOUTS_PER_SHOT, centre_echo=READOUTS_PER_SHOT // 2,
                             inversion_efficiency=INVERSION_EFFICIENCY)
    t1 = np.geomspace(200, 5000, 40)
    expected = mprage_signal(phantom, t1, np.full_like(t1, 1e9)) / np.sin(np.deg2rad(9.0))
    assert centre_signal(protocol, t1) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_plane_inverts_the_signal_relative_to_white_matter(name: str) -> None:
    protocol = PROTOCOLS[name]
    reference = centre_signal(protocol, np.array([reference_t1_ms(protocol.field_strength_t)]))[0]
    grid = np.geomspace(100, 6000, 4000)
    below = np.flatnonzero(centre_signal(protocol, grid) <= 0)  # none: long trains keep even CSF above zero
    null = grid[below[0]] if below.size else 6000.0
    t1 = np.geomspace(250, 0.9 * null, 30)
    normalised = centre_signal(protocol, t1) / reference
    assert apparent_t1_plane(normalised, protocol) == pytest.approx(np.log2(t1 / 1000), abs=0.01)
    # white matter of the field's literature T1 at the reference level; no signal at the null (or the table's end)
    assert apparent_t1_plane(np.array([1.0]), protocol)[0] == pytest.approx(
        np.log2(reference_t1_ms(protocol.field_strength_t) / 1000), abs=0.005)
    assert apparent_t1_plane(np.array([0.0, -0.1]), protocol) == pytest.approx([np.log2(null / 1000)] * 2, abs=0.01)


def test_one_intensity_reads_as_a_longer_t1_at_3t_and_after_a_longer_ti() -> None:
    """The plane undoes what the protocol did: the same normalised grey level means a different T1."""
    grey = np.array([0.6])
    siemens = PROTOCOLS["siemens 3T"]
    at_15 = AcquisitionProtocol(Family.MPRAGE, 1.5, 900.0, 2300.0, 7.0, 9.0, 2.9)
    longer_ti = AcquisitionProtocol(Family.MPRAGE, 3.0, 1100.0, 2300.0, 7.0, 9.0, 2.9)
    assert apparent_t1_plane(grey, at_15)[0] < apparent_t1_plane(grey, siemens)[0]
    assert apparent_t1_plane(grey, longer_ti)[0] > apparent_t1_plane(grey, siemens)[0]
    assert reference_t1_ms(1.5) == pytest.approx(650) and reference_t1_ms(3.0) == pytest.approx(850)
