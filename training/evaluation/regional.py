"""Per-region, per-subject means and SDs of the maps (the paper's Table 3 analogue), in long format."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from training.evaluation.subjects import SubjectMaps, tissue_of_region

COLUMNS = ("subject", "region", "label", "map_set", "quantity", "n_voxels", "mean", "sd")
"""Columns of the regional table; ``sd`` is the sample SD (ddof=1) of the region's voxels."""


def region_statistics(values: np.ndarray, labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """Voxel count, mean and sample SD (ddof=1) of ``values`` per label 0..n_labels (two passes).

    Mean is NaN for an empty label, SD for a label with fewer than two voxels.
    """
    if values.shape != labels.shape:
        raise ValueError(f"values: shape {values.shape} differs from labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > n_labels):
        raise ValueError(f"labels: must lie in 0..{n_labels}, got {labels.min()}..{labels.max()}")
    flat_labels = labels.ravel()
    flat = values.ravel().astype(np.float64)
    count = np.bincount(flat_labels, minlength=n_labels + 1)[: n_labels + 1]
    total = np.bincount(flat_labels, weights=flat, minlength=n_labels + 1)[: n_labels + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        centred = flat - mean[flat_labels]
        squares = np.bincount(flat_labels, weights=centred * centred, minlength=n_labels + 1)[: n_labels + 1]
        sd = np.sqrt(squares / (count - 1))
    sd[count < 2] = np.nan
    return count, mean, sd


def subject_table(subject: SubjectMaps, map_sets: Sequence[str], quantities: Sequence[str]) -> pd.DataFrame:
    """Regional rows of one subject: every named region (brain-mask voxels only) x map set x quantity."""
    labels = np.where(subject.brain_mask, subject.labels, 0)
    ids = sorted(subject.region_names)
    n_labels = max([*ids, int(labels.max())])
    subject.require(map_sets, quantities)
    rows: list[dict[str, object]] = []
    for map_set in map_sets:
        for quantity in quantities:
            count, mean, sd = region_statistics(np.asarray(subject.maps[map_set][quantity]), labels, n_labels)
            rows += [{"subject": subject.subject_id, "region": subject.region_names[k], "label": k,
                      "map_set": map_set, "quantity": quantity, "n_voxels": int(count[k]),
                      "mean": float(mean[k]), "sd": float(sd[k])} for k in ids]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def regional_table(subjects: Iterable[SubjectMaps], map_sets: Sequence[str],
                   quantities: Sequence[str] = ("T1", "T2")) -> pd.DataFrame:
    """Long table (:data:`COLUMNS`) for all subjects."""
    return pd.concat([subject_table(s, map_sets, quantities) for s in subjects], ignore_index=True)


def regional_matrix(table: pd.DataFrame, map_set: str, quantity: str,
                    statistic: str = "mean") -> tuple[list[str], list[str], np.ndarray]:
    """Subjects, regions and a (subjects, regions) array of ``statistic`` (NaN where missing)."""
    if statistic not in ("mean", "sd", "n_voxels"):
        raise ValueError(f"statistic: must be 'mean', 'sd' or 'n_voxels', got {statistic!r}")
    rows = table[(table["map_set"] == map_set) & (table["quantity"] == quantity)]
    if rows.empty:
        raise ValueError(f"map_set, quantity: no rows for ({map_set!r}, {quantity!r})")
    wide = rows.pivot(index="subject", columns="label", values=statistic)
    names = rows.drop_duplicates("label").set_index("label")["region"]
    return list(wide.index), [str(names[k]) for k in wide.columns], wide.to_numpy(dtype=np.float64)


BETWEEN_COLUMNS = ("reference", "other", "quantity", "tissue", "n_subjects", "r", "sd_reference", "sd_other",
                   "mean_difference_percent")
"""Columns of :func:`between_subjects`: Pearson r of the subjects' tissue means, their SDs (ms) and the mean of
100 (other - reference) / reference."""


def tissue_means(table: pd.DataFrame, map_set: str, quantity: str, tissue: str) -> pd.Series:
    """Each subject's mean over the voxels of its ``tissue`` regions (:func:`tissue_of_region`; the regional
    means weighted by voxel count), indexed by subject."""
    rows = table[(table["map_set"] == map_set) & (table["quantity"] == quantity)
                 & (table["region"].map(tissue_of_region) == tissue) & (table["n_voxels"] > 0)]
    weighted = (rows["mean"] * rows["n_voxels"]).groupby(rows["subject"]).sum()
    return weighted / rows.groupby("subject")["n_voxels"].sum()


def between_subjects(table: pd.DataFrame, comparisons: Sequence[tuple[str, str]], quantities: Sequence[str],
                     tissues: Sequence[str] = ("GM", "WM")) -> pd.DataFrame:
    """Does ``other`` follow ``reference`` from subject to subject? Per comparison, quantity and tissue, one mean
    per subject (:func:`tissue_means`) and, over subjects, :data:`BETWEEN_COLUMNS` (r is NaN under 3 subjects
    or a constant set). A map set whose subject means spread like the reference's with r near 0 moves between
    subjects for reasons of its own."""
    rows = []
    for reference, other in comparisons:
        for quantity in quantities:
            for tissue in tissues:
                ref = tissue_means(table, reference, quantity, tissue)
                oth = tissue_means(table, other, quantity, tissue).reindex(ref.index)
                if ref.empty:
                    continue
                a, b = ref.to_numpy(np.float64), oth.to_numpy(np.float64)
                r = float(np.corrcoef(a, b)[0, 1]) if a.size >= 3 and a.std() > 0 and b.std() > 0 else float("nan")
                rows.append({"reference": reference, "other": other, "quantity": quantity, "tissue": tissue,
                             "n_subjects": int(a.size), "r": r,
                             "sd_reference": float(a.std(ddof=1)) if a.size > 1 else float("nan"),
                             "sd_other": float(b.std(ddof=1)) if b.size > 1 else float("nan"),
                             "mean_difference_percent": float(np.mean(100 * (b - a) / a))})
    return pd.DataFrame(rows, columns=list(BETWEEN_COLUMNS))
