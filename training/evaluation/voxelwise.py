"""Voxelwise median absolute and signed percent error per tissue: 100 |other - reference| / reference and
100 (other - reference) / reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from training.evaluation.subjects import SubjectMaps

COLUMNS = ("subject", "tissue", "reference", "other", "quantity", "n_voxels", "median_ape", "median_pe",
           "median_reference", "median_other")
"""Columns of the voxelwise table; ``median_ape`` (absolute) and ``median_pe`` (signed) are in percent,
``median_reference`` and ``median_other`` are the two maps' medians over the same voxels (ms for T1 and T2)."""


def _percent_errors(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    ref, oth = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape:
        raise ValueError(f"other: shape {oth.shape} differs from reference {ref.shape}")
    keep = ref > 0
    return 100 * (oth[keep] - ref[keep]) / ref[keep]


def median_absolute_percent_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Median of 100 |other - reference| / reference over voxels with reference > 0 (NaN if none)."""
    errors = _percent_errors(reference, other)
    return float(np.median(np.abs(errors))) if errors.size else float("nan")


def median_percent_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Median of 100 (other - reference) / reference over voxels with reference > 0 (NaN if none): the bias."""
    errors = _percent_errors(reference, other)
    return float(np.median(errors)) if errors.size else float("nan")


def subject_errors(subject: SubjectMaps, comparisons: Sequence[tuple[str, str]],
                   quantities: Sequence[str] = ("T1", "T2")) -> pd.DataFrame:
    """Rows of :data:`COLUMNS` for each tissue mask (within the brain mask) x comparison x quantity."""
    subject.require({name for pair in comparisons for name in pair}, quantities)
    rows: list[dict[str, object]] = []
    for tissue, tmask in subject.tissue_masks.items():
        inside = tmask & subject.brain_mask
        for reference, other in comparisons:
            for quantity in quantities:
                ref = np.asarray(subject.maps[reference][quantity])[inside]
                oth = np.asarray(subject.maps[other][quantity])[inside]
                valid = ref > 0
                rows.append({"subject": subject.subject_id, "tissue": tissue, "reference": reference,
                             "other": other, "quantity": quantity, "n_voxels": int(np.count_nonzero(valid)),
                             "median_ape": median_absolute_percent_error(ref, oth),
                             "median_pe": median_percent_error(ref, oth),
                             "median_reference": float(np.median(ref[valid])) if valid.any() else float("nan"),
                             "median_other": float(np.median(oth[valid])) if valid.any() else float("nan")})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarise_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Across subjects, per tissue x comparison x quantity: median, first and third quartile of the
    per-subject median APE, the median of the per-subject signed median error, and the number of subjects."""
    grouped = table.dropna(subset=["median_ape"]).groupby(["tissue", "reference", "other", "quantity"], sort=False)
    groups = grouped["median_ape"]
    return pd.DataFrame({"median_ape": groups.median(), "q1": groups.quantile(0.25), "q3": groups.quantile(0.75),
                         "median_pe": grouped["median_pe"].median(), "n_subjects": groups.size()}).reset_index()
