"""MPRAGE simulation: closed-form steady-state signal of the centre-of-k-space echo, noise and bias.

Protocol (McGee 2024): TR 2130 ms (inversion to inversion), TI 900 ms (inversion to the centre of
k-space), TE 2.6 ms, flip 8 deg. Our choices, typical of 3 T MPRAGE: echo spacing 7.0 ms, one
in-plane phase-encode line per echo, echo train length 192 (the 150 partitions are the outer loop:
150 shots x 2.13 s = 5 min 20 s), linear ordering with the centre line at echo 96, so the train starts
228 ms after the inversion and ends 558 ms before the next one. Adiabatic inversion efficiency 0.96
(Marques et al. 2010, NeuroImage 49:1271).

Signal (Deichmann et al. 2000, NeuroImage 12:112; Marques 2010, appendix): during the train Mz
before pulse k is A_k = M_A q^k + (1 - E1)(1 - q^k)/(1 - q), q = cos(a) E1, E1 = exp(-ES/T1); M_A
follows the inversion and free recovery; periodicity of Mz before the inversion gives the steady
state in closed form. The image is the signal of the centre echo, sin(a) A_kc exp(-TE/T2) (T2* taken
as T2, a < 4 % effect at TE 2.6 ms); the modulation across the train (k-space filter) is ignored.

Phantom world v2 varies all of this per subject (:mod:`training.phantom.world`): the family (MPRAGE,
GE IR-FSPGR, Philips TFE), every timing, the centre line's position, the inversion efficiency and a
T2* shorter than T2 (``t2star_factor``: T2* = factor x T2 in the echo-time decay).

Partial volume is mixed in the signal domain: S = sum_t fraction_t PD_t S(T1_t, T2_t), signed
(CSF is still negative at the centre echo), then the receive bias field, complex Gaussian noise and the
magnitude (Rician statistics). SNR is defined as the noise-free WM signal over the noise SD per
channel. Pixel values are scaled so that nominal WM is 1000, stored as 12-bit unsigned integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.protocol import FAMILY_DEFAULTS, AcquisitionProtocol, Family
from training.phantom.anatomy import RenderedAnatomy
from training.phantom.fields import SmoothField
from training.phantom.mixing import mixed_signal
from training.phantom.tissues import TissueModel

WM_PIXEL_VALUE = 1000.0
MAX_PIXEL_VALUE = 4095


@dataclass(frozen=True)
class MprageProtocol:
    """Timing of an MPRAGE shot, in ms and degrees."""

    tr_ms: float = 2130.0
    ti_ms: float = 900.0
    te_ms: float = 2.6
    flip_angle_deg: float = 8.0
    echo_spacing_ms: float = 7.0
    echo_train_length: int = 192
    centre_echo: int = 96
    inversion_efficiency: float = 0.96
    family: Family = Family.MPRAGE
    field_strength_t: float = 3.0
    t2star_factor: float = 1.0
    header_omits_ti: bool = False  # Philips does not always write InversionTime

    def __post_init__(self) -> None:
        if not 0 <= self.centre_echo < self.echo_train_length:
            raise ValueError(f"centre_echo: must be in 0..{self.echo_train_length - 1}, "
                             f"got {self.centre_echo}")
        if self.delay_before_train_ms < 0:
            raise ValueError(f"ti_ms: {self.ti_ms} is shorter than the {self.centre_echo} echoes before the "
                             f"centre ({self.centre_echo * self.echo_spacing_ms} ms)")
        if self.delay_after_train_ms < 0:
            raise ValueError(f"tr_ms: {self.tr_ms} is too short for TI {self.ti_ms} and a train of "
                             f"{self.echo_train_length} x {self.echo_spacing_ms} ms")

    @property
    def delay_before_train_ms(self) -> float:
        return self.ti_ms - self.centre_echo * self.echo_spacing_ms

    @property
    def delay_after_train_ms(self) -> float:
        return self.tr_ms - self.delay_before_train_ms - self.echo_train_length * self.echo_spacing_ms

    @property
    def header_ti_ms(self) -> float:
        """InversionTime as the vendor writes it: GE's prep time runs to the start of the readout."""
        return self.delay_before_train_ms if self.family is Family.IR_FSPGR else self.ti_ms

    @property
    def header_tr_ms(self) -> float:
        """RepetitionTime as the vendor writes it: the echo spacing for IR-FSPGR and TFE."""
        return self.tr_ms if self.family is Family.MPRAGE else self.echo_spacing_ms

    def as_read(self, manufacturer: str) -> AcquisitionProtocol:
        """What a reader of this series' header learns (:mod:`pipeline.acquisition`): fields a header
        does not carry take the family defaults and are listed as assumed."""
        family = Family(self.family)
        defaults = FAMILY_DEFAULTS[family]
        assumed = []
        shot, spacing, ti = self.tr_ms, self.echo_spacing_ms, self.header_ti_ms
        if family is Family.MPRAGE:
            spacing = defaults["echo_spacing_ms"]
            assumed.append("echo_spacing_ms")
        else:
            shot = defaults["shot_interval_ms"]
            assumed.append("shot_interval_ms")
        if self.header_omits_ti:
            ti = defaults["ti_ms"]
            assumed.append("ti_ms")
        return AcquisitionProtocol(family, self.field_strength_t, round(ti, 3), round(shot, 3), round(spacing, 3),
                                   round(self.flip_angle_deg, 3), round(self.te_ms, 3), manufacturer,
                                   tuple(assumed))


