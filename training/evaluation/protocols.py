"""Agreement with the truth per acquisition group (sequence family x field strength), plain estimates.

Per group and map set: Lin's CCC of the regional means (all subjects' regions pooled; every region, and
the GM and WM regions only, as in the report's second agreement table), the median over
subjects of the voxelwise median absolute percent error per tissue, and the mean bias
100 (map set - truth) / truth of the regional means of the tissue's regions (:func:`tissue_of_region`),
averaged over the group's subjects and regions. No bootstrap: groups hold few subjects.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.protocol import AcquisitionProtocol
from training.evaluation.agreement import lin_ccc
from training.evaluation.report import TISSUE_REGION_CLASSES
from training.evaluation.subjects import NEAR_PURE_SUFFIX, tissue_of_region

TISSUES = ("WM", "GM")
NEAR_PURE_TISSUES = tuple(t + NEAR_PURE_SUFFIX for t in TISSUES)


def protocol_group(protocol: AcquisitionProtocol) -> str:
    """A subject's group: sequence family and field strength, e.g. ``"mprage 3T"``."""
    return f"{protocol.family.value} {protocol.field_strength_t:g}T"


def metric_columns(quantities: Sequence[str] = ("T1", "T2"), tissues: Sequence[str] = TISSUES) -> list[str]:
    """The metric columns of :func:`protocol_table`."""
    return ([f"ccc_{q}" for q in quantities] + [f"ccc_gmwm_{q}" for q in quantities]
            + [f"mape_{t}_{q}" for q in quantities for t in tissues]
            + [f"bias_{t}_{q}" for q in quantities for t in tissues])


def protocol_table(regional: pd.DataFrame, voxelwise: pd.DataFrame, groups: Mapping[str, str], *,
                   reference: str = "truth", others: Sequence[str] = ("dl", "lookup"),
                   quantities: Sequence[str] = ("T1", "T2"), tissues: Sequence[str] = TISSUES) -> pd.DataFrame:
    """One row per group (sorted) x map set in ``others``: ``group``, ``n_subjects``, ``map_set`` and
    :func:`metric_columns` (percentages for ``mape_*`` and ``bias_*``; NaN where undefined).

    ``regional``: the long regional table (:mod:`training.evaluation.regional`); ``voxelwise``: per-subject
    voxelwise rows (:mod:`training.evaluation.voxelwise`); ``groups``: subject -> group of every subject.
    """
    _check_groups(regional, groups)
    tissue = regional["region"].map(tissue_of_region)
    rows: list[dict[str, object]] = []
    for group in sorted(set(groups.values())):
        members = [s for s, g in groups.items() if g == group]
        in_group = regional["subject"].isin(members)
        for other in others:
            row: dict[str, object] = {"group": group, "n_subjects": len(members), "map_set": other}
            for quantity in quantities:
                selected = in_group & (regional["quantity"] == quantity)
                row[f"ccc_{quantity}"] = _ccc(_pairs(regional[selected], reference, other), reference, other)
                row[f"ccc_gmwm_{quantity}"] = _ccc(_pairs(regional[selected & tissue.isin(TISSUE_REGION_CLASSES)],
                                                          reference, other), reference, other)
                for t in tissues:
                    errors = _voxel_rows(voxelwise, t, reference, other, quantity, members)["median_ape"].dropna()
                    row[f"mape_{t}_{quantity}"] = float(errors.median()) if len(errors) else float("nan")
                    pt = _pairs(regional[selected & (tissue == t)], reference, other)
                    pt = pt[pt[reference] > 0]
                    row[f"bias_{t}_{quantity}"] = float(np.mean(100 * (pt[other] - pt[reference]) / pt[reference])) \
                        if len(pt) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows, columns=["group", "n_subjects", "map_set", *metric_columns(quantities, tissues)])


