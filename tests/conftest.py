"""Shared fixtures: one dictionary cache per test session, the default sequence and dictionary."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.mrf.dictionary import Dictionary, load_or_build_dictionary
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, Sequence, load_sequence


@pytest.fixture(scope="session", autouse=True)
def dictionary_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test session builds its dictionaries once, in its own cache folder."""
    path = tmp_path_factory.mktemp("synthmrf-cache")
    old = os.environ.get("SYNTHMRF_CACHE_DIR")
    os.environ["SYNTHMRF_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SYNTHMRF_CACHE_DIR", None)
    else:
        os.environ["SYNTHMRF_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def default_sequence() -> Sequence:
    return load_sequence(DEFAULT_SEQUENCE)


@pytest.fixture(scope="session")
def default_dictionary(default_sequence: Sequence, dictionary_cache: Path) -> Dictionary:
    """The shipped sequence's rank-4 dictionary on the default grid."""
    return load_or_build_dictionary(default_sequence, rank=4)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory, default_dictionary: Dictionary) -> Path:
    """Three half-resolution phantom subjects (train/val/test one each), shared by the model tests."""
    from training.phantom.dataset import make_dataset
    from training.phantom.subject import PhantomOptions

    out = tmp_path_factory.mktemp("tiny-phantom") / "ds"
    make_dataset(3, out, seed=11, options=PhantomOptions(downsample=2), progress=False)
    return out
