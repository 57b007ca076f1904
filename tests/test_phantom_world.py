"""Phantom worlds v2 and v3: draws within their documented ranges, partial-volume limits and anatomy changes
against closed forms, vendor header semantics read back by the product's own header reader, world v1
unchanged, a v3 subject its v2 namesake individualised."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.acquisition import protocol_from_dicom
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence
from pipeline.mrf.simulate import simulate_coefficients
from pipeline.protocol import Family
from training.phantom.anatomy import TISSUES, RenderedAnatomy, Template, load_template, render
from training.phantom.dataset import _options_doc
from training.phantom.dicom_series import VENDOR_HEADERS, Vendor, classic_datasets, make_identity
from training.phantom.fields import SmoothField
from training.phantom.geometry import acquisition_grid, mrf_grid
from training.phantom.mixing import fast_exchange
from training.phantom.mprage import MprageProtocol, mprage_signal, noise_free_image
from training.phantom.mrf import noise_free_coefficients
from training.phantom.subject import PhantomOptions, draw_subject
from training.phantom.tissues import truth_maps
from training.phantom.world import (
    AnatomyChanges,
    FoldWarp,
    Lesions,
    Segmentation,
    VentricleWarp,
    draw_protocol,
    draw_tissue_values,
    draw_world,
    expected_t2_target,
)


@pytest.fixture(scope="module")
def template() -> Template:
    return load_template()


def test_world_v1_draws_are_what_they_were(template: Template) -> None:
    """Pinned from the code before world v2 existed (commit fe8ee65): old datasets stay reproducible."""
    s = draw_subject(7, 3, template, PhantomOptions())
    assert s.tissues.manifest()["wm"] == {"t1_ms": 749.1337, "t2_ms": 82.2162, "pd": 0.6589}
    assert s.tissues.manifest()["csf"] == {"t1_ms": 3965.8317, "t2_ms": 879.384, "pd": 1.0}
    assert (s.mprage_snr, s.mrf_snr) == pytest.approx((39.65779581299528, 50.26422965564403))
    assert s.vendor is Vendor.SIEMENS and s.noise_seed == 2200010528727756041
    assert s.identity.study_uid == "1.2.826.0.1.3680043.8.498.10998343326905430949922601149373602562"
    assert np.round(s.warp.translation_mm, 6).tolist() == [1.456162, 0.565641, -2.100601]
    assert s.protocol == MprageProtocol() and s.changes is None and s.tissues.exchange == 0


def test_world_v2_protocols_are_valid_and_cover_the_families() -> None:
    rng = np.random.default_rng(0)
    protocols = [draw_protocol(rng, 3.0) for _ in range(400)]  # MprageProtocol checks its own timing
    families = {f: sum(p.family is f for p in protocols) for f in Family}
    assert families[Family.MPRAGE] > 150 and families[Family.IR_FSPGR] > 60 and families[Family.TFE] > 60
    fspgr = [p for p in protocols if p.family is Family.IR_FSPGR]
    assert all(400 <= p.header_ti_ms <= 650 and p.header_tr_ms == p.echo_spacing_ms for p in fspgr)
    mprage = [p for p in protocols if p.family is Family.MPRAGE]
    assert all(p.header_tr_ms >= 1800 for p in mprage) and min(p.ti_ms for p in mprage) < 800
    assert {p.header_omits_ti for p in protocols if p.family is Family.TFE} == {True, False}
    assert min(p.flip_angle_deg for p in protocols) < 7.5 and max(p.flip_angle_deg for p in protocols) > 12.5


def test_world_v2_tissue_priors_follow_the_field() -> None:
    rng = np.random.default_rng(1)
    at3 = [draw_tissue_values(rng, 3.0) for _ in range(300)]
    at15 = [draw_tissue_values(rng, 1.5) for _ in range(300)]
    wm3, wm15 = (np.median([v["wm"].t1_ms for v in d]) for d in (at3, at15))
    assert 850 < wm3 < 1000 and 620 < wm15 < 760  # literature centres: ~850-940 at 3 T, 656 at 1.5 T
    for d in (at3, at15):
        ratio = np.array([v["gm"].t1_ms / v["wm"].t1_ms for v in d])
        assert ratio.min() >= 1.35
        # T1 and T2 are drawn independently: no lock between a subject's WM T1 and T2.
        corr = np.corrcoef([v["wm"].t1_ms for v in d], [v["wm"].t2_ms for v in d])[0, 1]
        assert abs(corr) < 0.2


def _voxels(template: Template, fractions: dict[str, list[float]]) -> RenderedAnatomy:
    n = len(next(iter(fractions.values())))
    f = np.zeros((len(TISSUES), n), dtype=np.float32)
    for name, values in fractions.items():
        f[TISSUES.index(name)] = values
    centre = np.repeat(template.centre_mm.astype(np.float32)[:, None], n, axis=1)
    return RenderedAnatomy(mrf_grid(8), np.arange(n), centre, f, np.zeros(n, np.int16), np.ones(n, bool))


def test_fast_exchange_averages_rates_and_moves_truth_and_signal(template: Template) -> None:
    model = replace(draw_world(np.random.default_rng(2), template).tissues, exchange=1.0)
    anatomy = _voxels(template, {"wm": [1.0, 0.5], "csf": [0.0, 0.5]})
    g, h = model.level_indices(anatomy)
    wm = [tab[i] for tab, i in zip(model.level_tables("wm"), (g[1], h[1], g[1]), strict=True)]
    csf = [tab[i] for tab, i in zip(model.level_tables("csf"), (g[1], h[1], g[1]), strict=True)]
    w_wm, w_csf = 0.5 * wm[2], 0.5 * csf[2]
    # Zimmerman-Brittin: the weighted mean of the rates, by hand.
    t1_fx = (w_wm + w_csf) / (w_wm / wm[0] + w_csf / csf[0])
    t2_fx = (w_wm + w_csf) / (w_wm / wm[1] + w_csf / csf[1])
    weight, t1, t2 = fast_exchange(model, anatomy)
    assert (weight[1], t1[1], t2[1]) == pytest.approx((w_wm + w_csf, t1_fx, t2_fx), rel=1e-9)
    assert t1[0] == pytest.approx(wm[0]) and t2[0] == pytest.approx(wm[1])  # a pure voxel is its tissue
    truth_t1, truth_t2, _ = truth_maps(model, anatomy)
    assert (truth_t1[1], truth_t2[1]) == pytest.approx((t1_fx, t2_fx), rel=1e-5)
    protocol = MprageProtocol()
    image = noise_free_image(protocol, model, anatomy)
    expected = (w_wm + w_csf) * mprage_signal(protocol, np.array(t1_fx), np.array(t2_fx))
    assert image[1] == pytest.approx(float(expected), rel=2e-3)  # log T quantised to 0.1 %


def test_exchange_mix_interpolates_the_two_limits(template: Template, default_sequence: Sequence,
                                                  default_dictionary: Dictionary) -> None:
    base = draw_world(np.random.default_rng(3), template).tissues
    anatomy = _voxels(template, {"wm": [0.6], "gm": [0.4]})
    limits = [noise_free_coefficients(default_sequence, default_dictionary, replace(base, exchange=lam), anatomy)
              for lam in (0.0, 1.0, 0.3)]
    np.testing.assert_allclose(limits[2], 0.7 * limits[0] + 0.3 * limits[1], rtol=1e-5, atol=1e-7)
    assert np.abs(limits[0] - limits[1]).max() > 1e-3 * np.abs(limits[0]).max()  # the two models differ


@pytest.mark.parametrize(("field_t", "t2_by_hand"), [
    (3.0, {"wm": 70.0, "gm": 92.5, "deep_gm": 72.5, "csf": 1250.0, "scalp": 120.0, "lesion": 70.0 * 2.15}),
    (1.5, {"wm": 77.5, "gm": 97.5, "deep_gm": 72.5, "csf": 1250.0, "scalp": 120.0, "lesion": 77.5 * 2.15}),
])
def test_expected_target_keeps_what_an_mprage_shows(template: Template, field_t: float,
                                                    t2_by_hand: dict[str, float]) -> None:
    """T2 at the midpoints of the docstring's uniform priors, no T2 field, lambda at its mean 0.5; T1 and PD kept."""
    draw = draw_world(np.random.default_rng(11), template)
    model = replace(draw.tissues, exchange=1.0)
    target = expected_t2_target(model, field_t)
    assert target.exchange == 0.5
    for name, value in model.values.items():
        assert (target.values[name].t1_ms, target.values[name].pd) == (value.t1_ms, value.pd)
        assert target.values[name].t2_ms == pytest.approx(t2_by_hand[name])
        t1_levels, t2_levels, pd_levels = target.level_tables(name)
        np.testing.assert_array_equal(t1_levels, model.level_tables(name)[0])  # T1 and PD fields kept
        np.testing.assert_array_equal(pd_levels, model.level_tables(name)[2])
        np.testing.assert_allclose(t2_levels, t2_by_hand[name])  # no within-subject T2 field
    with pytest.raises(ValueError, match="world v2-v4"):
        expected_t2_target(replace(model, modulation=None), field_t)


