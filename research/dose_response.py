"""Dose-response of a model's maps: how much of a controlled tissue change shows in them.

Reads one ``synthmrf evaluate`` report made over several versions of the same subjects that differ only in
tissue values (``research.indep_phantom.make_indep --scale``; one ``--data`` per version), and prints per
version, tissue (near-pure WM and GM voxels), quantity and map set the median over subjects of

- the truth's change and the map's change against the base version (%), and
- the response: map change / truth change per subject, its median and range (1 = the map follows fully, 0 = not
  at all; only where the truth's median change is at least 2 %, else a map change is a spill, not a response).
  Near-pure medians move in the dictionary's steps (about 2 % in T1 and T2), so responses under about 0.15 to a
  15 % change are indistinguishable from none.

Usage: ``python -m research.dose_response REPORT --base dose-base [--csv OUT.csv]``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

TISSUES = ("WM near-pure", "GM near-pure")
MIN_TRUTH_CHANGE = 0.02


def read_medians(report: Path) -> dict[tuple[str, str, str, str, str], tuple[float, float]]:
    """(version, subject, tissue, quantity, map set) -> (truth median, map median) over near-pure voxels."""
    out: dict[tuple[str, str, str, str, str], tuple[float, float]] = {}
    for path in sorted(report.glob("*/voxelwise.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row["reference"] == "truth" and row["tissue"] in TISSUES:
                    key = (path.parent.name, row["subject"], row["tissue"], row["quantity"], row["other"])
                    out[key] = (float(row["median_reference"]), float(row["median_other"]))
    if not out:
        raise SystemExit(f"no */voxelwise.csv with near-pure rows under {report}")
    return out


def responses(medians: dict[tuple[str, str, str, str, str], tuple[float, float]], base: str) -> list[dict[str, object]]:
    """One row per (version, tissue, quantity, map set): medians over subjects of the changes and the response."""
    groups: dict[tuple[str, str, str, str], list[tuple[float, float]]] = {}
    for (version, subject, tissue, qty, other), (truth, value) in medians.items():
        if version == base or (base, subject, tissue, qty, other) not in medians:
            continue
        truth0, value0 = medians[(base, subject, tissue, qty, other)]
        groups.setdefault((version, tissue, qty, other), []).append((truth / truth0 - 1, value / value0 - 1))
    rows = []
    for (version, tissue, qty, other), changes in sorted(groups.items()):
        truth_change = statistics.median(t for t, _ in changes)
        map_change = statistics.median(m for _, m in changes)
        ratios = [m / t for t, m in changes] if abs(truth_change) >= MIN_TRUTH_CHANGE else []
        rows.append({"version": version, "tissue": tissue, "quantity": qty, "map_set": other,
                     "n_subjects": len(changes), "truth_change_pct": 100 * truth_change,
                     "map_change_pct": 100 * map_change,
                     "response": statistics.median(ratios) if ratios else None,
                     "response_min": min(ratios) if ratios else None,
                     "response_max": max(ratios) if ratios else None})
    return rows


def main() -> None:
    """Command line: print the table (and write it as CSV with --csv)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("report", type=Path, help="synthmrf evaluate --out folder")
    ap.add_argument("--base", required=True, help="the unchanged version's section name (its --data folder's name)")
    ap.add_argument("--csv", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = responses(read_medians(args.report), args.base)
    if not rows:
        raise SystemExit(f"no version other than {args.base!r} shares subjects with it")

    def fmt(x: object, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print("| version | tissue | quantity | map | n | truth change % | map change % | response (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        span = f"{fmt(r['response'], '.2f')} ({fmt(r['response_min'], '.2f')} to {fmt(r['response_max'], '.2f')})"
        print(f"| {r['version']} | {r['tissue']} | {r['quantity']} | {r['map_set']} | {r['n_subjects']} | "
              f"{fmt(r['truth_change_pct'], '+.1f')} | {fmt(r['map_change_pct'], '+.1f')} | "
              f"{span if r['response'] is not None else '-'} |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
