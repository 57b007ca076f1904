"""Compressed MRF coefficients: phase renormalisation, noise, and the seven real network channels.

Method (McGee 2024): each voxel's coefficient vector is rotated so that SV1 is real and positive; the
first four components then give seven real channels: SV1 re, SV2 re/im, SV3 re/im, SV4 re/im.
"""

from __future__ import annotations

import numpy as np

CHANNEL_NAMES = ("SV1_re", "SV2_re", "SV2_im", "SV3_re", "SV3_im", "SV4_re", "SV4_im")
CHANNEL_RANK = 4


def phase_normalise(coeffs: np.ndarray) -> np.ndarray:
    """Rotate each vector (last axis) so that its first component is real and >= 0."""
    c1 = coeffs[..., :1]
    mag = np.abs(c1)
    rot = np.where(mag > 0, np.conj(c1) / np.where(mag > 0, mag, 1), 1)
    return (coeffs * rot).astype(np.complex64)


def add_complex_noise(coeffs: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Add circular complex Gaussian noise with standard deviation ``sigma`` per real/imag part.

    The basis is orthonormal, so white noise of this level in every time frame has the same level in
    every coefficient.
    """
    if sigma < 0:
        raise ValueError(f"sigma: must be >= 0, got {sigma}")
    noise = rng.standard_normal(coeffs.shape + (2,), dtype=np.float32) * sigma
    return (coeffs + noise[..., 0] + 1j * noise[..., 1]).astype(np.complex64)


def to_channels(coeffs: np.ndarray) -> np.ndarray:
    """Phase-normalised coefficients (..., K >= 4) to the seven real channels (..., 7)."""
    if coeffs.shape[-1] < CHANNEL_RANK:
        raise ValueError(f"coeffs: need at least {CHANNEL_RANK} components, got {coeffs.shape[-1]}")
    c = coeffs[..., :CHANNEL_RANK]
    parts = [c[..., 0].real]
    for k in range(1, CHANNEL_RANK):
        parts += [c[..., k].real, c[..., k].imag]
    return np.stack(parts, axis=-1).astype(np.float32)


def from_channels(channels: np.ndarray) -> np.ndarray:
    """The seven real channels (..., 7) back to complex coefficients (..., 4)."""
    if channels.shape[-1] != len(CHANNEL_NAMES):
        raise ValueError(f"channels: expected last axis {len(CHANNEL_NAMES)}, got {channels.shape[-1]}")
    out = np.empty(channels.shape[:-1] + (CHANNEL_RANK,), dtype=np.complex64)
    out[..., 0] = channels[..., 0]
    for k in range(1, CHANNEL_RANK):
        out[..., k] = channels[..., 2 * k - 1] + 1j * channels[..., 2 * k]
    return out


SIGNAL_FLOOR = 1e-6  # a channel whose largest dictionary value stays below this fraction of SV1's is empty


def channel_peaks(atoms: np.ndarray) -> np.ndarray:
    """The largest magnitude each of the seven channels reaches over a dictionary's atoms (A x K >= 4,
    phase-normalised as the network targets are), relative to SV1's."""
    channels = to_channels(phase_normalise(np.asarray(atoms).astype(np.complex64)))
    peaks = np.abs(channels).max(axis=0).astype(np.float64)
    return peaks / peaks[0] if peaks[0] > 0 else peaks


def signal_channels(atoms: np.ndarray, floor: float = SIGNAL_FLOOR) -> tuple[bool, ...]:
    """Which of the seven channels carry signal for this dictionary. A channel that no atom reaches (the
    imaginary parts, for a sequence whose signal is real, such as FISP) holds noise only in the training
    targets: a network trained on it predicts noise, and the matcher is better fed exact zeros."""
    return tuple(bool(p > floor) for p in channel_peaks(atoms))