def test_grey_t2_scale_changes_grey_matter_t2_alone(template: Template) -> None:
    """--grey-t2-scale 1.05: each subject is its namesake of the same seed with cortical GM T2 x 1.05 and nothing
    else changed (other tissues, GM's T1, PD and T2 field, protocol, pose, anatomy changes)."""
    for index in range(3):
        base = draw_subject(61, index, template, PhantomOptions(world="v4"))
        scaled = draw_subject(61, index, template, PhantomOptions(world="v4", grey_t2_scale=1.05))
        before, after = base.tissues.values, scaled.tissues.values
        assert after["gm"].t2_ms == pytest.approx(1.05 * before["gm"].t2_ms, rel=1e-12)
        assert (after["gm"].t1_ms, after["gm"].pd) == (before["gm"].t1_ms, before["gm"].pd)
        assert {k: v for k, v in after.items() if k != "gm"} == {k: v for k, v in before.items() if k != "gm"}
        assert scaled.tissues.modulation == base.tissues.modulation
        for name in before:
            tables, base_tables = scaled.tissues.level_tables(name), base.tissues.level_tables(name)
            np.testing.assert_array_equal(tables[0], base_tables[0])  # T1 and PD fields kept
            np.testing.assert_array_equal(tables[2], base_tables[2])
            if name != "gm":
                np.testing.assert_array_equal(tables[1], base_tables[1])
        assert (scaled.protocol, scaled.noise_seed, scaled.mprage_snr) == (base.protocol, base.noise_seed,
                                                                           base.mprage_snr)
        assert scaled.changes is not None and base.changes is not None
        assert scaled.changes.atrophy == base.changes.atrophy
        np.testing.assert_allclose(scaled.tissues.level_tables("gm")[1], 1.05 * base.tissues.level_tables("gm")[1],
                                   rtol=1e-12)


