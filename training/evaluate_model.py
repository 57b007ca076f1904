"""Evaluating a model package on the subjects of one or more datasets, against ground truth and a baseline.

Per subject: "truth" = the phantom's ground truth; "dl" = matching of the coefficients the model
synthesises from the MPRAGE; "lookup" = the intensity-lookup baseline
(:mod:`training.evaluation.baseline`, fitted on training subjects only); optionally "true" = matching of
the subject's MRF coefficients (the paper's reference). Every map set is compared on the same voxels:
the brain of every ``slice_step``-th prepared axial slice (those with enough brain to carry an MPRAGE
input). ``out_dir`` gets one report per dataset (:func:`training.evaluation.report.evaluate_subjects`,
in ``out_dir/NAME``) and over all: ``summary.md``, ``summary.json``, ``by_protocol.csv`` (per dataset and
acquisition group, :mod:`training.evaluation.protocols`), ``near_pure_by_protocol.csv`` (the same groups, errors
on near-pure tissue voxels only, whose truth the partial-volume convention hardly changes), ``near_pure_follow.csv``
(per dataset: does each map set follow the subjects' own tissue values or read its prior) and ``lookup.csv`` (the
baseline's tables).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.model.fluid import apply_fluid
from pipeline.model.inference import features_for, network_input, synthesise_channels
from pipeline.model.package import ModelPackage, check_compatible
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.matching import Matcher, match_volume
from pipeline.protocol import out_of_range
from pipeline.volume_io import load_volume
from training.evaluation.baseline import LookupBaseline
from training.evaluation.datasets import DatasetInfo, normalised_volume
from training.evaluation.protocols import (
    follow_markdown,
    markdown_table,
    near_pure_follow,
    near_pure_table,
    protocol_group,
    protocol_table,
)
from training.evaluation.report import EvaluationSummary, evaluate_subjects
from training.evaluation.subjects import NEAR_PURE_TOLERANCE, SubjectMaps, load_phantom_subject
from training.phantom.ceiling import MIN_SUBJECTS_FOR_FIT, Ceiling, field_strength_of, identifiability_ceiling
from training.preprocess import check_subjects_have_mrf

logger = logging.getLogger(__name__)

COMPARISONS = [("truth", "dl"), ("truth", "lookup")]
COMPARISONS_WITH_TRUE = [("true", "dl"), ("truth", "true"), *COMPARISONS]


@dataclass(frozen=True)
class EvaluationSet:
    """Subjects of one dataset to evaluate: report ``name``, the ``split`` they come from, and the cache of
    the dataset's prepared arrays."""

    data: DatasetInfo
    name: str
    split: str
    subjects: tuple[str, ...]
    cache: Path


@dataclass(frozen=True)
class EvaluationReport:
    """Reports by dataset name, the per-protocol and near-pure follow tables of all datasets (a ``dataset`` column
    first), files."""

    summaries: Mapping[str, EvaluationSummary]
    by_protocol: pd.DataFrame
    near_pure: pd.DataFrame
    follow: pd.DataFrame
    files: Mapping[str, Path]


def evaluation_mask(brain_mask: np.ndarray, slices: np.ndarray, slice_step: int = 1) -> np.ndarray:
    """The brain voxels of every ``slice_step``-th of the axial ``slices`` (third array axis)."""
    if slice_step < 1:
        raise ValueError(f"slice_step: must be >= 1, got {slice_step}")
    keep = np.zeros(brain_mask.shape[2], bool)
    keep[np.asarray(slices, dtype=np.intp)[::slice_step]] = True
    return np.asarray(brain_mask, bool) & keep


def _subject_maps(item: EvaluationSet, subject: str, package: ModelPackage, matcher: Matcher,
                  baseline: LookupBaseline, slice_step: int, with_true: bool) -> SubjectMaps:
    """One subject's truth with the "dl", "lookup" and (``with_true``) "true" maps; networks on ``matcher.device``."""
    base = load_phantom_subject(item.data.root, subject)
    prepared = item.data.prepare(subject, item.cache)
    volume = normalised_volume(prepared, base.labels.shape, package.normalisation)
    mask = evaluation_mask(base.brain_mask, prepared.slices, slice_step)
    net_input = network_input(package, volume, mask, prepared.protocol)
    features = features_for(package, prepared.protocol)
    channels = synthesise_channels(net_input, mask, package, protocol=features, device=matcher.device)
    dl = apply_fluid(match_volume(from_channels(channels), mask, matcher), channels, net_input, mask, package,
                     matcher, protocol=features, device=matcher.device)
    del channels, net_input
    maps = {"dl": dl,
            "lookup": baseline.maps(item.data.root / subject, volume, mask, prepared.protocol.field_strength_t)}
    if with_true:
        coeffs, _ = load_volume(item.data.root / subject / "mrf_svd.nii.gz")
        maps["true"] = match_volume(coeffs[..., : matcher.dictionary.rank], mask, matcher)
    return replace(base, brain_mask=mask, maps={**base.maps, **maps})


