"""Dictionary grid, SVD basis (against numpy's SVD), energy captured by K, and the disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.mrf import dictionary as dictionary_module
from pipeline.mrf.dictionary import Dictionary, Grid, build_dictionary, load_or_build_dictionary, simulate_signals
from pipeline.mrf.sequence import Sequence

SMALL = Grid(t1_min_ms=200, t1_max_ms=3000, t2_min_ms=20, t2_max_ms=1000, step=0.15)


def test_default_grid_covers_brain_and_csf_in_two_percent_steps() -> None:
    grid = Grid()
    t1, t2 = grid.pairs()
    assert np.all(t2 < t1)
    assert t1.min() == 100 and t1.max() <= 5000 and t1.max() > 5000 / 1.02
    assert t2.min() == 10 and t2.max() <= 3000 and t2.max() > 3000 / 1.02
    assert np.allclose(np.diff(np.log(grid.t1_axis())), np.log(1.02))
    print(f"default grid: {t1.size} atoms")
    assert 30_000 < t1.size < 60_000


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"t1_min_ms": 0}, r"t1 range: need 0 < min < max"),
    ({"t2_min_ms": 5000}, r"t2 range: need 0 < min < max"),
    ({"step": 1.5}, r"step: relative step must be in \(0, 1\)"),
])
def test_bad_grids_are_named(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Grid(**kwargs)


def test_basis_agrees_with_numpy_svd_of_the_full_dictionary(default_sequence: Sequence) -> None:
    d = build_dictionary(default_sequence, SMALL)
    t1, t2 = SMALL.pairs()
    signals = simulate_signals(default_sequence, t1, t2).astype(np.float64)
    _, s, vt = np.linalg.svd(signals, full_matrices=False)
    assert np.allclose(d.singular_values[:10], s[:10], rtol=1e-4)
    basis = d.basis.astype(np.float64)
    assert np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-5)
    # Same subspace, and the same vectors up to the documented sign convention.
    for k in range(4):
        assert abs(abs(vt[k] @ basis[:, k]) - 1) < 1e-4
        assert basis[np.argmax(np.abs(basis[:, k])), k] > 0
    assert np.allclose(d.atoms, signals @ basis, atol=1e-4)


def test_energy_captured_by_rank(default_dictionary: Dictionary) -> None:
    fractions = {k: default_dictionary.energy_fraction(k) for k in (1, 4, 8, 15)}
    print("energy fraction by K:", {k: round(v, 6) for k, v in fractions.items()})
    assert fractions[1] < fractions[4] < fractions[8] < fractions[15] <= 1
    assert fractions[4] > 0.99  # method.md: most of the signal is in the first 4 components


def test_cache_makes_the_second_call_instant_and_identical(default_sequence: Sequence,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_or_build_dictionary(default_sequence, SMALL, rank=8)

    def must_not_build(*args: object, **kwargs: object) -> Dictionary:
        raise AssertionError("cache miss: the dictionary was rebuilt")

    monkeypatch.setattr(dictionary_module, "build_dictionary", must_not_build)
    again = load_or_build_dictionary(default_sequence, SMALL, rank=4)
    assert np.array_equal(again.atoms, first.atoms[:, :4])
    assert again.sequence_hash == default_sequence.hash()


def test_rank_out_of_range_is_refused(default_sequence: Sequence) -> None:
    with pytest.raises(ValueError, match=r"rank: must be in 1\.\.32, got 40"):
        load_or_build_dictionary(default_sequence, SMALL, rank=40)
