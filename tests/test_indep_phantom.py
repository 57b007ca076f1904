"""The independent MPRAGE phantom (research/indep_phantom): steady-state echo train, k-space weighting and the
dose-response option."""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
from scipy import fft as sfft

from research.indep_phantom.make_indep import (
    PROTOCOLS,
    Protocol,
    centre_echo,
    draw_subject,
    echo_signals,
    parse_scale,
    partition_weights,
    scaled,
    train_mz,
)

# One protocol whose TI runs to the k-space centre (Siemens MPRAGE), one GE-style whose TI runs to the first
# readout (BRAVO); both have whole-millisecond timings, so a 1 ms time step hits every event exactly.
BY_KEY = {p.key: p for p in PROTOCOLS}
TIMING_PROTOCOLS = [BY_KEY["siemens-mprage-3t"], BY_KEY["ge-bravo-3t"]]
T1_MS = [300.0, 880.0, 1420.0, 4300.0]


def _time_stepped_mz(t1: float, p: Protocol, dt: float = 1.0) -> np.ndarray:
    """Mz (M0 = 1) just before each readout pulse, by stepping time in ``dt`` from Mz = 1 through period after
    period (inversion at t = 0, free recovery, the pulse train, recovery to the next inversion at the shot
    interval) until Mz before every pulse changes by less than 1e-13 from one period to the next."""
    assert p.header_ti_ms is not None
    n, es = p.n_train, p.echo_spacing_ms
    # Pulse times from the definition of TI: the centre pulse (n // 2), or the first pulse, at TI.
    first = p.header_ti_ms - (n // 2) * es if p.ti_to_centre else p.header_ti_ms
    pulse_times = [first + k * es for k in range(n)]
    steps_per_period = round(p.shot_interval_ms / dt)
    pulse_step = {round(t / dt): k for k, t in enumerate(pulse_times)}
    assert all(abs(s * dt - t) < 1e-9 for s, t in zip(pulse_step, pulse_times, strict=True))
    assert abs(steps_per_period * dt - p.shot_interval_ms) < 1e-9
    assert min(pulse_step) > 0 and max(pulse_step) < steps_per_period
    decay, cos_a = math.exp(-dt / t1), math.cos(math.radians(p.flip_deg))
    mz = 1.0
    before = [math.nan] * n
    for _ in range(1000):
        previous = list(before)
        for step in range(steps_per_period):
            if step == 0:
                mz = -p.inversion_efficiency * mz
            k = pulse_step.get(step)
            if k is not None:
                before[k] = mz
                mz *= cos_a
            mz = 1.0 + (mz - 1.0) * decay
        if max(abs(a - b) for a, b in zip(before, previous, strict=True)) < 1e-13:
            return np.array(before)
    raise AssertionError("no steady state after 1000 periods")


@pytest.mark.parametrize("protocol", TIMING_PROTOCOLS, ids=lambda p: p.key)
def test_train_mz_matches_time_stepped_steady_state(protocol: Protocol) -> None:
    mz = train_mz(np.array(T1_MS), protocol)
    assert mz.shape == (len(T1_MS), protocol.n_train)
    for row, t1 in zip(mz, T1_MS, strict=True):
        np.testing.assert_allclose(row, _time_stepped_mz(t1, protocol), rtol=0, atol=1e-9)


def test_ti_meaning_moves_the_train() -> None:
    """Same header TI read as inversion -> k-space centre vs inversion -> first readout: the first case starts
    the train n//2 spacings earlier, closer to the inversion, so its first Mz is lower."""
    p = BY_KEY["siemens-mprage-3t"]
    q = dataclasses.replace(p, ti_to_centre=False)
    t1 = np.array([880.0])
    np.testing.assert_allclose(train_mz(t1, p)[0], _time_stepped_mz(880.0, p), atol=1e-9)
    np.testing.assert_allclose(train_mz(t1, q)[0], _time_stepped_mz(880.0, q), atol=1e-9)
    assert train_mz(t1, p)[0, 0] < train_mz(t1, q)[0, 0]


def _image(vol: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The generator's readout along the partition axis: FFT, weight each line, inverse FFT."""
    image_k = sfft.fft(vol, axis=2, workers=1) * weight[None, None, :].astype(np.complex64)
    return sfft.ifft(image_k, axis=2, workers=1)


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.key)
def test_centre_echo_lands_on_k0(protocol: Protocol) -> None:
    n = protocol.n_train
    sig = echo_signals(np.array(T1_MS), np.array([40.0, 60.0, 80.0, 500.0]), protocol)
    c = centre_echo(protocol)
    assert c == n // 2  # linear ordering
    k = np.arange(n)
    uniform = np.full((2, 3, n), 0.7, np.float32)
    for s in sig:
        weight = partition_weights(s, protocol)
        assert weight[0] == s[c]
        # A uniform object has only k = 0: its image is the centre echo's signal times the object.
        np.testing.assert_allclose(_image(uniform, weight), uniform * s[c], rtol=1e-5, atol=1e-9)
        # A plane wave of partition frequency m comes back scaled by the echo that acquired line centre + m.
        for m in (-3, 1, 5):
            wave = np.broadcast_to(np.exp(2j * np.pi * m * k / n), (2, 3, n)).astype(np.complex64)
            np.testing.assert_allclose(_image(wave, weight), wave * s[c + m], rtol=1e-5, atol=1e-8)


def test_no_kspace_weighting_scales_by_the_centre_echo() -> None:
    protocol = BY_KEY["ge-bravo-3t"]
    sig = echo_signals(np.array([880.0, 4300.0]), np.array([40.0, 500.0]), protocol)
    vol = np.random.default_rng(0).random((2, 3, protocol.n_train)).astype(np.float32)
    for s in sig:
        weight = partition_weights(s, protocol, kspace_weighting=False)
        np.testing.assert_array_equal(weight, np.full(protocol.n_train, s[centre_echo(protocol)]))
        np.testing.assert_allclose(_image(vol, weight).real, vol * s[centre_echo(protocol)], rtol=1e-4, atol=1e-8)


def test_scale_changes_one_value_and_keeps_every_other_draw() -> None:
    base = draw_subject(3, PROTOCOLS[0], master=2040)
    changed = scaled(draw_subject(3, PROTOCOLS[0], master=2040), [parse_scale("wm.t1=1.15"), parse_scale("gm.t2=0.8")])
    assert changed.tissues["wm"] == pytest.approx((base.tissues["wm"][0] * 1.15, *base.tissues["wm"][1:]))
    assert changed.tissues["gm"] == pytest.approx((base.tissues["gm"][0], base.tissues["gm"][1] * 0.8,
                                                   base.tissues["gm"][2]))
    assert {k: v for k, v in changed.tissues.items() if k not in ("wm", "gm")} == \
        {k: v for k, v in base.tissues.items() if k not in ("wm", "gm")}
    assert (changed.seed, changed.snr, changed.atrophy) == (base.seed, base.snr, base.atrophy)
    np.testing.assert_array_equal(changed.bias_coef, base.bias_coef)


@pytest.mark.parametrize("text", ["wm.t1", "wm.q1=1.1", "brain.t1=1.1", "wm.t1=0", "wm.t1=x"])
def test_scale_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_scale(text)