def subjects_ceiling(item: EvaluationSet) -> Ceiling | str:
    """The identifiability ceiling (:mod:`training.phantom.ceiling`) of the set's subjects, or why there is none:
    it needs phantom entries with tissue values and at least 2 subjects per field strength (the oracles are
    in-sample: one subject would be its own class mean)."""
    entries = [item.data.entries.get(subject, {}) for subject in item.subjects]
    if not all(isinstance(e.get("tissues"), Mapping) for e in entries):
        return "not computed: the manifest has no tissue values for every subject (not a phantom dataset)"
    try:
        fields = Counter(field_strength_of(e) for e in entries)
    except ValueError as exc:
        return f"not computed: {exc}"
    if min(fields.values()) < 2:
        return "not computed: needs at least 2 subjects per field strength"
    return identifiability_ceiling(entries)


def check_sets(sets: Sequence[EvaluationSet], fitted_on: frozenset[Path]) -> None:
    """Raise ValueError unless ``sets`` have distinct names and some subjects each, each with its MRF, none of them
    among the lookup baseline's training subjects ``fitted_on`` (resolved folders)."""
    if not sets:
        raise ValueError("sets: nothing to evaluate")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"sets: report names must differ, got {names}")
    for s in sets:
        if not s.subjects:
            raise ValueError(f"{s.data.root}: no subjects in split {s.split!r}")
        check_subjects_have_mrf(s.data.root, s.subjects)
        seen = [subject for subject in s.subjects if (s.data.root / subject).resolve() in fitted_on]
        if seen:
            raise ValueError(f"{s.data.root}: the lookup baseline is fitted on {', '.join(seen)} (split "
                             f"{s.split!r}); evaluate other subjects or fit it on another dataset (--baseline-data)")


def evaluate_package(sets: Sequence[EvaluationSet], package: ModelPackage, out_dir: Path,
                     baseline: LookupBaseline, *, slice_step: int = 1, with_true: bool = True,
                     n_boot: int = 10_000, seed: int = 0, progress: bool = True,
                     device: str = "auto") -> EvaluationReport:
    """Write the evaluation of ``package`` on ``sets`` into ``out_dir`` (layout: module docstring); networks and
    matching run on ``device`` (auto: CUDA when present)."""
    check_sets(sets, baseline.fitted_on)
    if slice_step < 1:
        raise ValueError(f"slice_step: must be >= 1, got {slice_step}")
    if baseline.normalisation != package.normalisation:
        raise ValueError(f"baseline: fitted on {baseline.normalisation!r} inputs, {package.name} takes "
                         f"{package.normalisation!r}")
    dictionary = load_or_build_dictionary(package.sequence, rank=4, progress=progress)
    check_compatible(package, dictionary)
    matcher = Matcher(dictionary, device=device)
    comparisons = COMPARISONS_WITH_TRUE if with_true else COMPARISONS
    others = ("true", "dl", "lookup") if with_true else ("dl", "lookup")
    summaries: dict[str, EvaluationSummary] = {}
    ceilings = {item.name: subjects_ceiling(item) for item in sets}
    tables: list[pd.DataFrame] = []
    pure_tables: list[pd.DataFrame] = []
    follow_tables: list[pd.DataFrame] = []
    for item in sets:
        protocols = {subject: item.data.protocol(subject) for subject in item.subjects}
        groups = {subject: protocol_group(p) for subject, p in protocols.items()}
        outside = Counter(groups[s] for s, p in protocols.items() if out_of_range(p, package.protocol_ranges))

        def maps(item: EvaluationSet = item) -> Iterator[SubjectMaps]:
            for subject in tqdm(item.subjects, desc=f"evaluating {item.name}", unit="subject", disable=not progress):
                yield _subject_maps(item, subject, package, matcher, baseline, slice_step, with_true)

        summary = evaluate_subjects(maps(), comparisons, out_dir / item.name, n_boot=n_boot, seed=seed)
        table = protocol_table(summary.regional, summary.voxelwise_subjects, groups, others=others)
        table.insert(0, "dataset", item.name)
        table.insert(3, "n_outside_training", [outside[g] for g in table["group"]])
        pure = near_pure_table(summary.voxelwise_subjects, groups, others=others)
        pure.insert(0, "dataset", item.name)
        follow = near_pure_follow(summary.voxelwise_subjects, groups, others=others)
        follow.insert(0, "dataset", item.name)
        summaries[item.name] = summary
        tables.append(table)
        pure_tables.append(pure)
        follow_tables.append(follow)
    by_protocol = pd.concat(tables, ignore_index=True)
    near_pure = pd.concat(pure_tables, ignore_index=True)
    follow = pd.concat(follow_tables, ignore_index=True)
    files = {"by_protocol_csv": out_dir / "by_protocol.csv", "near_pure_csv": out_dir / "near_pure_by_protocol.csv",
             "follow_csv": out_dir / "near_pure_follow.csv", "lookup_csv": out_dir / "lookup.csv",
             "summary_md": out_dir / "summary.md", "summary_json": out_dir / "summary.json"}
    by_protocol.to_csv(files["by_protocol_csv"], index=False)
    near_pure.to_csv(files["near_pure_csv"], index=False)
    follow.to_csv(files["follow_csv"], index=False)
    baseline.to_frame().to_csv(files["lookup_csv"], index=False)
    tables_by_kind = {"by_protocol": by_protocol, "near_pure_by_protocol": near_pure, "near_pure_follow": follow}
    files["summary_md"].write_text(_markdown(sets, summaries, tables_by_kind, ceilings, package, baseline,
                                             slice_step, with_true))
    files["summary_json"].write_text(json.dumps(_json(sets, summaries, tables_by_kind, ceilings, package,
                                                      baseline, slice_step, with_true), indent=1, allow_nan=False)
                                     + "\n")
    logger.info("evaluation of %s on %d datasets written to %s", package.name, len(sets), out_dir)
    return EvaluationReport(summaries, by_protocol, near_pure, follow, files)


