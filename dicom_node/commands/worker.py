"""``synthmrf worker``: pipeline worker processes on this machine, for a node that shares the job store."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from dicom_node.commands.options import config_option, load


@click.command()
@config_option()
@click.option("--workers", "count", type=click.IntRange(min=1), default=None,
              help="Worker processes to run [default: jobs.workers, at least 1].")
def worker(config_path: Path | None, count: int | None) -> None:
    """Process queued jobs of the installation's job store until SIGTERM or Ctrl-C.

    Every worker machine needs the same configuration as the nodes: the job store (jobs.backend =
    "postgres" and jobs.database_url for several machines) and node.storage_dir on the same shared
    storage. Each worker process claims one job at a time; jobs.devices gives each its GPU. A worker
    that dies is restarted and its job handed back; on SIGTERM each worker hands its running job back
    (it runs again later) and exits within jobs.stop_timeout_s.
    """
    from dicom_node.logs import configure_logging
    from dicom_node.node.job_store import open_job_store
    from dicom_node.state_db import DatabaseUnavailableError
    from dicom_node.stop_signals import stop_on_signals
    from dicom_node.workers.pool import WorkerPool, take_over_dead

    cfg = load(config_path)
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        store = open_job_store(cfg.node.storage_dir, cfg.jobs.backend, cfg.jobs.database_url)
    except DatabaseUnavailableError as exc:
        raise click.ClickException(str(exc)) from exc
    stop = threading.Event()
    stop_on_signals(stop)
    take_over_dead(store, cfg, owners=store.dead_local_members())
    pool = WorkerPool(cfg, store, count if count is not None else max(cfg.jobs.workers, 1)).start()
    click.echo(f"synthmrf worker: {pool.count} worker process(es) on {store}", err=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        pool.stop()
        store.close()