def test_grey_t2_scale_moves_the_expected_target_and_is_recorded(template: Template) -> None:
    model = draw_world(np.random.default_rng(11), template).tissues
    assert expected_t2_target(model, 3.0, 1.1).values["gm"].t2_ms == pytest.approx(1.1 * 92.5)
    assert expected_t2_target(model, 1.5, 1.1).values["wm"].t2_ms == pytest.approx(77.5)
    assert _options_doc(PhantomOptions(world="v2", grey_t2_scale=1.05))["grey_t2_scale"] == 1.05
    assert "grey_t2_scale" not in _options_doc(PhantomOptions(world="v2"))  # folders made before it still match
    with pytest.raises(ValueError, match="world v1 keeps"):
        PhantomOptions(world="v1", grey_t2_scale=1.05)
    with pytest.raises(ValueError, match=r"0\.5 to 2"):
        PhantomOptions(world="v2", grey_t2_scale=3.0)


def test_csf_t2_range_changes_csf_t2_alone(template: Template) -> None:
    """--csf-t2-range 1500 2600: each subject is its namesake of the same seed with CSF T2 moved to the same quantile
    of the new prior (500 -> 1500, 2000 -> 2600, linear between) and nothing else changed."""
    for index in range(3):
        base = draw_subject(61, index, template, PhantomOptions(world="v4"))
        moved = draw_subject(61, index, template, PhantomOptions(world="v4", csf_t2_range=(1500.0, 2600.0)))
        before, after = base.tissues.values, moved.tissues.values
        quantile = (before["csf"].t2_ms - 500.0) / 1500.0
        assert 0.0 <= quantile <= 1.0
        assert after["csf"].t2_ms == pytest.approx(1500.0 + quantile * 1100.0, rel=1e-12)
        assert (after["csf"].t1_ms, after["csf"].pd) == (before["csf"].t1_ms, before["csf"].pd)
        assert {k: v for k, v in after.items() if k != "csf"} == {k: v for k, v in before.items() if k != "csf"}
        assert moved.tissues.modulation == base.tissues.modulation
        assert (moved.protocol, moved.noise_seed, moved.mprage_snr) == (base.protocol, base.noise_seed,
                                                                        base.mprage_snr)


