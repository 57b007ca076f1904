"""Synthetic contrasts against an independent numerical solution of the Bloch equation for Mz and against the
tissue ordering every radiologist expects (published 3 T relaxation times)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.contrasts import DEFAULT_CONTRASTS, Contrast, longitudinal, synthesise

# 3 T relaxation times (ms) and proton density: WM and GM after Wansapura et al. 1999 and Stanisz et al. 2005,
# CSF after Lu et al. 2005 (T1) and Spijkerman et al. 2018 (T2 about 2 s).
TISSUES = {"WM": (830.0, 80.0, 0.69), "GM": (1330.0, 110.0, 0.80), "CSF": (4000.0, 2000.0, 1.00)}


def numerical_mz(contrast: Contrast, t1: float, dt: float = 0.25) -> float:
    """Mz before the second readout: dMz/dt = (1 - Mz) / T1 stepped by explicit midpoint integration, inversions
    (Mz -> -Mz) at TR - TI before each readout, the readout (90 degrees) leaving Mz = 0."""
    events = sorted(contrast.tr_ms - ti for ti in contrast.ti_ms)
    mz = 1.0  # fully relaxed before the first repetition
    for _ in range(2):
        t = 0.0
        for stop in [*events, contrast.tr_ms]:
            n = round((stop - t) / dt)
            for _ in range(n):
                half = mz + 0.5 * dt * (1 - mz) / t1
                mz += dt * (1 - half) / t1
            t = stop
            if stop < contrast.tr_ms:
                mz = -mz  # an inversion
        before_readout = mz
        mz = 0.0
    return before_readout


@pytest.mark.parametrize("contrast", DEFAULT_CONTRASTS, ids=lambda c: c.name)
@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_the_closed_forms_match_a_numerical_bloch_solution(contrast: Contrast, tissue: str) -> None:
    t1 = TISSUES[tissue][0]
    assert float(longitudinal(contrast, np.array(t1))) == pytest.approx(numerical_mz(contrast, t1), abs=1e-4)


def signals() -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c in DEFAULT_CONTRASTS:
        t1, t2, pd = (np.array([TISSUES[k][i] for k in TISSUES]) for i in range(3))
        out[c.name] = dict(zip(TISSUES, synthesise(c, t1, t2, pd).tolist(), strict=True))
    return out


def test_tissue_ordering_is_what_a_radiologist_expects() -> None:
    s = signals()
    assert s["T1w"]["WM"] > s["T1w"]["GM"] > s["T1w"]["CSF"]  # white matter brightest, CSF dark
    assert s["T2w"]["CSF"] > s["T2w"]["GM"] > s["T2w"]["WM"]  # CSF bright
    assert s["FLAIR"]["GM"] > s["FLAIR"]["WM"] > s["FLAIR"]["CSF"]  # T2 contrast with CSF dark ...
    assert s["FLAIR"]["CSF"] < 0.2 * s["FLAIR"]["GM"]  # ... nulled
    assert s["DIR"]["WM"] < 0.05 * s["DIR"]["GM"] and s["DIR"]["CSF"] < 0.05 * s["DIR"]["GM"]  # grey matter only
    assert s["PDw"]["GM"] > s["PDw"]["WM"]


def test_invalid_voxels_and_settings() -> None:
    t1 = np.array([[1000.0, 0.0], [np.nan, 800.0]])
    t2 = np.array([[80.0, 50.0], [60.0, 0.0]])
    out = synthesise(DEFAULT_CONTRASTS[0], t1, t2, np.ones_like(t1))
    assert out[0, 0] > 0 and out[0, 1] == out[1, 0] == out[1, 1] == 0
    with pytest.raises(ValueError, match="TI1 > TI2"):
        Contrast("DIR2", "x", tr_ms=10000, te_ms=20, ti_ms=(500, 3000))
    with pytest.raises(ValueError, match="TE < TR"):
        Contrast("X", "x", tr_ms=100, te_ms=200)