def _baseline_text(baseline: LookupBaseline) -> str:
    sources = ", ".join(sorted({p.parent.name for p in baseline.fitted_on}))
    fields = ", ".join(f"{f:g}" for f in baseline.tables)
    return (f"median truth T1/T2 per bin of {baseline.normalisation}-normalised MPRAGE intensity, fitted on "
            f"{len(baseline.fitted_on)} training subjects of {sources} (one lookup per field strength: {fields} T)")


def _ceiling_text(ceiling: Ceiling | str) -> str:
    if isinstance(ceiling, str):
        return f"Identifiability ceiling (`synthmrf phantom ceiling`): {ceiling}."
    cm, fit, err = ceiling.ccc_class_mean, ceiling.ccc_exact_t1_pd, ceiling.mdape_class_mean
    fallback = "" if min(s.n_subjects for s in ceiling.spreads) >= MIN_SUBJECTS_FOR_FIT else \
        f" (with fewer than {MIN_SUBJECTS_FOR_FIT} subjects at a field strength it falls back to the class mean there)"
    return ("Identifiability ceiling of these subjects (`synthmrf phantom ceiling`; tissue values, in-sample): an "
            f"oracle that knows only each tissue's class mean reaches CCC T1 {cm['t1_ms']:.3f} / T2 {cm['t2_ms']:.3f} "
            f"(median error {err['t1_ms']:.1f} / {err['t2_ms']:.1f} %); one that also knows each tissue's exact T1 "
            f"and PD{fallback}, T1 {fit['t1_ms']:.3f} / T2 {fit['t2_ms']:.3f}. An MPRAGE carries next to no T2 "
            "weighting, so no MPRAGE-only method can know T2 beyond the second oracle; regional CCC can exceed it "
            "through partial volume, which the image shows.")


def _ceiling_json(ceiling: Ceiling | str) -> dict[str, object]:
    if isinstance(ceiling, str):
        return {"not_computed": ceiling}
    return {"ccc_class_mean": ceiling.ccc_class_mean, "ccc_exact_t1_pd": ceiling.ccc_exact_t1_pd,
            "mdape_class_mean": ceiling.mdape_class_mean, "mdape_exact_t1_pd": ceiling.mdape_exact_t1_pd,
            "n_pairs": ceiling.n_pairs}