def test_csf_t2_range_moves_the_expected_target_and_is_recorded(template: Template) -> None:
    model = draw_world(np.random.default_rng(11), template).tissues
    target = expected_t2_target(model, 1.5, 1.1, (1500.0, 2600.0))
    assert target.values["csf"].t2_ms == pytest.approx(2050.0)
    assert target.values["gm"].t2_ms == pytest.approx(1.1 * 97.5)
    assert expected_t2_target(model, 3.0).values["csf"].t2_ms == pytest.approx(1250.0)
    doc = _options_doc(PhantomOptions(world="v2", csf_t2_range=(1500.0, 2600.0)))
    assert doc["csf_t2_range"] == (1500.0, 2600.0)
    assert "csf_t2_range" not in _options_doc(PhantomOptions(world="v2"))  # folders made before it still match
    with pytest.raises(ValueError, match="world v1 keeps"):
        PhantomOptions(world="v1", csf_t2_range=(1500.0, 2600.0))
    for bad in ((2600.0, 1500.0), (50.0, 2000.0), (1500.0, 3500.0)):
        with pytest.raises(ValueError, match="dictionary's T2 axis"):
            PhantomOptions(world="v2", csf_t2_range=bad)


def test_expected_target_signal_is_the_mean_mix_at_the_prior_mean_t2(template: Template, default_sequence: Sequence,
                                                                      default_dictionary: Dictionary) -> None:
    """A pure GM voxel: the atom at the subject's T1 and the prior-mean T2, by the EPG simulation directly; a
    GM/CSF voxel: the average of its signal-domain sum and its fast-exchange atom (rates averaged by hand)."""
    model = expected_t2_target(draw_world(np.random.default_rng(12), template).tissues, 3.0)
    anatomy = _voxels(template, {"gm": [1.0, 0.7], "csf": [0.0, 0.3]})
    g, _ = model.level_indices(anatomy)
    coeffs = noise_free_coefficients(default_sequence, default_dictionary, model, anatomy)
    gm_t1, csf_t1 = model.level_tables("gm")[0][g[0]], model.level_tables("csf")[0][g[1]]
    gm_pd, csf_pd = model.level_tables("gm")[2][g[0]], model.level_tables("csf")[2][g[1]]

    def atom(t1: float, t2: float) -> np.ndarray:
        return simulate_coefficients(default_sequence, default_dictionary, np.array([t1]), np.array([t2]),
                                     np.ones(1), device="cpu")[0]

    np.testing.assert_allclose(coeffs[0], gm_pd * atom(gm_t1, 92.5), rtol=1e-4, atol=1e-6)
    gm_t1_pv = model.level_tables("gm")[0][g[1]]
    gm_pd_pv = model.level_tables("gm")[2][g[1]]
    w_gm, w_csf = 0.7 * gm_pd_pv, 0.3 * csf_pd
    slow = w_gm * atom(gm_t1_pv, 92.5) + w_csf * atom(csf_t1, 1250.0)
    fast = (w_gm + w_csf) * atom((w_gm + w_csf) / (w_gm / gm_t1_pv + w_csf / csf_t1),
                                 (w_gm + w_csf) / (w_gm / 92.5 + w_csf / 1250.0))
    np.testing.assert_allclose(coeffs[1], 0.5 * slow + 0.5 * fast, rtol=3e-3, atol=1e-5)  # fast: log T to 0.1 %


def test_t2star_factor_scales_the_echo_decay() -> None:
    p = MprageProtocol(te_ms=4.0)
    short = replace(p, t2star_factor=0.5)
    ratio = mprage_signal(short, np.array(900.0), np.array(60.0)) / mprage_signal(p, np.array(900.0), np.array(60.0))
    assert float(ratio) == pytest.approx(np.exp(-4.0 / 30.0) / np.exp(-4.0 / 60.0), rel=1e-12)


