"""research/pv_conventions: the three partial-volume conventions against closed forms and each other."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import Sequence
from research.pv_conventions import Tissue, geometric_mean, matched_mixture, rate_average, shares_from_t1

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
