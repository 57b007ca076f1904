"""``synthmrf process``: one MPRAGE series (DICOM folder or NIfTI) to T1/T2/PD maps and DICOM results."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Result folder: T1/T2/PD.nii.gz (ms; on the input's grid), qc.png, provenance.json, and for "
                   "DICOM input dicom/ with the Parametric Maps and derived series.")
@click.option("--model", "model_ref", default=None,
              help="A package folder, or an installed/built-in model NAME-VERSION (default: the active model).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry folder.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu or cuda.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Network arithmetic; auto uses bfloat16 where the hardware computes it natively.")
@click.option("--pd-map/--no-pd-map", default=False, show_default=True, help="Also write a PD Parametric Map.")
@click.option("--derived/--no-derived", default=True, show_default=True,
              help="Viewer-friendly derived MR series (16-bit, rescaled to ms) beside the Parametric Maps.")
@click.option("--keep-working", is_flag=True, help="Also write the working-grid volumes (OUT/working/).")
def process(source: Path, out_dir: Path, model_ref: str | None, models_dir: Path, device: str, precision: str,
            pd_map: bool, derived: bool, keep_working: bool) -> None:
    """Turn SOURCE, a folder holding one 3D T1-weighted (MPRAGE) DICOM series or a NIfTI file, into
    quantitative maps. The series is checked first; input that cannot be an MPRAGE volume (a localiser,
    2D, too few slices, mixed series, inconsistent geometry) is refused with the reason (exit status 2).
    """
    from dicom_node.model_registry import load_model
    from pipeline.dicom_series import SeriesRejected
    from pipeline.model.package import PackageError
    from pipeline.process import ProcessOptions, process_series

    try:
        package = load_model(model_ref, models_dir)
    except (PackageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    options = ProcessOptions(device=device, precision=precision, derived_series=derived, pd_dicom=pd_map,
                             keep_working=keep_working)
    try:
        result = process_series(source, out_dir, package, options=options)
    except SeriesRejected as exc:
        click.echo(f"rejected: {exc}", err=True)
        raise SystemExit(2) from exc
    click.echo(f"{'stage':<10} {'seconds':>8} {'peak MB':>8}")
    for name, row in result.stages.items():
        click.echo(f"{name:<10} {row['seconds']:>8.2f} {row['peak_rss_mb']:>8.0f}")
    click.echo(f"total      {sum(r['seconds'] for r in result.stages.values()):>8.2f}")
    click.echo(f"maps: {', '.join(str(p) for p in result.maps.values())}")
    if result.dicom_files:
        click.echo(f"DICOM: {len(result.dicom_files)} files in {result.dicom_files[0].parent}")
    click.echo(f"QC figure: {result.qc_figure}; provenance: {result.provenance}")