def test_lesions_and_atrophy_move_fractions_without_creating_tissue(template: Template) -> None:
    anatomy = _voxels(template, {"wm": [1.0, 0.7, 0.0], "gm": [0.0, 0.0, 0.6], "csf": [0.0, 0.3, 0.4]})
    lesion = Lesions(np.array([template.centre_mm]), np.array([5.0]))
    changed = AnatomyChanges(atrophy=0.5, lesions=lesion).apply(anatomy)
    np.testing.assert_allclose(changed.fractions.sum(axis=0), anatomy.fractions.sum(axis=0), atol=1e-6)
    f = {name: changed.fractions[TISSUES.index(name)] for name in TISSUES}
    assert f["lesion"][0] == pytest.approx(1.0) and f["wm"][0] == pytest.approx(0.0)  # centre of the blob
    assert f["gm"][2] < 0.6 and f["csf"][2] > 0.4  # GM beside CSF shrank into CSF


def _constant(value: float) -> SmoothField:
    return SmoothField(np.full((1, 2, 2, 2), value, np.float32), np.full(3, -500.0), 1000.0)


def test_sharpening_and_thickness_follow_their_closed_forms(template: Template) -> None:
    anatomy = _voxels(template, {"wm": [0.6, 1.0, 0.0], "gm": [0.4, 0.0, 0.35], "csf": [0.0, 0.0, 0.35]})
    sharp = AnatomyChanges(atrophy=0.0, lesions=None, sharpness=3.0).apply(anatomy).fractions
    np.testing.assert_allclose(sharp.sum(axis=0), anatomy.fractions.sum(axis=0), atol=1e-6)
    wm, gm, csf = (TISSUES.index(n) for n in ("wm", "gm", "csf"))
    assert sharp[wm, 0] == pytest.approx(0.6**3 / (0.6**3 + 0.4**3), rel=1e-5)  # the majority tissue grows
    assert sharp[wm, 1] == pytest.approx(1.0) and sharp[gm, 1] == 0  # pure voxels stay pure
    assert sharp[gm, 2] == pytest.approx(0.35) and sharp[csf, 2] == pytest.approx(0.35)  # a tie stays a tie
    thicker = AnatomyChanges(0.0, None, thickness=_constant(0.3)).apply(anatomy).fractions
    assert (thicker[wm, 0], thicker[gm, 0]) == pytest.approx((0.6 - 0.3 * 0.6, 0.4 + 0.3 * 0.6))
    thinner = AnatomyChanges(0.0, None, thickness=_constant(-0.3)).apply(anatomy).fractions
    assert (thinner[wm, 0], thinner[gm, 0]) == pytest.approx((0.6 + 0.3 * 0.4, 0.4 - 0.3 * 0.4))
    for f in (thicker, thinner):
        np.testing.assert_allclose(f.sum(axis=0), anatomy.fractions.sum(axis=0), atol=1e-6)
        assert f[wm, 1] == 1.0 and f[gm, 2] == pytest.approx(0.35)  # no grey/white boundary: untouched


def test_world_v3_is_its_v2_namesake_with_an_individual_cortex(template: Template) -> None:
    sharper = 0
    for index in range(4):
        v2 = draw_subject(51, index, template, PhantomOptions(world="v2"))
        v3 = draw_subject(51, index, template, PhantomOptions(world="v3"))
        assert v3.protocol == v2.protocol and v3.tissues.manifest() == v2.tissues.manifest()
        assert v3.identity == v2.identity and v3.vendor == v2.vendor and v3.mprage_grid.shape == v2.mprage_grid.shape
        np.testing.assert_array_equal(v3.mprage_grid.affine, v2.mprage_grid.affine)
        assert v2.changes is not None and v3.changes is not None
        assert v2.changes.sharpness == 1 and v2.changes.thickness is None and not isinstance(v2.warp, FoldWarp)
        assert 1 <= v3.changes.sharpness <= 2.5 and v3.changes.thickness is not None
        assert v2.changes.atrophy <= v3.changes.atrophy <= v2.changes.atrophy + 0.25
        assert isinstance(v2.warp, VentricleWarp) and isinstance(v3.warp, FoldWarp)
        assert v3.warp.strength == v2.warp.strength and v3.warp.folds is not None
        points = template.centre_mm[:, None] + np.random.default_rng(index).uniform(-60, 60, (3, 4000))
        shift = v3.warp.to_template(points.astype(np.float32)) - v2.warp.to_template(points.astype(np.float32))
        assert 0.2 < float(np.sqrt((shift**2).mean())) < 2.0 * 2.5  # fold-scale SD U(0.5, 2) mm per component
        grid = mrf_grid(4)
        before, after = render(template, v2.warp, grid), render(template, v3.warp, grid)
        after = v3.changes.apply(after)
        assert after.fractions.sum(axis=0).max() <= 1 + 1e-5
        g = TISSUES.index("gm")
        purity = [float((a.fractions[g] > 0.9).sum() / (a.fractions[g] > 0.1).sum()) for a in (before, after)]
        sharper += v3.changes.sharpness > 1.3 and purity[1] > purity[0]
    assert sharper >= 1


