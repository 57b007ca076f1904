"""The ``synthmrf`` command line: a thin layer over the library; every level has ``--help``.

Commands are imported when they run (or when ``--help`` lists them), and each imports its heavy
dependencies (torch, SimpleITK, pynetdicom) inside its function: ``synthmrf --help`` and
``synthmrf status`` start in a fraction of a second.
"""

from __future__ import annotations

import importlib
import logging

import click

from dicom_node.logs import CHATTY_LIBRARIES

COMMANDS = {  # name -> module under dicom_node.commands (the module defines a click command of that name)
    "mrf": "mrf", "model": "model", "phantom": "phantom", "demo": "demo", "train": "train", "evaluate": "evaluate",
    "serve": "serve", "worker": "worker", "jobs": "jobs", "status": "status", "echo": "echo", "send": "send",
    "process": "process", "retro": "retro",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"dicom_node.commands.{module}"), cmd_name)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="synthmrf")
def cli(verbose: int) -> None:
    """synthmrf: quantitative T1/T2/PD maps from routine MPRAGE via synthetic MR fingerprinting."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in CHATTY_LIBRARIES:  # per-PDU and per-module chatter (pynetdicom's with identifiers) at INFO/DEBUG
        logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