def near_pure_table(voxelwise: pd.DataFrame, groups: Mapping[str, str], *, reference: str = "truth",
                    others: Sequence[str] = ("dl", "lookup"),
                    quantities: Sequence[str] = ("T1", "T2")) -> pd.DataFrame:
    """Voxelwise errors on near-pure tissue voxels (:func:`training.evaluation.subjects.near_pure_masks`), one row
    per group (sorted) x map set: ``group``, ``n_subjects``, ``map_set``, ``mape_{tissue}_{q}`` (median over the
    group's subjects of the voxel median absolute percent error) and ``bias_{tissue}_{q}`` (median over subjects of
    the voxel median signed percent error) for the near-pure tissues; empty when ``voxelwise`` has none."""
    _check_groups(voxelwise, groups)
    tissues = [t for t in NEAR_PURE_TISSUES if t in set(voxelwise["tissue"])]
    columns = [f"{kind}_{t}_{q}" for kind in ("mape", "bias") for q in quantities for t in tissues]
    rows: list[dict[str, object]] = []
    for group in sorted(set(groups.values())) if tissues else []:
        members = [s for s, g in groups.items() if g == group]
        for other in others:
            row: dict[str, object] = {"group": group, "n_subjects": len(members), "map_set": other}
            for quantity in quantities:
                for t in tissues:
                    selected = _voxel_rows(voxelwise, t, reference, other, quantity,
                                           members).dropna(subset=["median_ape"])
                    row[f"mape_{t}_{quantity}"] = float(selected["median_ape"].median()) if len(selected) \
                        else float("nan")
                    row[f"bias_{t}_{quantity}"] = float(selected["median_pe"].median()) if len(selected) \
                        else float("nan")
            rows.append(row)
    return pd.DataFrame(rows, columns=["group", "n_subjects", "map_set", *columns])


FOLLOW_COLUMNS = ("map_set", "quantity", "tissue", "n_subjects", "n_groups", "slope", "r", "sd_reference_ms",
                  "sd_other_ms")
"""Columns of :func:`near_pure_follow`."""


def near_pure_follow(voxelwise: pd.DataFrame, groups: Mapping[str, str], *, reference: str = "truth",
                     others: Sequence[str] = ("dl", "lookup"),
                     quantities: Sequence[str] = ("T1", "T2")) -> pd.DataFrame:
    """Does a map set follow each subject's own tissue value, or read its prior? One row per map set x quantity x
    near-pure tissue (:data:`FOLLOW_COLUMNS`), over the subjects of every group together.

    Per subject x = the reference's median over its near-pure voxels (nearly the tissue value the subject was drawn
    with), y = the map set's median over the same voxels. Both are taken as deviations from their group's mean
    (acquisition groups differ by field strength, which no subject-level reading should get credit for), then
    ``slope`` = sum(dx dy) / sum(dx^2) (1: the map moves with the subject's tissue; 0: it reads one value whatever
    the subject), ``r`` their correlation and the SDs of dx and dy (ms, over n - groups degrees of freedom). Slope and
    r are NaN unless at least two subjects are left beyond one per group and dx varies (r also when dy does not
    vary: a map that reads one value); the SDs are NaN only without a subject beyond one per group.
    """
    _check_groups(voxelwise, groups)
    rows: list[dict[str, object]] = []
    for other in others:
        for quantity in quantities:
            for tissue in [t for t in NEAR_PURE_TISSUES if t in set(voxelwise["tissue"])]:
                sel = _voxel_rows(voxelwise, tissue, reference, other, quantity).dropna(
                    subset=["median_reference", "median_other"])
                if sel.empty:
                    continue
                group = sel["subject"].map(groups)
                dx = (sel["median_reference"] - sel.groupby(group)["median_reference"].transform("mean")).to_numpy()
                dy = (sel["median_other"] - sel.groupby(group)["median_other"].transform("mean")).to_numpy()
                n, k = len(sel), int(group.nunique())
                sxx, syy = float(dx @ dx), float(dy @ dy)
                usable = n - k >= 2 and sxx > 0
                rows.append({"map_set": other, "quantity": quantity, "tissue": tissue, "n_subjects": n,
                             "n_groups": k, "slope": float(dx @ dy) / sxx if usable else float("nan"),
                             "r": float(dx @ dy) / np.sqrt(sxx * syy) if usable and syy > 0 else float("nan"),
                             "sd_reference_ms": float(np.sqrt(sxx / (n - k))) if n > k else float("nan"),
                             "sd_other_ms": float(np.sqrt(syy / (n - k))) if n > k else float("nan")})
    return pd.DataFrame(rows, columns=list(FOLLOW_COLUMNS))


