"""The trivial baseline a model must beat: a lookup from normalised MPRAGE intensity to truth T1 and T2.

No learning: the brain voxels of a dataset's *training* subjects are binned by their normalised MPRAGE
intensity (the model's normalisation, e.g. "p95"), and each bin stores the median ground-truth T1 and T2
of its voxels (the lookup need not be monotone). A subject's lookup maps send each brain voxel's
intensity through the table. One table per MRI field strength of the training subjects (their
manifest ``acquisition.field_strength_t``; sequence families are pooled); a subject at a field strength
the training set lacks gets the table of the nearest one. The lookup refuses the subjects it was
fitted on. A fitted baseline is kept in the prepared-array cache (``lookup-<key>.npz``), keyed on the
dataset's manifest (its seed, options and split), the training subjects' files, the normalisation and the
fitting settings; an unreadable one is fitted again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.npz_cache import read_cached, write_cached
from training.evaluation.datasets import DatasetInfo, normalised_volume
from training.evaluation.subjects import load_phantom_subject
from training.preprocess import CACHE_FORMAT as PREPARED_FORMAT

logger = logging.getLogger(__name__)

N_BINS = 256
MAX_VOXELS_PER_SUBJECT = 200_000
"""Brain voxels drawn per training subject (seeded): bounds the memory of fitting on many subjects."""
CACHE_FORMAT = 1
"""Version of the cached lookup's file and of the fit: raise it when either changes."""
TABLE_ARRAYS = ("edges", "t1_ms", "t2_ms", "n_voxels")


