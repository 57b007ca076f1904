"""``synthmrf echo``: C-ECHO a configured destination or any host/port."""

from __future__ import annotations

import time
from pathlib import Path

import click

from dicom_node.commands.options import config_option, load, peer_options, resolve_peer


@click.command()
@config_option()
@click.argument("destination", required=False)
@peer_options
def echo(config_path: Path | None, destination: str | None, host: str | None, port: int | None,
         ae_title: str | None, calling_aet: str | None) -> None:
    """C-ECHO DESTINATION (a configured name) or --host/--port; exit status 0 only on success."""
    from dicom_node.dimse.client import AssociationError
    from dicom_node.dimse.client import echo as c_echo

    cfg = load(config_path)
    peer = resolve_peer(cfg, destination, host, port, ae_title)
    start = time.monotonic()
    try:
        code = c_echo(peer, calling_aet or cfg.calling_ae_title)
    except (AssociationError, OSError) as exc:
        raise click.ClickException(f"C-ECHO to {peer}: {exc}") from exc
    if code != 0:
        raise click.ClickException(f"C-ECHO to {peer}: status 0x{code:04X}")
    click.echo(f"C-ECHO to {peer}: success in {1000 * (time.monotonic() - start):.0f} ms")
