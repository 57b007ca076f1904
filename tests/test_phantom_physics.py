"""Phantom physics: MPRAGE signal equation, tissue values, partial volume, fields, regions, warps."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence
from training.phantom.anatomy import TISSUES, RenderedAnatomy, Template, load_template, random_warp
from training.phantom.fields import random_smooth_field
from training.phantom.geometry import mrf_grid
from training.phantom.mprage import MprageProtocol, mprage_signal
from training.phantom.mrf import noise_free_coefficients
from training.phantom.regions import LABEL_NAMES, label_id
from training.phantom.tissues import PRIORS, draw_tissues, truth_maps


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template()


def _bloch_mprage(p: MprageProtocol, t1: float, t2: float, shots: int = 30) -> float:
    """Pulse-by-pulse recursion of the MPRAGE shot, repeated until steady state: centre-echo signal."""
    a = np.deg2rad(p.flip_angle_deg)
    mz, signal = 1.0, 0.0
    for _ in range(shots):
        mz = -p.inversion_efficiency * mz
        mz = 1 + (mz - 1) * np.exp(-p.delay_before_train_ms / t1)
        for k in range(p.echo_train_length):
            if k == p.centre_echo:
                signal = np.sin(a) * mz * np.exp(-p.te_ms / t2)
            mz = mz * np.cos(a)
            mz = 1 + (mz - 1) * np.exp(-p.echo_spacing_ms / t1)
        mz = 1 + (mz - 1) * np.exp(-p.delay_after_train_ms / t1)
    return float(signal)


@pytest.mark.parametrize(("t1", "t2"), [(380, 133), (850, 75), (1450, 100), (4100, 1200)])
def test_mprage_closed_form_matches_pulse_recursion(t1: float, t2: float) -> None:
    p = MprageProtocol()
    closed = float(mprage_signal(p, np.array(t1), np.array(t2)))
    assert closed == pytest.approx(_bloch_mprage(p, t1, t2), rel=1e-6, abs=1e-9)


def test_mprage_protocol_timing_is_paper_protocol() -> None:
    p = MprageProtocol()
    assert (p.tr_ms, p.ti_ms, p.te_ms, p.flip_angle_deg) == (2130.0, 900.0, 2.6, 8.0)
    assert p.delay_before_train_ms == pytest.approx(228.0)
    assert p.delay_after_train_ms == pytest.approx(558.0)


def test_mprage_protocol_rejects_impossible_timing() -> None:
    with pytest.raises(ValueError, match=r"ti_ms: 500"):
        MprageProtocol(ti_ms=500.0)
    with pytest.raises(ValueError, match=r"tr_ms: 1500"):
        MprageProtocol(tr_ms=1500.0)
    with pytest.raises(ValueError, match=r"centre_echo: must be in 0\.\.191, got 192"):
        MprageProtocol(centre_echo=192)
    with pytest.raises(ValueError, match=r"t1_ms, t2_ms: relaxation times must be > 0"):
        mprage_signal(MprageProtocol(), np.array([0.0]), np.array([50.0]))


def test_pure_tissue_mprage_contrast_is_wm_gm_csf() -> None:
    p = MprageProtocol()
    s = {
        name: abs(
            float(
                PRIORS[name].pd[0] * mprage_signal(p, np.array(PRIORS[name].t1_ms[0]), np.array(PRIORS[name].t2_ms[0]))
            )
        )
        for name in PRIORS  # world v1 tissues (lesions exist in world v2 only)
    }
    print(
        f"pure-tissue MPRAGE ratios: WM/GM {s['wm'] / s['gm']:.2f}, GM/CSF {s['gm'] / s['csf']:.2f}, "
        f"deep GM/GM {s['deep_gm'] / s['gm']:.2f}"
    )
    assert s["scalp"] > s["wm"] > s["deep_gm"] > s["gm"] > s["csf"]
    assert 1.3 < s["wm"] / s["gm"] < 2.5


def test_tissue_draws_stay_near_literature(template: Template) -> None:
    rng = np.random.default_rng(11)
    draws = [draw_tissues(rng, template).values for _ in range(40)]
    wm_t1 = [d["wm"].t1_ms for d in draws]
    gm_t1 = [d["gm"].t1_ms for d in draws]
    csf_t2 = [d["csf"].t2_ms for d in draws]
    assert min(wm_t1) >= 700 and max(wm_t1) <= 1000
    assert min(gm_t1) >= 1150 and max(gm_t1) <= 1800
    assert min(csf_t2) >= 500 and max(csf_t2) <= 2000
    assert all(d["wm"].t1_ms < d["deep_gm"].t1_ms < d["gm"].t1_ms < d["csf"].t1_ms for d in draws)
    assert len({round(t, 3) for t in wm_t1}) == len(wm_t1)


def _two_voxel_anatomy(template: Template) -> RenderedAnatomy:
    """Voxel 0: pure WM; voxel 1: half WM, half CSF; both at the template centre (same modulation)."""
    fractions = np.zeros((len(TISSUES), 2), dtype=np.float32)
    fractions[TISSUES.index("wm")] = [1.0, 0.5]
    fractions[TISSUES.index("csf"), 1] = 0.5
    centre = np.repeat(template.centre_mm.astype(np.float32)[:, None], 2, axis=1)
    return RenderedAnatomy(mrf_grid(8), np.array([0, 1]), centre, fractions, np.zeros(2, np.int16), np.ones(2, bool))


def test_truth_is_pd_weighted_geometric_mean_at_partial_volume(template: Template) -> None:
    model = draw_tissues(np.random.default_rng(3), template)
    anatomy = _two_voxel_anatomy(template)
    t1, t2, pd = truth_maps(model, anatomy)
    g, h = model.level_indices(anatomy)
    wm_t1, wm_t2, wm_pd = (tab[i] for tab, i in zip(model.level_tables("wm"), (g[0], h[0], g[0]), strict=True))
    csf_t1, csf_t2, csf_pd = (tab[i] for tab, i in zip(model.level_tables("csf"), (g[0], h[0], g[0]), strict=True))
    assert t1[0] == pytest.approx(wm_t1, rel=1e-6) and t2[0] == pytest.approx(wm_t2, rel=1e-6)
    w_wm, w_csf = 0.5 * wm_pd, 0.5 * csf_pd
    assert pd[1] == pytest.approx(w_wm + w_csf, rel=1e-6)
    log_mean = lambda a, b: np.exp((w_wm * np.log(a) + w_csf * np.log(b)) / (w_wm + w_csf))  # noqa: E731
    assert t1[1] == pytest.approx(log_mean(wm_t1, csf_t1), rel=1e-5)
    assert t2[1] == pytest.approx(log_mean(wm_t2, csf_t2), rel=1e-5)


def test_mrf_partial_volume_is_mixed_in_the_signal_domain(
    template: Template, default_sequence: Sequence, default_dictionary: Dictionary
) -> None:
    sequence, dictionary = default_sequence, default_dictionary
    model = draw_tissues(np.random.default_rng(4), template)
    coeffs = noise_free_coefficients(sequence, dictionary, model, _two_voxel_anatomy(template))
    anatomy_csf = _two_voxel_anatomy(template)
    anatomy_csf.fractions[:] = 0
    anatomy_csf.fractions[TISSUES.index("csf")] = 1.0
    pure_csf = noise_free_coefficients(sequence, dictionary, model, anatomy_csf)[0]
    np.testing.assert_allclose(coeffs[1], 0.5 * coeffs[0] + 0.5 * pure_csf, rtol=1e-5, atol=1e-7)


def test_smooth_field_has_requested_sd_and_checks_points() -> None:
    field = random_smooth_field(
        np.random.default_rng(0), components=2, centre_mm=np.zeros(3), extent_mm=200.0, correlation_mm=20.0, sd=0.3
    )
    values = field(np.random.default_rng(1).uniform(-90, 90, size=(3, 20000)).astype(np.float32))
    assert values.shape == (2, 20000)
    assert 0.15 < values.std() < 0.4
    with pytest.raises(ValueError, match=r"points_mm: expected shape \(3, N\), got \(5, 3\)"):
        field(np.zeros((5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"correlation_mm, extent_mm, spacing_mm: must be > 0"):
        random_smooth_field(
            np.random.default_rng(0), components=1, centre_mm=np.zeros(3), extent_mm=100.0, correlation_mm=0.0, sd=1.0
        )


def test_template_has_all_47_regions_mirrored(template: Template) -> None:
    assert len(LABEL_NAMES) == 47
    counts = np.bincount(template.labels.ravel(), minlength=48)
    assert np.all(counts[1:] > 500), {LABEL_NAMES[i]: int(counts[i + 1]) for i in range(47) if counts[i + 1] <= 500}
    assert not np.any((template.brain > 0) & (template.labels == 0))
    left, right = counts[label_id("left thalamus")], counts[label_id("right thalamus")]
    assert abs(left - right) / (left + right) < 0.05
    with pytest.raises(ValueError, match=r"name: unknown region 'left amygdale'"):
        label_id("left amygdale")


def test_template_fractions_are_partitions(template: Template) -> None:
    total = template.fractions.sum(axis=0)
    assert total.max() <= 1.0 + 1e-5
    inside = template.brain > 0
    brain_total = template.fractions[[TISSUES.index(t) for t in ("wm", "gm", "deep_gm", "csf")]].sum(axis=0)
    np.testing.assert_allclose(brain_total[inside], 1.0, atol=1e-5)


def test_random_warps_do_not_fold(template: Template) -> None:
    for seed in range(3):
        warp = random_warp(np.random.default_rng(seed), template)
        axes = np.arange(-80, 81, 4.0)
        pts = np.stack(np.meshgrid(axes, axes, axes, indexing="ij")).reshape(3, -1).astype(np.float32)
        h = 1.0
        jac = np.stack(
            [
                (warp.to_template(pts + h * e[:, None]) - warp.to_template(pts - h * e[:, None])) / (2 * h)
                for e in np.eye(3, dtype=np.float32)
            ],
            axis=-1,
        )  # (3, N, 3)
        det = np.linalg.det(np.moveaxis(jac, 0, 1))
        assert det.min() > 0.5, f"seed {seed}: min Jacobian {det.min():.3f}"