@dataclass(frozen=True)
class IntensityLookup:
    """Median truth T1 and T2 (ms) per bin of normalised intensity, ``n_voxels`` per bin.

    Bins split the fitted intensities' range evenly; an empty bin takes the linear interpolation of the
    nearest filled bins' medians, and intensities outside the range take the edge bins.
    """

    edges: np.ndarray  # (n_bins + 1,)
    t1_ms: np.ndarray  # (n_bins,)
    t2_ms: np.ndarray  # (n_bins,)
    n_voxels: np.ndarray  # (n_bins,)

    @classmethod
    def fit(cls, intensity: np.ndarray, t1_ms: np.ndarray, t2_ms: np.ndarray, *, n_bins: int = N_BINS,
            ) -> IntensityLookup:
        """The lookup of paired voxel values (1-D arrays of one length)."""
        x = np.asarray(intensity, np.float64).ravel()
        t1, t2 = np.asarray(t1_ms, np.float64).ravel(), np.asarray(t2_ms, np.float64).ravel()
        if not x.size == t1.size == t2.size:
            raise ValueError(f"intensity, t1_ms, t2_ms: lengths {x.size}, {t1.size}, {t2.size} differ")
        if n_bins < 1:
            raise ValueError(f"n_bins: must be >= 1, got {n_bins}")
        if x.size == 0 or not np.isfinite(x).all():
            raise ValueError("intensity: need at least one voxel, all finite")
        lo, hi = float(x.min()), float(x.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)
        index = _bins(edges, x)
        counts = np.bincount(index, minlength=n_bins)
        return cls(edges, _bin_medians(index, t1, counts), _bin_medians(index, t2, counts), counts)

    def __call__(self, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """T1 and T2 (ms) of each intensity."""
        index = _bins(self.edges, np.asarray(intensity, np.float64))
        return self.t1_ms[index], self.t2_ms[index]


def _bins(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, edges.size - 2)


def _bin_medians(index: np.ndarray, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    ordered = values[np.lexsort((values, index))]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    filled = np.flatnonzero(counts)
    first, n = starts[filled], counts[filled]
    medians = 0.5 * (ordered[first + (n - 1) // 2] + ordered[first + n // 2])
    return np.interp(np.arange(counts.size), filled, medians)


@dataclass(frozen=True)
class LookupSample:
    """Brain voxels of one training subject: normalised intensity and truth T1/T2 (ms)."""

    subject_dir: Path
    field_strength_t: float
    intensity: np.ndarray
    t1_ms: np.ndarray
    t2_ms: np.ndarray


@dataclass(frozen=True)
class LookupBaseline:
    """Intensity lookups by field strength (T), fitted on the subject folders ``fitted_on`` (resolved)."""

    tables: Mapping[float, IntensityLookup]
    fitted_on: frozenset[Path]
    normalisation: str

    @classmethod
    def fit(cls, samples: Iterable[LookupSample], normalisation: str, *, n_bins: int = N_BINS) -> LookupBaseline:
        """One lookup per field strength of ``samples`` (the training subjects)."""
        by_field: dict[float, list[LookupSample]] = {}
        for sample in samples:
            by_field.setdefault(round(float(sample.field_strength_t), 2), []).append(sample)
        if not by_field:
            raise ValueError("samples: no training subjects to fit the lookup on")
        tables = {field: IntensityLookup.fit(*(np.concatenate([getattr(s, k) for s in group])
                                               for k in ("intensity", "t1_ms", "t2_ms")), n_bins=n_bins)
                  for field, group in sorted(by_field.items())}
        fitted_on = frozenset(s.subject_dir.resolve() for group in by_field.values() for s in group)
        return cls(tables, fitted_on, normalisation)

    def table(self, field_strength_t: float) -> IntensityLookup:
        """The lookup of the nearest fitted field strength."""
        nearest = min(self.tables, key=lambda f: abs(f - field_strength_t))
        if abs(nearest - field_strength_t) > 0.1 * nearest:
            logger.warning("lookup baseline: no training subjects at %g T, using the %g T lookup",
                           field_strength_t, nearest)
        return self.tables[nearest]

    def maps(self, subject_dir: Path, volume: np.ndarray, mask: np.ndarray,
             field_strength_t: float) -> dict[str, np.ndarray]:
        """T1 and T2 maps (ms, zero outside ``mask``) of a subject's normalised MPRAGE ``volume``."""
        if subject_dir.resolve() in self.fitted_on:
            raise ValueError(f"{subject_dir}: the lookup baseline was fitted on this subject; evaluate it on "
                             "subjects outside its training split (choose another --baseline-data or --split)")
        t1, t2 = self.table(field_strength_t)(volume[mask])
        out = {"T1": np.zeros(mask.shape, np.float32), "T2": np.zeros(mask.shape, np.float32)}
        out["T1"][mask], out["T2"][mask] = t1, t2
        return out

    def to_frame(self) -> pd.DataFrame:
        """The lookups as a table: field strength, bin range, voxels, median T1 and T2 (ms)."""
        return pd.concat([pd.DataFrame({"field_strength_t": field, "intensity_low": t.edges[:-1],
                                        "intensity_high": t.edges[1:], "n_voxels": t.n_voxels,
                                        "t1_ms": t.t1_ms, "t2_ms": t.t2_ms}) for field, t in self.tables.items()],
                         ignore_index=True)


def subject_sample(dataset: DatasetInfo, subject: str, cache: Path, normalisation: str, *,
                   max_voxels: int | None = MAX_VOXELS_PER_SUBJECT, seed: int = 0) -> LookupSample:
    """Brain voxels of the subject's prepared slices (at most ``max_voxels``, drawn with ``seed``)."""
    truth = load_phantom_subject(dataset.root, subject)
    prepared = dataset.prepare(subject, cache)
    volume = normalised_volume(prepared, truth.labels.shape, normalisation)
    mask = truth.brain_mask.copy()
    mask[:, :, np.setdiff1d(np.arange(mask.shape[2]), prepared.slices)] = False
    pick = np.flatnonzero(mask)
    if max_voxels is not None and pick.size > max_voxels:
        pick = np.sort(np.random.default_rng(seed).choice(pick, max_voxels, replace=False))
    maps = truth.maps["truth"]
    return LookupSample(dataset.root / subject, dataset.protocol(subject).field_strength_t, volume.ravel()[pick],
                        np.asarray(maps["T1"]).ravel()[pick], np.asarray(maps["T2"]).ravel()[pick])


def fit_baseline(dataset: DatasetInfo, cache: Path, normalisation: str, *, n_bins: int = N_BINS,
                 max_voxels: int | None = MAX_VOXELS_PER_SUBJECT, progress: bool = True) -> LookupBaseline:
    """The lookup baseline of the dataset's train split (prepared arrays and the fitted lookup cached in ``cache``)."""
    subjects = dataset.split("train")
    if not subjects:
        raise ValueError(f"{dataset.root}: the train split is empty; the lookup baseline is fitted on training "
                         "subjects only (give --baseline-data a dataset with a train split)")

    stored = cache / f"lookup-{_cache_key(dataset, subjects, normalisation, n_bins, max_voxels)}.npz"
    arrays = read_cached(stored, ("fields", *TABLE_ARRAYS))
    if arrays is not None:
        logger.info("lookup baseline of %s read from %s", dataset.root, stored)
        return LookupBaseline({float(f): IntensityLookup(*(arrays[k][i] for k in TABLE_ARRAYS))
                               for i, f in enumerate(arrays["fields"])},
                              frozenset((dataset.root / s).resolve() for s in subjects), normalisation)

    def samples() -> Iterator[LookupSample]:
        for i, subject in enumerate(tqdm(subjects, desc="fitting the lookup", unit="subject", disable=not progress)):
            yield subject_sample(dataset, subject, cache, normalisation, max_voxels=max_voxels, seed=i)

    baseline = LookupBaseline.fit(samples(), normalisation, n_bins=n_bins)
    logger.info("lookup baseline fitted on %d training subjects of %s (field strengths %s T)", len(subjects),
                dataset.root, ", ".join(f"{f:g}" for f in baseline.tables))
    fields = sorted(baseline.tables)
    write_cached(stored, {"fields": np.asarray(fields),
                          **{k: np.stack([getattr(baseline.tables[f], k) for f in fields]) for k in TABLE_ARRAYS}})
    return baseline


def _cache_key(dataset: DatasetInfo, subjects: list[str], normalisation: str, n_bins: int,
               max_voxels: int | None) -> str:
    """What a fitted lookup depends on: the manifest (seed, options, split), the training subjects' files (name,
    size, modification time), the prepared arrays' and the lookup's formats, the normalisation and the fit's
    settings."""
    files = {s: sorted((f.name, st.st_size, st.st_mtime_ns) for f in (dataset.root / s).iterdir()
                       if f.is_file() and (st := f.stat())) for s in subjects}
    doc = {"format": CACHE_FORMAT, "prepared_format": PREPARED_FORMAT, "manifest": dataset.manifest,
           "files": files, "normalisation": normalisation, "n_bins": n_bins, "max_voxels": max_voxels}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]