def _markdown(sets: Sequence[EvaluationSet], summaries: Mapping[str, EvaluationSummary],
              tables: Mapping[str, pd.DataFrame], ceilings: Mapping[str, Ceiling | str], package: ModelPackage,
              baseline: LookupBaseline, slice_step: int, with_true: bool) -> str:
    voxels = "brain of every axial slice with brain" if slice_step == 1 else \
        f"brain of one in every {slice_step} axial slices with brain"
    lines = [f"# Evaluation of {package.name}", "",
             "Map sets: truth = phantom ground truth; dl = matching of the MRF the model synthesises from the "
             f"MPRAGE; lookup = {_baseline_text(baseline)}"
             + ("; true = matching of the subject's MRF (the paper's reference)" if with_true else "")
             + f". Voxels: {voxels} (the same for every map set).", ""]
    by_protocol, near_pure, follow = (tables[k] for k in ("by_protocol", "near_pure_by_protocol", "near_pure_follow"))
    for item in sets:
        table = by_protocol[by_protocol["dataset"] == item.name]
        lines += [f"## {item.name} ({item.data.root}, split {item.split}, {len(item.subjects)} subjects)", "",
                  summaries[item.name].files["summary_md"].read_text(),
                  "### By acquisition group (plain estimates)", "",
                  "CCC: Lin's CCC of regional means; MdAPE: median over subjects of the voxelwise median absolute "
                  "percent error; bias: mean 100 (map set - truth) / truth of the tissue's regional means."
                  + (" The true rows are the method's own error (matching the subject's simulated MRF: partial "
                     "volume and dictionary), which a perfect network would reproduce; dl minus true is the "
                     "network's." if with_true else ""), "",
                  markdown_table(table.drop(columns=["dataset", "n_outside_training"])), ""]
        pure = near_pure[near_pure["dataset"] == item.name]
        if not pure.empty:
            lines += ["### Near-pure tissue voxels by acquisition group (plain estimates)", "",
                      f"Voxels of the GM (WM) regions whose truth lies within {NEAR_PURE_TOLERANCE['T1']:.0%} (T1) "
                      f"and {NEAR_PURE_TOLERANCE['T2']:.0%} (T2) of the subject's own GM (WM) values, nearly the "
                      "same under every partial-volume convention (rate average, geometric mean, match of the mixed "
                      "signal), which differ by tens of percent in the regional means of the cortex; at the "
                      "tolerance's edge (about 7 % CSF) their T2 differs by up to about 15 %, and most near-pure "
                      "voxels hold far less CSF. MdAPE: median "
                      "over subjects of the voxel median absolute percent error; bias: median over subjects of the "
                      "voxel median signed percent error.", "",
                      markdown_table(pure.drop(columns=["dataset"])), ""]
        followed = follow[follow["dataset"] == item.name]
        if not followed.empty:
            lines += ["### Near-pure voxels: does the map follow each subject's tissue values?", "",
                      "Per subject, the truth's and the map set's medians over its near-pure voxels (the truth's is "
                      "nearly the tissue value the subject was drawn with), as deviations from their acquisition "
                      "group's means. Slope of the map's deviation on the truth's: 1 = the map moves with the "
                      "subject's tissue, 0 = it reads one value whatever the subject (its prior); a slope below 1 "
                      "reads unusual subjects towards the middle. n/a: fewer than two subjects beyond one per group, "
                      "or a truth that does not vary (slope), or a map that reads one value (r).",
                      "", follow_markdown(followed.drop(columns=["dataset"])), ""]
        lines += [_ceiling_text(ceilings[item.name]), ""]
        outside = table.drop_duplicates("group")
        outside = outside[outside["n_outside_training"] > 0]
        if not outside.empty:
            lines += ["Outside the protocols the model was trained on: " + "; ".join(
                f"{r.group} ({r.n_outside_training} of {r.n_subjects} subjects)" for r in outside.itertuples()), ""]
    return "\n".join(lines)


def _json(sets: Sequence[EvaluationSet], summaries: Mapping[str, EvaluationSummary],
          tables: Mapping[str, pd.DataFrame], ceilings: Mapping[str, Ceiling | str], package: ModelPackage,
          baseline: LookupBaseline, slice_step: int, with_true: bool) -> dict[str, object]:
    def rows(table: pd.DataFrame) -> list[dict[str, object]]:
        return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}
                for row in table.drop(columns=["dataset"]).to_dict(orient="records")]

    return {"model": package.name, "slice_step": slice_step, "true_maps": with_true,
            "baseline": {"description": _baseline_text(baseline), "normalisation": baseline.normalisation,
                         "n_subjects": len(baseline.fitted_on), "field_strengths_t": list(baseline.tables)},
            "datasets": {item.name: {"root": str(item.data.root), "split": item.split,
                                     **summaries[item.name].to_dict(),
                                     **{key: rows(table[table["dataset"] == item.name])
                                        for key, table in tables.items()},
                                     "ceiling": _ceiling_json(ceilings[item.name])}
                         for item in sets}}
