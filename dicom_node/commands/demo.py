"""``synthmrf demo``: the product's round trip on embedded defaults (see :mod:`dicom_node.demo`)."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.commands.options import device_option


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("synthmrf-demo"),
              show_default=True, help="Phantom, node storage, received results and the QC figure go here.")
@device_option
def demo(workdir: Path, device: str) -> None:
    """MPRAGE in, quantitative maps out, over DICOM: a phantom MPRAGE study is sent by C-STORE to a node
    started in this process, which runs the pipeline with the active model and sends the T1/T2
    Parametric Maps (and derived series) to an embedded destination. Exit status 0 only if the maps
    arrived, belong to the source study and patient, and their white- and grey-matter medians are
    within 25 % of the phantom's truth. A few minutes on 2 CPU cores (the first run on a machine also
    builds the MRF dictionary)."""
    from dicom_node.demo import run_demo

    report = run_demo(workdir, say=click.echo, device=device)
    for name, seconds in report.seconds.items():
        click.echo(f"  {name}: {seconds:.1f} s")
    if report.rows:
        click.echo(report.table())
    if report.received:
        click.echo(f"received: {len(report.received)} DICOM instances in {workdir / 'received'}")
    if report.maps_dir is not None:
        click.echo(f"maps (NIfTI) and provenance: {report.maps_dir}; QC figure: {report.qc_figure}")
    if not report.plausible:
        raise click.ClickException("; ".join(report.problems) or "no maps")
    click.echo("demo: OK")
