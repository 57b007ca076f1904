"""``synthmrf send``: C-STORE files and folders to a configured destination or any host/port."""

from __future__ import annotations

from pathlib import Path

import click

from dicom_node.commands.options import config_option, load, peer_options, resolve_peer


@click.command()
@config_option()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "destination", help="A configured destination name.")
@peer_options
def send(config_path: Path | None, paths: tuple[Path, ...], destination: str | None, host: str | None,
         port: int | None, ae_title: str | None, calling_aet: str | None) -> None:
    """C-STORE PATHS (files, and folders recursively) to --to DESTINATION or --host/--port.

    Exit status 0 only if every DICOM file was stored; files that are not DICOM are skipped and listed.
    """
    from dicom_node.dimse.client import AssociationError, dicom_files, store_files

    cfg = load(config_path)
    peer = resolve_peer(cfg, destination, host, port, ae_title)
    files = dicom_files(paths)
    try:
        report = store_files(files, peer, calling_aet or cfg.calling_ae_title, cfg.dispatch.connect_timeout_s,
                             cfg.dispatch.dimse_timeout_s)
    except (AssociationError, OSError) as exc:
        raise click.ClickException(f"C-STORE to {peer}: {exc}") from exc
    for path, why in report.skipped:
        click.echo(f"skipped {path}: {why}", err=True)
    for path, why in report.failed:
        click.echo(f"FAILED  {path}: {why}", err=True)
    click.echo(f"{len(report.stored)} stored, {len(report.failed)} failed, {len(report.skipped)} skipped to {peer}")
    if report.failed:
        raise SystemExit(1)
