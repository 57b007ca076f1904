"""``synthmrf jobs list|show|retry``: the node's jobs and deliveries, read from its state database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from dicom_node.commands.options import config_option, load

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig
    from dicom_node.node.job_store import Job, JobStore


def open_store(cfg: NodeConfig) -> JobStore:
    """The installation's job store (SQLite in the storage folder, or PostgreSQL), with a clear error."""
    from dicom_node.node.job_store import STATE_FILE, open_job_store
    from dicom_node.state_db import DatabaseUnavailableError

    if cfg.jobs.backend == "sqlite":
        path = cfg.node.storage_dir / STATE_FILE
        if not path.is_file():
            raise click.ClickException(f"{path}: no node state here (has the node run with this storage_dir?)")
    try:
        return open_job_store(cfg.node.storage_dir, cfg.jobs.backend, cfg.jobs.database_url)
    except DatabaseUnavailableError as exc:  # PostgreSQL unreachable, wrong password, ...
        raise click.ClickException(str(exc)) from exc


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def delivery_summary(job: Job) -> str:
    if not job.deliveries:
        return "-"
    return " ".join(f"{d.destination}:{d.state}" for d in job.deliveries)


def find_one(store: JobStore, text: str) -> Job:
    jobs = store.find(text)
    if not jobs:
        raise click.ClickException(f"no job matches {text!r} (a job id, its prefix, or a series UID)")
    if len(jobs) > 1 and not any(j.id == text for j in jobs):
        ids = ", ".join(j.id for j in jobs[:5])
        raise click.ClickException(f"{text!r} matches {len(jobs)} jobs ({ids}); give the full job id")
    return next((j for j in jobs if j.id == text), jobs[-1])


@click.group()
def jobs() -> None:
    """Jobs (one per received series version) and their deliveries to the destinations."""


@jobs.command("list")
@config_option()
@click.option("--state", "states", multiple=True,
              type=click.Choice(["ignored", "queued", "processing", "processed", "delivered", "rejected", "failed"]),
              help="Only jobs in this state (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def list_jobs(config_path: Path | None, states: tuple[str, ...], limit: int) -> None:
    """Newest jobs first: id, state, instances, attempts, deliveries, created, reason."""
    from dicom_node.node.job_store import JobState

    store = open_store(load(config_path))
    rows = store.jobs([JobState(s) for s in states], limit)
    if not rows:
        click.echo("no jobs")
    for j in rows:
        click.echo(f"{j.id}  {j.state:<10} {j.instances:>5} inst  {j.attempts} run(s)  {delivery_summary(j)}  "
                   f"{when(j.created_at)}  {j.reason}")


@jobs.command()
@config_option()
@click.argument("job")
def show(config_path: Path | None, job: str) -> None:
    """Everything about JOB (a job id, a unique prefix, or a series UID: its newest version)."""
    j = find_one(open_store(load(config_path)), job)
    click.echo(f"job        {j.id}\nseries     {j.series_uid} (version {j.version})\nstudy      {j.study_uid}\n"
               f"state      {j.state}\nreason     {j.reason or '-'}\ninstances  {j.instances}\n"
               f"runs       {j.attempts}\ncreated    {when(j.created_at)}\nstarted    {when(j.started_at)}\n"
               f"finished   {when(j.finished_at)}\npurged     {when(j.purged_at)}")
    folders = sorted({str(Path(p).parent) for p in j.results})
    if j.results:
        click.echo(f"results    {len(j.results)} files in {', '.join(folders)}")
    for d in j.deliveries:
        click.echo(f"delivery   {d.destination}: {d.state}, {d.attempts} attempt(s), "
                   f"{'sent ' + when(d.sent_at) if d.sent_at else 'next ' + when(d.next_attempt_at)}"
                   f"{(': ' if d.sent_at else ', last error: ') + d.last_error if d.last_error else ''}")


@jobs.command()
@config_option()
@click.argument("job")
def retry(config_path: Path | None, job: str) -> None:
    """Run JOB again: a failed or rejected job is queued; dead or waiting deliveries are sent now."""
    cfg = load(config_path)
    store = open_store(cfg)
    j = find_one(store, job)
    changes = store.retry(j.id)
    if not changes:
        raise click.ClickException(f"job {j.id} is {j.state} with nothing to retry")
    click.echo(f"{j.id}: " + "; ".join(changes))