def _check_groups(table: pd.DataFrame, groups: Mapping[str, str]) -> None:
    missing = sorted(set(table["subject"]) - set(groups))
    if missing:
        raise ValueError(f"groups: no group for subjects {missing}")


def _voxel_rows(voxelwise: pd.DataFrame, tissue: str, reference: str, other: str, quantity: str,
                subjects: Collection[str] | None = None) -> pd.DataFrame:
    """The voxelwise rows of one tissue x comparison x quantity (of ``subjects`` only, when given)."""
    keep = ((voxelwise["tissue"] == tissue) & (voxelwise["reference"] == reference)
            & (voxelwise["other"] == other) & (voxelwise["quantity"] == quantity))
    if subjects is not None:
        keep &= voxelwise["subject"].isin(list(subjects))
    return voxelwise[keep]


def _ccc(pairs: pd.DataFrame, reference: str, other: str) -> float:
    return lin_ccc(pairs[reference].to_numpy(), pairs[other].to_numpy()) if len(pairs) >= 2 else float("nan")


def _pairs(rows: pd.DataFrame, reference: str, other: str) -> pd.DataFrame:
    """Regional means of ``reference`` and ``other`` side by side, one row per (subject, region) with both."""
    wide = rows[rows["map_set"].isin([reference, other])].pivot_table(
        index=["subject", "label"], columns="map_set", values="mean", aggfunc="first")
    if reference not in wide or other not in wide:
        return pd.DataFrame(columns=[reference, other], dtype=np.float64)
    return wide[[reference, other]].dropna()


def markdown_table(table: pd.DataFrame, reference: str = "truth") -> str:
    """:func:`protocol_table` or :func:`near_pure_table` as Markdown (CCC to 3 decimals, percentages to 1)."""
    metrics = [c for c in table.columns if c.startswith(("ccc_", "mape_", "bias_"))]
    header = ["Group", "Subjects", f"{reference} vs", *[_label(c) for c in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table.to_dict(orient="records"):
        values = [_fmt(c, row[c]) for c in metrics]
        lines.append(f"| {row['group']} | {row['n_subjects']} | {row['map_set']} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def follow_markdown(table: pd.DataFrame) -> str:
    """:func:`near_pure_follow` as Markdown (slope and r to 2 decimals, SDs to whole ms)."""
    lines = ["| Map set | Quantity | Tissue | Slope | r | SD truth, ms | SD map, ms | Subjects (groups) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in table.to_dict(orient="records"):
        cells = [f"{row[c]:{f}}" if np.isfinite(row[c]) else "n/a"
                 for c, f in (("slope", ".2f"), ("r", "+.2f"), ("sd_reference_ms", ".0f"), ("sd_other_ms", ".0f"))]
        lines.append(f"| {row['map_set']} | {row['quantity']} | {row['tissue']} | " + " | ".join(cells)
                     + f" | {row['n_subjects']} ({row['n_groups']}) |")
    return "\n".join(lines) + "\n"


def _label(column: str) -> str:
    kind, *rest = column.replace("gmwm", "GM+WM").split("_")
    return {"ccc": "CCC", "mape": "MdAPE %", "bias": "bias %"}[kind] + " " + " ".join(rest)


def _fmt(column: str, value: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3f}" if column.startswith("ccc_") else f"{value:+.1f}" if column.startswith("bias_") \
        else f"{value:.1f}"


def text_table(table: pd.DataFrame) -> str:
    """:func:`protocol_table` as aligned plain text, for a log (an optional ``dataset`` column first)."""
    shown = table.copy()
    for column in table.columns:
        if column.startswith(("ccc_", "mape_", "bias_")):
            shown[column] = [_fmt(column, v) for v in table[column]]
    names = {c: _label(c).replace(" %", "%") for c in table.columns if c.startswith(("ccc_", "mape_", "bias_"))}
    shown = shown.rename(columns={**names, "n_subjects": "n", "n_outside_training": "outside", "map_set": "maps"})
    return shown.to_string(index=False)
