"""``synthmrf serve``: run the node in the foreground until SIGTERM or Ctrl-C, then drain."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from dicom_node.commands.options import config_option, load


@click.command()
@config_option()
def serve(config_path: Path | None) -> None:
    """Receive series, process MPRAGEs, send the maps to the destinations, and run the retrospective
    schedules ('synthmrf retro add').

    The pipeline runs in jobs.workers worker processes started here (0: this node only receives and
    dispatches; run 'synthmrf worker' elsewhere); this process never loads torch. SIGTERM or SIGINT
    stops accepting associations, has each worker hand its running job back to the queue (it runs
    again later), and lets in-flight associations, sends and retrievals finish (up to
    node.drain_timeout_s); anything left is picked up at the next start.
    """
    from dicom_node.config import ConfigError
    from dicom_node.logs import configure_logging
    from dicom_node.node import Node, NodeLockedError
    from dicom_node.retro.schedules import start_scheduler
    from dicom_node.state_db import DatabaseUnavailableError
    from dicom_node.stop_signals import stop_on_signals

    cfg = load(config_path)
    configure_logging(cfg.logging.level, cfg.logging.format)
    stop = threading.Event()
    stop_on_signals(stop)
    node = Node(cfg)
    try:
        node.start()
    except (NodeLockedError, ConfigError, DatabaseUnavailableError) as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        retro = start_scheduler(cfg, node)
    except BaseException:
        node.stop(drain=True)
        raise
    try:
        while not stop.wait(1.0):
            pass
    finally:
        retro.stop(timeout_s=cfg.node.drain_timeout_s)  # series in flight are resumed at the next start
        node.stop(drain=True)
