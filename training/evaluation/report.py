"""The evaluation report: regional table, agreement per comparison, voxelwise errors, figures, JSON, Markdown.

Subjects are consumed one at a time (an iterator of :class:`SubjectMaps` keeps one subject in memory);
only the regional rows, the voxelwise rows and the figure subject's mid-brain slices are kept.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.evaluation.agreement import Agreement, Estimate, agreement
from training.evaluation.figures import axial_slices, bland_altman_figure, maps_figure, scatter_figure
from training.evaluation.regional import between_subjects, regional_matrix, subject_table
from training.evaluation.subjects import NEAR_PURE_SUFFIX, NEAR_PURE_TOLERANCE, SubjectMaps, tissue_of_region
from training.evaluation.voxelwise import COLUMNS as VOXEL_COLUMNS
from training.evaluation.voxelwise import subject_errors, summarise_errors

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class PaperResult:
    """The paper's true vs DL agreement for one quantity: (value, low, high) of the 95 % CIs."""

    ccc: tuple[float, float, float]
    mean_difference_ms: tuple[float, float, float]
    sd_ratio: float


PAPER_RESULTS: dict[str, PaperResult] = {
    "T1": PaperResult(ccc=(0.8793, 0.8136, 0.9383), mean_difference_ms=(48.23, 23.0, 77.3), sd_ratio=1.14),
    "T2": PaperResult(ccc=(0.9078, 0.8981, 0.9145), mean_difference_ms=(2.02, -1.4, 4.8), sd_ratio=1.79),
}
"""The paper's results (method.md): CCC and mean difference true - DL with 95 % CIs, true/DL SD ratio."""

PAPER_COMPARISON = ("true", "dl")

TISSUE_REGION_CLASSES = ("GM", "WM")
"""Regions of the second agreement table: cortex and white matter (:func:`tissue_of_region`). It leaves out
the CSF regions, whose T2 an MPRAGE does not reveal and whose T1 (several times the tissue's) stretches the
range a CCC is judged against, and the deep regions drawn from GM and WM together."""


