"""Is a regional CCC lost to each tissue's level or to the pattern within it?

A model that cannot see a quantity (T2 in an MPRAGE) reads each tissue at its training prior's level; its
regional CCC then depends on how far that level lies from the test world's. This splits the GM + WM regional
CCC (``synthmrf evaluate``'s second agreement table) into:

- **as read**: Lin's CCC of the map set's regional means against the reference's (the report's value);
- **levels matched**: the same after each tissue's regions are scaled so their mean equals the reference's
  (what the map set would score if its GM and WM levels were the reference's, with its own pattern);
- **pattern only**: the same after each subject's tissue mean is set to the reference's (only the pattern
  between regions of one subject's tissue is the map set's own);
- **constant levels**: every region read at the reference's mean of its tissue (no pattern at all).

``python -m research.level_or_pattern REPORT/DATASET/regional.csv [--other dl]`` prints one row per quantity.
Point estimates (no intervals): a diagnostic for choosing what to change, not a result to quote as a CCC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from training.evaluation.agreement import lin_ccc
from training.evaluation.subjects import tissue_of_region

TISSUES = ("GM", "WM")


def paired_regions(regional: pd.DataFrame, quantity: str, reference: str = "truth",
                   other: str = "dl") -> pd.DataFrame:
    """GM and WM regions of ``regional`` (regional.csv's columns) with the two map sets' means side by side:
    columns subject, region, tissue, reference, other."""
    rows = regional[regional["quantity"] == quantity].copy()
    rows["tissue"] = rows["region"].map(tissue_of_region)
    rows = rows[rows["tissue"].isin(TISSUES)]
    wide = rows.pivot_table(index=["subject", "region", "tissue"], columns="map_set", values="mean").reset_index()
    for name in (reference, other):
        if name not in wide.columns:
            raise ValueError(f"regional table: no map set {name!r} for {quantity} (have "
                             f"{sorted(rows['map_set'].unique())})")
    pairs = wide[["subject", "region", "tissue", reference, other]].dropna()
    if len(pairs) < 2:
        raise ValueError(f"regional table: fewer than 2 GM/WM regions with both {reference} and {other}")
    return pairs.rename(columns={reference: "reference", other: "other"}).reset_index(drop=True)


def decompose(pairs: pd.DataFrame) -> dict[str, float]:
    """The four CCCs of the module docstring and each tissue's level (mean other / mean reference)."""
    ref = pairs["reference"].to_numpy(np.float64)
    oth = pairs["other"].to_numpy(np.float64)
    by_tissue = pairs.groupby("tissue")
    ref_tissue = by_tissue["reference"].transform("mean").to_numpy(np.float64)
    oth_tissue = by_tissue["other"].transform("mean").to_numpy(np.float64)
    by_subject = pairs.groupby(["subject", "tissue"])
    ref_subject = by_subject["reference"].transform("mean").to_numpy(np.float64)
    oth_subject = by_subject["other"].transform("mean").to_numpy(np.float64)
    means = by_tissue[["reference", "other"]].mean()
    out = {f"level_{t}": float(means.loc[t, "other"] / means.loc[t, "reference"]) for t in means.index}
    out.update(as_read=lin_ccc(ref, oth), levels_matched=lin_ccc(ref, oth * ref_tissue / oth_tissue),
               pattern_only=lin_ccc(ref, oth - oth_subject + ref_subject), constant_levels=lin_ccc(ref, ref_tissue))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("regional", type=Path, help="regional.csv of a synthmrf evaluate report's dataset folder")
    parser.add_argument("--reference", default="truth", help="reference map set (default: truth)")
    parser.add_argument("--other", default="dl", help="map set judged (default: dl)")
    args = parser.parse_args(argv)
    regional = pd.read_csv(args.regional)
    print(f"{'quantity':8} {'GM level':>9} {'WM level':>9} {'as read':>8} {'levels matched':>15} "
          f"{'pattern only':>13} {'constant levels':>16}")
    for quantity in ("T1", "T2"):
        d = decompose(paired_regions(regional, quantity, args.reference, args.other))
        print(f"{quantity:8} {d.get('level_GM', np.nan):9.3f} {d.get('level_WM', np.nan):9.3f} "
              f"{d['as_read']:8.3f} {d['levels_matched']:15.3f} {d['pattern_only']:13.3f} {d['constant_levels']:16.3f}")


if __name__ == "__main__":
    main()
