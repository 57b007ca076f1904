"""``synthmrf evaluate``: a model against ground truth and an intensity-lookup baseline, per dataset and protocol."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.commands.options import device_option

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command()
@click.option("--data", "data_dirs", required=True, multiple=True, type=_DIR,
              help="Dataset folder (manifest.json with a split; README: dataset layout); repeat for several, "
                   "each reported in a section named by its folder.")
@click.option("--model", "model_ref", default=None,
              help="A package folder, or an installed/built-in model NAME-VERSION (default: the active model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: summary.md/.json, by_protocol.csv, near_pure_by_protocol.csv, "
                   "near_pure_follow.csv, lookup.csv, and per dataset NAME/ with regional.csv, voxelwise.csv, "
                   "summary.json/.md, figures.")
@click.option("--split", "splits", multiple=True, default=("test",), show_default=True,
              type=click.Choice(["test", "val", "train", "all"]),
              help="Subjects to evaluate: once for every --data, or once per --data in order; all = every subject "
                   "of the manifest (a dataset the model never trained on).")
@click.option("--subjects", "limit", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N of each dataset.")
@click.option("--cache", "cache_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Prepared-array cache, once per --data in order (default OUT/cache/NAME).")
@click.option("--baseline-data", "baseline_dir", type=_DIR, default=None,
              help="Dataset whose train split the lookup baseline is fitted on (default: the first --data).")
@click.option("--baseline-cache", "baseline_cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Prepared-array cache of --baseline-data, e.g. the training run's (default: that --data's cache, "
                   "or OUT/cache/baseline).")
@click.option("--slice-step", type=click.IntRange(min=1), default=1, show_default=True,
              help="Evaluate every N-th axial slice with brain only (networks, matching and statistics).")
@click.option("--true/--no-true", "with_true", default=True, show_default=True,
              help="Also match each subject's simulated MRF (the paper's \"true\" maps; a whole-volume load and "
                   "match per subject).")
@click.option("--bootstrap", "n_boot", default=10_000, show_default=True, type=click.IntRange(min=100),
              help="Clustered bootstrap resamples (subjects as clusters) of the overall tables.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry folder.")
@device_option
def evaluate(data_dirs: tuple[Path, ...], model_ref: str | None, out_dir: Path, splits: tuple[str, ...],
             limit: int | None, cache_dirs: tuple[Path, ...], baseline_dir: Path | None, baseline_cache: Path | None,
             slice_step: int, with_true: bool, n_boot: int, models_dir: Path, device: str) -> None:
    """Compare the ground truth with the "DL" maps (matching of the synthetic MRF), a trivial intensity
    lookup fitted on training subjects and, with --true, the "true" maps (matching of the subjects' MRF):
    regional CCC with clustered-bootstrap 95 % CIs, mean differences, voxelwise errors per tissue and the
    paper's figures per dataset, and plain estimates per acquisition group (family x field strength), also on
    near-pure tissue voxels only (truth within 5 % (T1) and 8 % (T2) of the subject's own GM or WM value:
    nearly the same under every partial-volume convention)."""
    from pipeline.model.package import PackageError
    from pipeline.model.registry import load_model
    from training.evaluate_model import EvaluationSet, check_sets, evaluate_package
    from training.evaluation.baseline import fit_baseline
    from training.evaluation.datasets import DatasetInfo
    from training.evaluation.protocols import text_table

    if len(splits) not in (1, len(data_dirs)):
        raise click.UsageError(f"--split: give it once or once per --data ({len(data_dirs)}), got {len(splits)}")
    if cache_dirs and len(cache_dirs) != len(data_dirs):
        raise click.UsageError(f"--cache: give it once per --data ({len(data_dirs)}), got {len(cache_dirs)}")
    try:
        package = load_model(model_ref, models_dir)
    except (PackageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    names: list[str] = []
    for path in data_dirs:
        name, n = path.resolve().name, 2
        while name in names:
            name, n = f"{path.resolve().name}-{n}", n + 1
        names.append(name)
    caches = list(cache_dirs) or [out_dir / "cache" / name for name in names]
    splits = splits * len(data_dirs) if len(splits) == 1 else splits
    try:
        sets = []
        for path, name, split, cache in zip(data_dirs, names, splits, caches, strict=True):
            data = DatasetInfo.read(path)
            sets.append(EvaluationSet(data, name, split, tuple(data.split(split)[:limit]), cache))
        baseline_data = DatasetInfo.read(baseline_dir or data_dirs[0])
        if baseline_cache is None:
            same = [s.cache for s in sets if s.data.root.resolve() == baseline_data.root.resolve()]
            baseline_cache = same[0] if same else out_dir / "cache" / "baseline"
        check_sets(sets, frozenset((baseline_data.root / s).resolve() for s in baseline_data.split("train")))
        baseline = fit_baseline(baseline_data, baseline_cache, package.normalisation)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = evaluate_package(sets, package, out_dir, baseline, slice_step=slice_step, with_true=with_true,
                              n_boot=n_boot, device=device)
    click.echo(f"\nTruth vs map set by acquisition group ({package.name}):")
    click.echo(text_table(report.by_protocol))
    if not report.near_pure.empty:
        click.echo(f"\nNear-pure tissue voxels (truth at the subject's own GM or WM value; {package.name}):")
        click.echo(text_table(report.near_pure))
    if not report.follow.empty:
        click.echo("\nNear-pure voxels: slope of each subject's reading on its own tissue value (1 follows the "
                   "subject, 0 reads one value):")
        click.echo(report.follow.round({"slope": 2, "r": 2, "sd_reference_ms": 0, "sd_other_ms": 0})
                   .to_string(index=False, float_format=lambda v: f"{v:g}"))
    click.echo(f"report: {report.files['summary_md']}")