def mprage_signal(protocol: MprageProtocol, t1_ms: np.ndarray, t2_ms: np.ndarray) -> np.ndarray:
    """Steady-state signed signal of the centre echo for M0 = 1 (broadcasts ``t1_ms`` and ``t2_ms``)."""
    t1 = np.asarray(t1_ms, dtype=np.float64)
    if np.any(t1 <= 0) or np.any(np.asarray(t2_ms) <= 0):
        raise ValueError("t1_ms, t2_ms: relaxation times must be > 0")
    a = np.deg2rad(protocol.flip_angle_deg)
    e1 = np.exp(-protocol.echo_spacing_ms / t1)
    q = np.cos(a) * e1
    n, kc = protocol.echo_train_length, protocol.centre_echo

    def recovered(k: int) -> np.ndarray:  # Mz gained during k pulses from Mz = 0
        return (1 - e1) * (1 - q**k) / (1 - q)

    e_ta = np.exp(-protocol.delay_before_train_ms / t1)
    e_td = np.exp(-protocol.delay_after_train_ms / t1)
    alpha0, alpha1 = 1 - e_ta, -protocol.inversion_efficiency * e_ta  # M_A = alpha0 + alpha1 Mz_pre
    mz_pre = (1 - e_td + e_td * (q**n * alpha0 + recovered(n))) / (1 - e_td * q**n * alpha1)
    m_a = alpha0 + alpha1 * mz_pre
    mz_centre = m_a * q**kc + recovered(kc)
    t2star = protocol.t2star_factor * np.asarray(t2_ms, dtype=np.float64)
    return np.sin(a) * mz_centre * np.exp(-protocol.te_ms / t2star)


def noise_free_image(protocol: MprageProtocol, model: TissueModel, anatomy: RenderedAnatomy) -> np.ndarray:
    """Signed partial-volume mixture (:func:`training.phantom.mixing.mixed_signal`) at the anatomy's
    voxels (N,), float32, M0 units."""
    def signal(t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
        return mprage_signal(protocol, t1, t2)[:, None]

    return mixed_signal(model, anatomy, signal, 1, np.float64)[:, 0].astype(np.float32)


def wm_reference(protocol: MprageProtocol, model: TissueModel) -> float:
    """Noise-free signal of pure WM at its subject values (the SNR and scaling reference)."""
    wm = model.values["wm"]
    return float(abs(wm.pd * mprage_signal(protocol, np.array(wm.t1_ms), np.array(wm.t2_ms))))


def acquire(protocol: MprageProtocol, model: TissueModel, anatomy: RenderedAnatomy, *, bias: SmoothField,
            snr: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude MPRAGE image on ``anatomy.grid`` as uint16 (see the module docstring)."""
    if snr <= 0:
        raise ValueError(f"snr: must be > 0, got {snr}")
    grid = anatomy.grid
    signal = np.zeros(grid.n_voxels, dtype=np.float32)
    signal[anatomy.index] = noise_free_image(protocol, model, anatomy)
    signal *= np.exp(bias(grid.points_mm())[0])
    reference = wm_reference(protocol, model)
    sigma = np.float32(reference / snr)
    real = signal + sigma * rng.standard_normal(grid.n_voxels, dtype=np.float32)
    imag = sigma * rng.standard_normal(grid.n_voxels, dtype=np.float32)
    magnitude = np.hypot(real, imag) * np.float32(WM_PIXEL_VALUE / reference)
    return np.clip(np.rint(magnitude), 0, MAX_PIXEL_VALUE).astype(np.uint16).reshape(grid.shape)
