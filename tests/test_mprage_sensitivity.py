"""research/mprage_sensitivity.py against the closed form of an ideal inversion recovery."""

from __future__ import annotations

import dataclasses
import math

import pytest

from research.indep_phantom.make_indep import PROTOCOLS
from research.mprage_sensitivity import centre_signal, log_sensitivity


@pytest.mark.parametrize("t1_ms", [700.0, 880.0, 1420.0, 4300.0])
def test_sensitivity_of_an_ideal_inversion_recovery(t1_ms: float) -> None:
    """Vanishing flip angles, a perfect inversion and full recovery between shots leave |1 - 2 exp(-TI / T1)| at
    the centre echo (TI to the centre), whose d ln S / d ln T1 is -2 E (TI / T1) / (1 - 2 E), E = exp(-TI / T1)."""
    ideal = dataclasses.replace(PROTOCOLS[0], flip_deg=1e-4, shot_interval_ms=1e6, inversion_efficiency=1.0)
    ti = ideal.header_ti_ms
    assert ti is not None and ideal.ti_to_centre
    e = math.exp(-ti / t1_ms)
    assert centre_signal(t1_ms, ideal) == pytest.approx(abs(1 - 2 * e), rel=1e-5)
    # (1420 ms sits near the null, where the sensitivity is about 11: a finer step there)
    assert log_sensitivity(t1_ms, ideal, step=1e-4) == pytest.approx(-2 * e * (ti / t1_ms) / (1 - 2 * e), rel=1e-3)
