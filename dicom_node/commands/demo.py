"""``synthmrf demo``: the product's round trip on embedded defaults."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.mrf.physics_demo import run_physics_demo


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("synthmrf-demo"),
              show_default=True, help="Where the maps and the QC figure are written.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def demo(workdir: Path, device: str) -> None:
    """Run the physics round trip and check the result.

    A numerical head phantom (known T1/T2/PD) is scanned with the default MRF sequence (EPG), noise is
    added, the signal is SVD-compressed and dictionary-matched, and the recovered maps are compared
    with the truth region by region. Exit status 0 only if every region is recovered within tolerance.
    (The full node round trip, MPRAGE in and DICOM maps out, replaces this as the pipeline lands.)
    """
    report = run_physics_demo(workdir, device=device)
    click.echo(report.table())
    click.echo(f"maps: {workdir}/T1.nii.gz, T2.nii.gz, PD.nii.gz; QC figure: {report.figure}")
    if not report.plausible:
        click.echo("FAILED: recovered values outside tolerance", err=True)
        sys.exit(1)
