"""Voxelwise median absolute percent error per tissue: 100 |other - reference| / reference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from training.evaluation.subjects import SubjectMaps

COLUMNS = ("subject", "tissue", "reference", "other", "quantity", "n_voxels", "median_ape")
"""Columns of the voxelwise table; ``median_ape`` is in percent."""


def median_absolute_percent_error(reference: np.ndarray, other: np.ndarray) -> float:
    """Median of 100 |other - reference| / reference over voxels with reference > 0 (NaN if none)."""
    ref, oth = np.asarray(reference, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if ref.shape != oth.shape:
        raise ValueError(f"other: shape {oth.shape} differs from reference {ref.shape}")
    keep = ref > 0
    if not keep.any():
        return float("nan")
    return float(np.median(100 * np.abs(oth[keep] - ref[keep]) / ref[keep]))


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
                rows.append({"subject": subject.subject_id, "tissue": tissue, "reference": reference,
                             "other": other, "quantity": quantity, "n_voxels": int(np.count_nonzero(ref > 0)),
                             "median_ape": median_absolute_percent_error(
                                 ref, np.asarray(subject.maps[other][quantity])[inside])})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarise_errors(table: pd.DataFrame) -> pd.DataFrame:
    """Across subjects, per tissue x comparison x quantity: median, first and third quartile of the
    per-subject median APE, and the number of subjects."""
    groups = table.dropna(subset=["median_ape"]).groupby(["tissue", "reference", "other", "quantity"],
                                                          sort=False)["median_ape"]
    return pd.DataFrame({"median_ape": groups.median(), "q1": groups.quantile(0.25), "q3": groups.quantile(0.75),
                         "n_subjects": groups.size()}).reset_index()
