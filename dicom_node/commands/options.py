"""Options and helpers shared by the node's commands (imports stay light: ``synthmrf --help`` is fast)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import click

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig
    from dicom_node.dimse.client import Peer

F = TypeVar("F", bound=Callable[..., object])


def config_option(required: bool = False) -> Callable[[F], F]:
    """``--config FILE`` (also ``SYNTHMRF_CONFIG``)."""
    return click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                        required=required, envvar="SYNTHMRF_CONFIG", show_envvar=True,
                        help="Node configuration (TOML); SYNTHMRF_<SECTION>__<KEY> variables override keys.")


def device_option(command: F) -> F:
    """``--device auto|cpu|cuda|cuda:N``, checked when the command line is parsed (auto: CUDA when present)."""
    return click.option("--device", default="auto", show_default=True, callback=_checked_device,
                        help="auto (CUDA when present), cpu, cuda or cuda:N.")(command)


def _checked_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``value`` if this machine has that device, else a usage error (exit 2) that says why."""
    if value == "auto":
        return value
    import torch

    try:
        device: torch.device | None = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise click.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise click.BadParameter(f"{value!r}: no CUDA device here")
        if device.index is not None and device.index >= count:
            raise click.BadParameter(f"{value!r}: this machine has {count} CUDA device(s), numbered from 0")
    return value


def load(config_path: Path | None) -> NodeConfig:
    """The configuration, or a one-line error and exit status 1."""
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def peer_options(command: F) -> F:
    """``--host``, ``--port``, ``--aet`` and ``--calling-aet`` for commands that talk to another AE."""
    for option in reversed([
        click.option("--host", help="Peer host (instead of a configured destination)."),
        click.option("--port", type=click.IntRange(1, 65535), help="Peer port."),
        click.option("--aet", "ae_title", help="Peer AE title (default ANY-SCP)."),
        click.option("--calling-aet", help="Our AE title (default: dispatch.calling_ae_title or node.ae_title)."),
    ]):
        command = option(command)
    return command


def resolve_peer(cfg: NodeConfig, destination: str | None, host: str | None, port: int | None,
                 ae_title: str | None) -> Peer:
    """A configured destination by name, or an ad-hoc host/port/AE title."""
    from dicom_node.config import ConfigError
    from dicom_node.dimse.client import Peer
    from dicom_node.node.dispatch import peer_of

    if destination and host:
        raise click.UsageError("give a destination name or --host/--port, not both")
    if destination:
        try:
            return peer_of(cfg.destination(destination))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    if not host or not port:
        names = ", ".join(d.name for d in cfg.destinations) or "none configured"
        raise click.UsageError(f"give a destination name ({names}) or --host and --port")
    return Peer(ae_title or "ANY-SCP", host, port)
