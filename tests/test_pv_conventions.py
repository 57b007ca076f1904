"""research/pv_conventions: the three partial-volume conventions against closed forms and each other."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import Sequence
from research.pv_conventions import (
    Tissue,
    geometric_mean,
    matched_mixture,
    rate_average,
    shares_from_t1,
    subject_table,
    summary,
)
from training.phantom.regions import label_id

GM, CSF, WM = Tissue(1420.0, 96.0), Tissue(4300.0, 1800.0), Tissue(880.0, 68.0)


def test_rate_and_geometric_by_hand() -> None:
    # 30 % CSF: 1/T2 = 0.7/96 + 0.3/1800 -> 134.1 ms; geometric 96^0.7 * 1800^0.3 -> 231.3 ms
    t1, t2 = rate_average(GM, CSF, np.array([0.3]))
    assert t2[0] == pytest.approx(1 / (0.7 / 96 + 0.3 / 1800)) and t2[0] == pytest.approx(134.1, abs=0.1)
    assert t1[0] == pytest.approx(1 / (0.7 / 1420 + 0.3 / 4300))
    assert geometric_mean(GM, CSF, np.array([0.3]))[1][0] == pytest.approx(231.3, abs=0.1)


def test_shares_from_t1_invert_the_rate_average() -> None:
    shares = np.array([0.0, 0.1, 0.35, 0.8, 1.0])
    with_csf, csf_share = shares_from_t1(rate_average(GM, CSF, shares)[0], GM, CSF, WM)
    assert with_csf.all()
    np.testing.assert_allclose(csf_share, shares, atol=1e-12)
    with_csf, wm_share = shares_from_t1(rate_average(GM, WM, shares[1:])[0], GM, CSF, WM)
    assert not with_csf.any()
    np.testing.assert_allclose(wm_share, shares[1:], atol=1e-12)
    assert shares_from_t1(np.array([5000.0, 700.0]), GM, CSF, WM)[1].tolist() == [1.0, 1.0]  # clipped


def test_matched_mixture_is_pure_at_the_ends_and_between_the_other_conventions(
        default_sequence: Sequence, default_dictionary: Dictionary) -> None:
    matcher = Matcher(default_dictionary, device="cpu")
    shares = np.array([0.0, 0.1, 0.3, 0.5])
    t1, t2 = matched_mixture(default_sequence, default_dictionary, matcher, GM, CSF, shares)
    # pure grey matter: its own values within the dictionary's 2 % grid
    assert t1[0] == pytest.approx(GM.t1_ms, rel=0.021) and t2[0] == pytest.approx(GM.t2_ms, rel=0.021)
    # slow exchange reads a CSF mixture longer than fast exchange and shorter than the geometric mean
    rate, geo = rate_average(GM, CSF, shares[1:]), geometric_mean(GM, CSF, shares[1:])
    assert (t2[1:] > rate[1] * 1.02).all() and (t2[1:] < geo[1]).all()
    assert (np.diff(t2) > 0).all() and (np.diff(t1) > 0).all()


def test_subject_table_rebuilds_a_rate_convention_subject(tmp_path: Path, default_sequence: Sequence,
                                                          default_dictionary: Dictionary) -> None:
    """A subject whose cortex voxels hold 20 % CSF and whose white matter is pure, with rate-average truth: the
    table recovers the share, rebuilds the truth exactly and puts the other conventions where their closed forms
    (geometric) and the matched mixture say."""
    shape = (4, 4, 4)
    labels = np.full(shape, label_id("left frontal cortex"), dtype=np.int16)
    labels[2:] = label_id("left frontal white matter")
    cortex_t1, cortex_t2 = rate_average(GM, CSF, np.array(0.2))
    t1 = np.where(labels == label_id("left frontal cortex"), cortex_t1, WM.t1_ms).astype(np.float32)
    t2 = np.where(labels == label_id("left frontal cortex"), cortex_t2, WM.t2_ms).astype(np.float32)
    sub = tmp_path / "sub-001"
    sub.mkdir()
    for name, array in (("T1", t1), ("T2", t2), ("labels", labels), ("brain_mask", np.ones(shape, np.uint8))):
        nib.save(nib.Nifti1Image(array, np.eye(4)), sub / f"{name}.nii.gz")
    entry = {"tissues": {k: {"t1_ms": v.t1_ms, "t2_ms": v.t2_ms} for k, v in (("gm", GM), ("csf", CSF), ("wm", WM))}}
    matcher = Matcher(default_dictionary, device="cpu")
    table = subject_table(sub, entry, default_sequence, default_dictionary, matcher, slice_step=1)
    cortex = table[table.tissue == "GM"].iloc[0]
    assert cortex.csf_share == pytest.approx(0.2, abs=1e-4)
    assert cortex.rate_T1 == pytest.approx(cortex.truth_T1, rel=1e-4)
    assert cortex.rate_T2 == pytest.approx(cortex.truth_T2, rel=1e-4)
    assert cortex.geometric_T2 == pytest.approx(float(geometric_mean(GM, CSF, np.array(0.2))[1]), rel=1e-4)
    matched = matched_mixture(default_sequence, default_dictionary, matcher, GM, CSF, np.array([0.2]))[1][0]
    assert cortex.match_T2 == pytest.approx(matched, rel=0.01)  # the tabulated share grid, interpolated
    wm = table[table.tissue == "WM"].iloc[0]
    assert wm.csf_share == 0 and wm.rate_T1 == pytest.approx(WM.t1_ms, rel=1e-4)
    percent = summary(table)
    assert percent.loc["GM", "rate_T2_%"] == pytest.approx(0, abs=0.01)
    assert percent.loc["GM", "geometric_T2_%"] > percent.loc["GM", "match_T2_%"] > 5
    with pytest.raises(ValueError, match="no gm, csf and wm tissue values"):
        subject_table(sub, {"tissues": {"gm": entry["tissues"]["gm"]}}, default_sequence, default_dictionary, matcher)
