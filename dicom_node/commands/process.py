"""``synthmrf process``: one MPRAGE series (DICOM folder or NIfTI) to T1/T2/PD maps and DICOM results."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.commands.options import device_option

FAMILIES = ("mprage", "ir-fspgr", "tfe")  # pipeline.protocol.Family (not imported: --help stays fast)
POSITIVE = click.FloatRange(min=0, min_open=True)


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Result folder: T1/T2/PD.nii.gz (ms; on the input's grid), qc.png, provenance.json, and for "
                   "DICOM input dicom/ with the Parametric Maps and derived series.")
@click.option("--model", "model_ref", default=None,
              help="A package folder, or an installed/built-in model NAME-VERSION (default: the active model).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry folder.")
@device_option
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="Inference engine: auto runs ONNX Runtime for float32 on CPU (exported once per model and cached "
                   "in SYNTHMRF_CACHE_DIR) and torch for CUDA or bfloat16.")
@click.option("--precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Network arithmetic; auto uses bfloat16 where the hardware computes it natively.")
@click.option("--pd-map/--no-pd-map", default=False, show_default=True, help="Also write a PD Parametric Map.")
@click.option("--derived/--no-derived", default=True, show_default=True,
              help="Viewer-friendly derived MR series (16-bit, rescaled to ms) beside the Parametric Maps.")
@click.option("--contrasts/--no-contrasts", default=True, show_default=True,
              help="Synthetic T1w, T2w, PDw, FLAIR and DIR images from the maps (OUT/synthetic_*.nii.gz and, with "
                   "--derived, derived MR series marked 'not acquired'); timing as in [pipeline] synthetic_contrasts.")
@click.option("--regions/--no-regions", default=True, show_default=True,
              help="Regional T1/T2/PD over the AAL3 atlas regions carried onto the head (OUT/regions.csv, "
                   "regions.json, regions.nii.gz and, for DICOM input, a Segmentation and a TID 1500 report).")
@click.option("--summary/--no-summary", default=False, show_default=True,
              help="A summary page (QC panels and the regional table): OUT/summary.png and, for DICOM input, a "
                   "Secondary Capture 'synthMRF summary, not for diagnosis' for viewers without SEG/SR support.")
@click.option("--keep-working", is_flag=True, help="Also write the working-grid volumes (OUT/working/).")
@click.option("--allow-out-of-range", is_flag=True,
              help="Process an acquisition outside the protocols the model was trained on (field strength, "
                   "family, TI, timing, flip angle, TE) instead of refusing it; the reasons go into provenance.json.")
@click.option("--uid-root", default=None, metavar="ROOT",
              help="Your organisation's UID root for every UID of the results (default: pydicom's root).")
@click.option("--sidecar", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="NIfTI input: its BIDS sidecar as dcm2niix writes it (times in seconds). Default: NAME.json "
                   "beside NAME.nii.gz; without one, the protocol is the family's typical one, all assumed.")
@click.option("--field-strength", "field_strength_t", type=POSITIVE, metavar="T",
              help="Field strength in tesla (1.5, 3, ...).")
@click.option("--family", type=click.Choice(FAMILIES),
              help="Sequence family: mprage (Siemens MPRAGE, tfl3d), ir-fspgr (GE IR-FSPGR/BRAVO, efgre3d), tfe "
                   "(Philips 3D T1-TFE with an inversion prepulse).")
@click.option("--ti", "ti_ms", type=POSITIVE, metavar="MS",
              help="InversionTime as the scanner states it (Siemens/Philips: inversion to the k-space centre; "
                   "GE: the prep time).")
@click.option("--shot-interval", "shot_interval_ms", type=POSITIVE, metavar="MS",
              help="Time between inversions: Siemens' RepetitionTime; for GE and Philips from the protocol sheet "
                   "(their RepetitionTime is the echo spacing).")
@click.option("--echo-spacing", "echo_spacing_ms", type=POSITIVE, metavar="MS",
              help="Time between readout pulses: GE's and Philips' RepetitionTime (under 30 ms); for Siemens the "
                   "echo spacing of the protocol sheet.")
@click.option("--flip-angle", "flip_angle_deg", type=click.FloatRange(min=0, max=90, min_open=True), metavar="DEG",
              help="Readout flip angle in degrees.")
@click.option("--te", "te_ms", type=POSITIVE, metavar="MS", help="Echo time.")
def process(source: Path, out_dir: Path, model_ref: str | None, models_dir: Path, device: str, backend: str,
            precision: str, pd_map: bool, derived: bool, contrasts: bool, regions: bool, summary: bool,
            keep_working: bool, allow_out_of_range: bool,
            uid_root: str | None, sidecar: Path | None, **overrides: float | str | None) -> None:
    """Turn SOURCE, a folder holding one 3D T1-weighted (MPRAGE) DICOM series or a NIfTI file, into
    quantitative maps. The series is checked first; input that cannot be an MPRAGE volume (a localiser,
    2D, too few slices, mixed series, inconsistent geometry) is refused with the reason (exit status 2).

    The acquisition protocol comes from the DICOM header (for NIfTI: its BIDS sidecar). Vendors differ:
    Siemens' RepetitionTime is the time between inversions (about 2000-2700 ms), GE's and Philips' is the
    echo spacing (about 6-9 ms); any RepetitionTime under 30 ms is read as the echo spacing, over 500 ms as
    the shot interval. What the header does not say takes the family's typical value (listed as assumed
    in provenance.json); --field-strength, --family, --ti, --shot-interval, --echo-spacing, --flip-angle
    and --te replace header values and assumptions alike. An acquisition
    outside what the model was trained on (e.g. 1.5 T for a 3 T model) is refused (exit status 2) unless
    --allow-out-of-range.
    """
    from pipeline.contrasts import DEFAULT_CONTRASTS
    from pipeline.dicom_series import SeriesRejected
    from pipeline.model.package import PackageError
    from pipeline.model.registry import load_model
    from pipeline.process import NIFTI_SUFFIXES, ProcessOptions, process_series

    try:
        package = load_model(model_ref, models_dir)
    except (PackageError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if sidecar is not None and not (source.is_file() and source.name.endswith(NIFTI_SUFFIXES)):
        raise click.UsageError("--sidecar is for NIfTI input; a DICOM series carries its protocol in its header")
    if uid_root is not None:
        from pipeline.dicom_output.uids import check_uid_root

        try:
            check_uid_root(uid_root)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--uid-root") from exc
    options = ProcessOptions(device=device, precision=precision, backend=backend, derived_series=derived,
                             pd_dicom=pd_map, keep_working=keep_working, allow_out_of_range=allow_out_of_range,
                             protocol_overrides=overrides, sidecar=sidecar, uid_root=uid_root,
                             contrasts=DEFAULT_CONTRASTS if contrasts else (), regions=regions,
                             summary=summary)
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