def test_segmentation_takes_the_most_likely_tissue_and_keeps_the_total(template: Template) -> None:
    anatomy = _voxels(template, {"wm": [0.45, 0.9, 0.0], "gm": [0.55, 0.1, 0.5], "csf": [0.0, 0.0, 0.4]})
    wm, gm, csf = (TISSUES.index(n) for n in ("wm", "gm", "csf"))
    # The test voxels lie 8 mm apart (mrf_grid(8)): a blur of 0.1 mm leaves each voxel its own.
    hard = Segmentation(1.0, _constant(0.0), 0.1).apply(anatomy, anatomy.fractions)
    np.testing.assert_allclose(hard.sum(axis=0), anatomy.fractions.sum(axis=0), atol=1e-6)
    np.testing.assert_allclose(hard[[wm, gm, csf]], [[0, 1, 0], [1, 0, 0.9], [0, 0, 0]], atol=1e-6)
    # An offset of -log(2) on grey matter's log-fraction turns the 0.55 / 0.45 voxel to white matter.
    moved = Segmentation(1.0, _constant(-float(np.log(2))), 0.1).apply(anatomy, anatomy.fractions)
    assert moved[wm, 0] == pytest.approx(1.0) and moved[csf, 2] == pytest.approx(0.9)
    half = Segmentation(0.5, _constant(0.0), 0.1).apply(anatomy, anatomy.fractions)
    np.testing.assert_allclose(half, 0.5 * anatomy.fractions + 0.5 * hard, atol=1e-6)


def test_world_v4_is_its_v3_namesake_resegmented(template: Template) -> None:
    for index in range(2):
        v3 = draw_subject(61, index, template, PhantomOptions(world="v3"))
        v4 = draw_subject(61, index, template, PhantomOptions(world="v4"))
        assert v3.changes is not None and v4.changes is not None and v3.changes.segmentation is None
        seg = v4.changes.segmentation
        assert seg is not None and 0.5 <= seg.weight <= 1 and 0.3 <= seg.blur_mm <= 0.8
        assert v4.changes.sharpness == v3.changes.sharpness and v4.changes.atrophy == v3.changes.atrophy
        assert v4.protocol == v3.protocol and v4.tissues.manifest() == v3.tissues.manifest()
        grid = mrf_grid(4)
        before = v3.changes.apply(render(template, v3.warp, grid))
        after = v4.changes.apply(render(template, v4.warp, grid))
        np.testing.assert_allclose(after.fractions.sum(axis=0), before.fractions.sum(axis=0), atol=1e-4)
        g = TISSUES.index("gm")
        purity = [float((a.fractions[g] > 0.9).sum() / (a.fractions[g] > 0.1).sum()) for a in (before, after)]
        assert purity[1] > purity[0]


@pytest.mark.parametrize("family", list(Family))
def test_headers_say_what_the_vendor_writes_and_read_back(family: Family, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    protocol = next(p for p in (draw_protocol(rng, 1.5) for _ in range(200)) if p.family is family)
    vendor = {Family.MPRAGE: Vendor.SIEMENS, Family.IR_FSPGR: Vendor.GE, Family.TFE: Vendor.PHILIPS}[family]
    grid = acquisition_grid(matrix=(8, 8, 2))
    ds = classic_datasets(np.zeros((8, 8, 2), np.uint16), grid, protocol, make_identity("sub-001", "x", rng),
                          vendor)[0]
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    header = pydicom.dcmread(tmp_path / "x.dcm")
    assert float(header.MagneticFieldStrength) == 1.5
    expected_tr = protocol.tr_ms if family is Family.MPRAGE else protocol.echo_spacing_ms
    assert float(header.RepetitionTime) == pytest.approx(expected_tr, rel=1e-5)
    # What the phantom says a reader learns is what the product's reader learns from the file.
    assert protocol_from_dicom(header) == protocol.as_read(VENDOR_HEADERS[vendor].manufacturer)
