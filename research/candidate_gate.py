"""The numbers a candidate's written-down rule is judged on, read from a ``synthmrf evaluate`` report.

Each candidate model gets a rule before its data exists (``docs/model-history.md``): thresholds on the GM + WM
regional CCC, the near-pure cells, the grey-matter T2 level and the near-pure grey-matter T2 bias on named
independent sets. This reads them from the report so that applying a rule is mechanical:

- GM + WM regional CCC of T1 and T2 with its bootstrap interval (each dataset's ``summary.json``);
- near-pure cells met: per protocol group and quantity (WM/GM x T1/T2), voxel error < 10 % and |bias| <= 10 %
  counted as two cells (``near_pure_by_protocol.csv``; 5 groups give 40);
- the largest near-pure grey-matter T2 bias over the groups;
- the grey-matter T2 level and the T2 CCC with levels matched (``research.level_or_pattern``).

``python -m research.candidate_gate REPORT [--min-t1 X] [--min-t2 X] [--min-cells N] [--level LO HI]
[--max-gm-t2-bias PCT]`` prints one line per dataset; with thresholds it also prints each dataset's failed
conditions and exits 1 when any dataset fails one (0 when all pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from research.level_or_pattern import decompose, paired_regions

ERROR_LIMIT = 10.0  # % for voxel error and |bias|, the per-group targets
CELLS = [(tissue, quantity) for quantity in ("T1", "T2") for tissue in ("WM", "GM")]


@dataclass(frozen=True)
class DatasetNumbers:
    """One dataset's numbers for a candidate rule."""

    dataset: str
    ccc: dict[str, tuple[float, float, float]]  # quantity -> (value, low, high), GM + WM regions
    cells_met: int
    cells_total: int
    max_gm_t2_bias: float  # %, near-pure, over protocol groups
    gm_t2_level: float
    t2_levels_matched: float


def dataset_numbers(report: Path, dataset: str, map_set: str = "dl") -> DatasetNumbers:
    """Read ``dataset``'s numbers for ``map_set`` from an evaluate report folder."""
    summary = json.loads((report / dataset / "summary.json").read_text())
    ccc = {row["quantity"]: (row["ccc"]["value"], row["ccc"]["low"], row["ccc"]["high"])
           for row in summary["agreement_gm_wm_regions"]["rows"] if row["other"] == map_set}
    if set(ccc) != {"T1", "T2"}:
        raise ValueError(f"{report / dataset / 'summary.json'}: no GM + WM agreement rows for {map_set!r}")
    near = pd.read_csv(report / "near_pure_by_protocol.csv")
    rows = near[(near["dataset"] == dataset) & (near["map_set"] == map_set)]
    if rows.empty:
        raise ValueError(f"{report / 'near_pure_by_protocol.csv'}: no rows for {dataset} / {map_set}")
    met = 0
    for tissue, quantity in CELLS:
        met += int((rows[f"mape_{tissue} near-pure_{quantity}"] < ERROR_LIMIT).sum())
        met += int((rows[f"bias_{tissue} near-pure_{quantity}"].abs() <= ERROR_LIMIT).sum())
    split = decompose(paired_regions(pd.read_csv(report / dataset / "regional.csv"), "T2", other=map_set))
    return DatasetNumbers(dataset, ccc, met, 2 * len(CELLS) * len(rows),
                          float(rows["bias_GM near-pure_T2"].max()), split["level_GM"], split["levels_matched"])


def failures(numbers: DatasetNumbers, *, min_t1: float | None = None, min_t2: float | None = None,
             min_cells: int | None = None, level: tuple[float, float] | None = None,
             max_gm_t2_bias: float | None = None) -> list[str]:
    """The conditions ``numbers`` fails (empty: it passes every one given)."""
    out = []
    if min_t1 is not None and numbers.ccc["T1"][0] < min_t1:
        out.append(f"CCC T1 {numbers.ccc['T1'][0]:.3f} < {min_t1}")
    if min_t2 is not None and numbers.ccc["T2"][0] < min_t2:
        out.append(f"CCC T2 {numbers.ccc['T2'][0]:.3f} < {min_t2}")
    if min_cells is not None and numbers.cells_met < min_cells:
        out.append(f"near-pure cells {numbers.cells_met} < {min_cells}")
    if level is not None and not level[0] <= numbers.gm_t2_level <= level[1]:
        out.append(f"GM T2 level {numbers.gm_t2_level:.3f} outside {level[0]}-{level[1]}")
    if max_gm_t2_bias is not None and numbers.max_gm_t2_bias > max_gm_t2_bias:
        out.append(f"near-pure GM T2 bias {numbers.max_gm_t2_bias:+.1f} % > {max_gm_t2_bias:+.1f} %")
    return out


def _line(n: DatasetNumbers) -> str:
    ccc = "  ".join(f"{q} {v:.3f} ({lo:.3f}-{hi:.3f})" for q, (v, lo, hi) in sorted(n.ccc.items()))
    return (f"{n.dataset}: GM+WM CCC {ccc}  near-pure cells {n.cells_met}/{n.cells_total}  "
            f"max near-pure GM T2 bias {n.max_gm_t2_bias:+.1f} %  GM T2 level {n.gm_t2_level:.3f}  "
            f"T2 levels matched {n.t2_levels_matched:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a synthmrf evaluate --out folder")
    parser.add_argument("--map-set", default="dl", help="map set judged (default: dl)")
    parser.add_argument("--min-t1", type=float, help="least GM + WM CCC of T1")
    parser.add_argument("--min-t2", type=float, help="least GM + WM CCC of T2")
    parser.add_argument("--min-cells", type=int, help="least near-pure cells met")
    parser.add_argument("--level", type=float, nargs=2, metavar=("LO", "HI"), help="grey-matter T2 level range")
    parser.add_argument("--max-gm-t2-bias", type=float, help="largest near-pure grey-matter T2 bias, %%")
    args = parser.parse_args(argv)
    datasets = sorted(p.name for p in args.report.iterdir() if (p / "summary.json").is_file())
    if not datasets:
        parser.error(f"{args.report}: no dataset folders with summary.json (not an evaluate report)")
    level = (args.level[0], args.level[1]) if args.level else None
    judged = any(value is not None for value in (args.min_t1, args.min_t2, args.min_cells, level,
                                                 args.max_gm_t2_bias))
    failed = False
    for dataset in datasets:
        numbers = dataset_numbers(args.report, dataset, args.map_set)
        print(_line(numbers))
        if judged:
            missed = failures(numbers, min_t1=args.min_t1, min_t2=args.min_t2, min_cells=args.min_cells,
                              level=level, max_gm_t2_bias=args.max_gm_t2_bias)
            failed |= bool(missed)
            print(f"  {'FAIL: ' + '; '.join(missed) if missed else 'pass'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
