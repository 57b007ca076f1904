"""The ``synthmrf`` command line: a thin layer over the library; every level has ``--help``."""

from __future__ import annotations

import logging

import click

from dicom_node.commands.demo import demo
from dicom_node.commands.echo import echo
from dicom_node.commands.evaluate import evaluate
from dicom_node.commands.jobs import jobs
from dicom_node.commands.model import model
from dicom_node.commands.mrf import mrf
from dicom_node.commands.phantom import phantom
from dicom_node.commands.process import process
from dicom_node.commands.retro import retro
from dicom_node.commands.send import send
from dicom_node.commands.serve import serve
from dicom_node.commands.status import status
from dicom_node.commands.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="synthmrf")
def cli(verbose: int) -> None:
    """synthmrf: quantitative T1/T2/PD maps from routine MPRAGE via synthetic MR fingerprinting."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # per-PDU chatter (and identifiers) at INFO/DEBUG


cli.add_command(mrf)
cli.add_command(model)
cli.add_command(phantom)
cli.add_command(demo)
cli.add_command(train)
cli.add_command(evaluate)
cli.add_command(serve)
cli.add_command(jobs)
cli.add_command(status)
cli.add_command(echo)
cli.add_command(send)
cli.add_command(process)
cli.add_command(retro)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
