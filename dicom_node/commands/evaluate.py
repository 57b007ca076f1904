"""``synthmrf evaluate``: the paper's evaluation of a model on held-out subjects."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset folder (manifest.json with a split; README: dataset layout).")
@click.option("--model", "model_ref", default=None,
              help="A package folder, or an installed/built-in model NAME-VERSION (default: the active model).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder: regional.csv, voxelwise.csv, summary.json/.md, figures.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["test", "val", "train"]))
@click.option("--subjects", "limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Prepared-array cache (default OUT/cache).")
@click.option("--bootstrap", "n_boot", default=10_000, show_default=True, type=click.IntRange(min=100),
              help="Clustered bootstrap resamples (subjects as clusters).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry folder.")
def evaluate(data_dir: Path, model_ref: str | None, out_dir: Path, split: str, limit: int | None,
             cache_dir: Path | None, n_boot: int, models_dir: Path) -> None:
    """Compare "true" maps (matching of the subjects' MRF), "DL" maps (matching of the synthetic MRF)
    and the ground truth: regional means/SDs, Lin's CCC with clustered-bootstrap 95 % CIs, mean
    differences, voxelwise errors per tissue, and the paper's figures."""
    from dicom_node.model_registry import load_model
    from pipeline.model.package import PackageError
    from training.evaluate_model import evaluate_package

    try:
        package = load_model(model_ref, models_dir)
    except (PackageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = json.loads((data_dir / "manifest.json").read_text())
    subjects = list(manifest["split"].get(split, []))[:limit]
    evaluate_package(data_dir, subjects, package, out_dir, cache_dir or out_dir / "cache", n_boot=n_boot)
    click.echo((out_dir / "summary.md").read_text())
    click.echo(f"report: {out_dir}")