@dataclass(frozen=True)
class EvaluationSummary:
    """Everything the report computed; ``agreements`` is keyed by (reference, other, quantity), over every
    region (the paper's analysis); ``tissue_agreements`` the same over the GM and WM regions only
    (:data:`TISSUE_REGION_CLASSES`; empty when the regions have no such class).

    ``regional``: the regional table (``regional.csv``); ``voxelwise``: its summary over subjects;
    ``voxelwise_subjects``: the per-subject voxelwise rows (``voxelwise.csv``, empty without tissue masks).
    """

    subjects: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...]
    quantities: tuple[str, ...]
    n_boot: int
    seed: int
    confidence: float
    agreements: Mapping[tuple[str, str, str], Agreement]
    voxelwise: pd.DataFrame
    files: Mapping[str, Path]
    regional: pd.DataFrame
    voxelwise_subjects: pd.DataFrame
    tissue_agreements: Mapping[tuple[str, str, str], Agreement]
    between: pd.DataFrame  # regional.between_subjects over TISSUE_REGION_CLASSES

    def to_dict(self) -> dict[str, object]:
        """JSON-ready numbers (NaN becomes None)."""

        def estimate(e: Estimate | None) -> dict[str, float | None] | None:
            return None if e is None else {"value": _num(e.value), "low": _num(e.low), "high": _num(e.high)}

        def rows(agreements: Mapping[tuple[str, str, str], Agreement]) -> list[dict[str, object]]:
            return [{"reference": r, "other": o, "quantity": q, "n_subjects": a.n_subjects, "n_pairs": a.n_pairs,
                     "ccc": estimate(a.ccc), "mean_difference_ms": estimate(a.mean_difference),
                     "sd_difference_ms": _num(a.sd_difference),
                     "limits_of_agreement_ms": [_num(v) for v in a.limits_of_agreement],
                     "sd_ratio": estimate(a.sd_ratio)} for (r, o, q), a in agreements.items()]

        voxelwise = [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                     for row in self.voxelwise.to_dict(orient="records")]
        paper = {q: asdict(p) for q, p in PAPER_RESULTS.items()}
        return {"subjects": list(self.subjects), "comparisons": [list(c) for c in self.comparisons],
                "quantities": list(self.quantities),
                "bootstrap": {"n_boot": self.n_boot, "seed": self.seed, "confidence": self.confidence,
                              "clusters": "subjects", "interval": "percentile"},
                "agreement": rows(self.agreements),
                "agreement_gm_wm_regions": {"classes": list(TISSUE_REGION_CLASSES),
                                            "rows": rows(self.tissue_agreements)},
                "voxelwise_median_ape_percent": voxelwise,
                "between_subjects": [{k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                                     for row in self.between.to_dict(orient="records")],
                "paper": {"reference": PAPER_COMPARISON[0], "other": PAPER_COMPARISON[1], **paper},
                "files": {k: str(v) for k, v in self.files.items()}}


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def _check_comparisons(comparisons: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    pairs = tuple((str(r), str(o)) for r, o in comparisons)
    if not pairs:
        raise ValueError("comparisons: must name at least one (reference, other) pair")
    for reference, other in pairs:
        if reference == other:
            raise ValueError(f"comparisons: reference and other are the same map set {reference!r}")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"comparisons: duplicate pairs in {list(pairs)}")
    return pairs


def _fmt(e: Estimate, digits: int) -> str:
    return f"{e.value:.{digits}f} ({e.low:.{digits}f} to {e.high:.{digits}f})"


_AGREEMENT_HEADER = ["| Reference | Other | Quantity | CCC (CI) | Mean difference reference - other, ms (CI) "
                     "| SD ratio reference/other (CI) | Pairs |", "|---|---|---|---|---|---|---|"]


def _agreement_rows(agreements: Mapping[tuple[str, str, str], Agreement]) -> list[str]:
    lines = []
    for (reference, other, quantity), a in agreements.items():
        ratio = "n/a" if a.sd_ratio is None else _fmt(a.sd_ratio, 2)
        lines.append(f"| {reference} | {other} | {quantity} | {_fmt(a.ccc, 4)} | {_fmt(a.mean_difference, 2)} "
                     f"| {ratio} | {a.n_pairs} |")
    return lines


def _markdown(summary: EvaluationSummary) -> str:
    n = len(summary.subjects)
    lines = [f"### Agreement of regional means, every region ({n} subjects; clustered bootstrap, {summary.n_boot} "
             f"resamples, {summary.confidence:.0%} percentile intervals)", "", *_AGREEMENT_HEADER,
             *_agreement_rows(summary.agreements)]
    for quantity in summary.quantities:
        paper = PAPER_RESULTS.get(quantity)
        if paper is None:
            continue
        ccc, diff = paper.ccc, paper.mean_difference_ms
        lines.append(f"| paper: {PAPER_COMPARISON[0]} | {PAPER_COMPARISON[1]} | {quantity} | "
                     f"{ccc[0]:.4f} ({ccc[1]:.4f} to {ccc[2]:.4f}) | {diff[0]:.2f} ({diff[1]:.1f} to {diff[2]:.1f}) "
                     f"| {paper.sd_ratio:.2f} | |")
    if summary.tissue_agreements:
        lines += ["", "### Agreement of regional means, GM and WM regions only (cortex, white matter; same "
                  "resamples)", "", "CSF regions (T2 not revealed by an MPRAGE; T1 several times the tissue's, which "
                  "stretches the range a CCC is judged against) and the deep regions drawn from GM and WM together "
                  "are left out.", "", *_AGREEMENT_HEADER, *_agreement_rows(summary.tissue_agreements)]
    if not summary.between.empty:
        lines += ["", "### Between subjects: each subject's cortex (GM) and white-matter (WM) mean", "",
                  "One value per subject (its regions' means weighted by voxels). r: Pearson correlation over "
                  "subjects; an other map set whose subject means spread like the reference's with r near 0 moves "
                  "between subjects for reasons of its own (under 3 subjects r is not given).", "",
                  "| Reference | Other | Quantity | Tissue | r | SD reference, ms | SD other, ms | Mean difference "
                  "other - reference, % | Subjects |", "|---|---|---|---|---|---|---|---|---|"]
        for row in summary.between.itertuples(index=False):
            r = "n/a" if math.isnan(row.r) else f"{row.r:+.2f}"
            lines.append(f"| {row.reference} | {row.other} | {row.quantity} | {row.tissue} | {r} | "
                         f"{row.sd_reference:.1f} | {row.sd_other:.1f} | {row.mean_difference_percent:+.1f} | "
                         f"{row.n_subjects} |")
    if not summary.voxelwise.empty:
        lines += ["", "### Voxelwise median absolute percent error (median over subjects of the per-subject "
                  "median; IQR) and median signed error", "",
                  *([f"Near-pure: voxels whose truth lies within {NEAR_PURE_TOLERANCE['T1']:.0%} (T1) and "
                     f"{NEAR_PURE_TOLERANCE['T2']:.0%} (T2) of the subject's own tissue value, nearly the same "
                     "under every partial-volume convention.", ""]
                    if summary.voxelwise["tissue"].str.endswith(NEAR_PURE_SUFFIX).any() else []),
                  "| Tissue | Reference | Other | Quantity | Median APE, % (IQR) | Median error, % | Subjects |",
                  "|---|---|---|---|---|---|---|"]
        for row in summary.voxelwise.itertuples(index=False):
            lines.append(f"| {row.tissue} | {row.reference} | {row.other} | {row.quantity} | "
                         f"{row.median_ape:.1f} ({row.q1:.1f} to {row.q3:.1f}) | {row.median_pe:+.1f} | "
                         f"{row.n_subjects} |")
    return "\n".join(lines) + "\n"


def evaluate_subjects(subjects: Iterable[SubjectMaps], comparisons: Sequence[tuple[str, str]], out_dir: Path,
                      *, quantities: Sequence[str] = ("T1", "T2"), n_boot: int = 10_000, seed: int = 0,
                      confidence: float = 0.95, figure_subject: str | None = None) -> EvaluationSummary:
    """Evaluate map sets against each other and write the report into ``out_dir``.

    For each (reference, other) in ``comparisons``: CCC, mean difference (reference - other) and SD ratio
    of regional means with clustered-bootstrap intervals (same resamples for every comparison, from
    ``seed``), voxelwise median absolute percent error per tissue mask, scatter and Bland-Altman figures.
    Writes ``regional.csv``, ``voxelwise.csv`` (when subjects have tissue masks), ``summary.json``,
    ``summary.md`` and PNGs, including mid-brain axial maps of ``figure_subject`` (default: the first).
    """
    pairs = _check_comparisons(comparisons)
    quantities = tuple(quantities)
    if not quantities:
        raise ValueError("quantities: must name at least one quantity")
    map_sets = list(dict.fromkeys(name for pair in pairs for name in pair))
    out_dir.mkdir(parents=True, exist_ok=True)
    tables: list[pd.DataFrame] = []
    errors: list[pd.DataFrame] = []
    seen: list[str] = []
    slices: dict[str, dict[str, np.ndarray]] | None = None
    figure_id = ""
    for subject in subjects:
        if subject.subject_id in seen:
            raise ValueError(f"subjects: duplicate subject_id {subject.subject_id!r}")
        seen.append(subject.subject_id)
        tables.append(subject_table(subject, map_sets, quantities))
        if subject.tissue_masks:
            errors.append(subject_errors(subject, pairs, quantities))
        if slices is None and figure_subject in (None, subject.subject_id):
            slices = axial_slices(subject, map_sets, quantities)
            figure_id = subject.subject_id
        logger.info("evaluated subject %s", subject.subject_id, extra={"subject": subject.subject_id})
    if not seen:
        raise ValueError("subjects: no subjects given")
    if slices is None:
        raise ValueError(f"figure_subject: {figure_subject!r} is not among the subjects")

    files: dict[str, Path] = {}
    table = pd.concat(tables, ignore_index=True)
    files["regional_csv"] = out_dir / "regional.csv"
    table.to_csv(files["regional_csv"], index=False)
    voxel_table = pd.concat(errors, ignore_index=True) if errors else pd.DataFrame(columns=list(VOXEL_COLUMNS))
    voxel_summary = summarise_errors(voxel_table) if errors else pd.DataFrame()
    if errors:
        files["voxelwise_csv"] = out_dir / "voxelwise.csv"
        voxel_table.to_csv(files["voxelwise_csv"], index=False)

    agreements: dict[tuple[str, str, str], Agreement] = {}
    tissue_agreements: dict[tuple[str, str, str], Agreement] = {}
    for reference, other in pairs:
        points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for quantity in quantities:
            # Every subject has a row for every region and map set, so the matrices line up.
            regions, ref_mean = regional_matrix(table, reference, quantity, "mean")[1:]
            oth_mean = regional_matrix(table, other, quantity, "mean")[2]
            ref_sd = regional_matrix(table, reference, quantity, "sd")[2]
            oth_sd = regional_matrix(table, other, quantity, "sd")[2]
            agreements[(reference, other, quantity)] = agreement(
                ref_mean, oth_mean, reference_sd=ref_sd, other_sd=oth_sd, n_boot=n_boot, seed=seed,
                confidence=confidence)
            tissue = np.array([tissue_of_region(r) in TISSUE_REGION_CLASSES for r in regions])
            if tissue.any():
                tissue_agreements[(reference, other, quantity)] = agreement(
                    ref_mean[:, tissue], oth_mean[:, tissue], reference_sd=ref_sd[:, tissue],
                    other_sd=oth_sd[:, tissue], n_boot=n_boot, seed=seed, confidence=confidence)
            points[quantity] = (ref_mean.ravel(), oth_mean.ravel())
        stem = f"{_slug(reference)}_vs_{_slug(other)}"
        metrics = {q: agreements[(reference, other, q)] for q in quantities}
        files[f"scatter_{stem}"] = scatter_figure(points, metrics, reference, other, out_dir / f"scatter_{stem}.png")
        files[f"bland_altman_{stem}"] = bland_altman_figure(points, metrics, reference, other,
                                                            out_dir / f"bland_altman_{stem}.png")
    files["maps"] = maps_figure(slices, out_dir / f"maps_{_slug(figure_id)}.png",
                                f"{figure_id}: mid-brain axial slice")
    files["summary_json"] = out_dir / "summary.json"
    files["summary_md"] = out_dir / "summary.md"
    summary = EvaluationSummary(subjects=tuple(seen), comparisons=pairs, quantities=quantities, n_boot=n_boot,
                                seed=seed, confidence=confidence, agreements=agreements, voxelwise=voxel_summary,
                                files=files, regional=table, voxelwise_subjects=voxel_table,
                                tissue_agreements=tissue_agreements,
                                between=between_subjects(table, pairs, quantities, TISSUE_REGION_CLASSES))
    files["summary_json"].write_text(json.dumps(summary.to_dict(), indent=1, allow_nan=False) + "\n")
    files["summary_md"].write_text(_markdown(summary))
    logger.info("evaluation of %d subjects written to %s", len(seen), out_dir)
    return summary
