"""``synthmrf status``: is the node answering, queue depth, nodes and workers, recent jobs and failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from dicom_node.commands.jobs import delivery_summary, open_store, when
from dicom_node.commands.options import config_option, load


@click.command()
@config_option()
@click.option("--recent", type=click.IntRange(min=0), default=5, show_default=True, help="How many recent jobs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option("--echo", "do_echo", is_flag=True,
              help="Also C-ECHO this configuration's listener (node.host:node.port) and say whether it answers.")
def status(config_path: Path | None, recent: int, as_json: bool, do_echo: bool) -> None:
    """Nodes and workers (with their heartbeats), queue, recent jobs and failures, retrospective schedules, read
    from the job store and the storage folder (works while the node runs)."""
    from dicom_node.node.job_store import DeliveryState, JobState
    from dicom_node.node.spool import Spool

    cfg = load(config_path)
    store = open_store(cfg)
    listening = "not checked (--echo checks)"
    if do_echo:
        from dicom_node.dimse.client import AssociationError, Peer, echo

        host = "127.0.0.1" if cfg.node.host in ("0.0.0.0", "", "::") else cfg.node.host
        try:
            code = echo(Peer(cfg.node.ae_title, host, cfg.node.port), cfg.calling_ae_title, timeout_s=3.0)
            listening = f"answering C-ECHO on {host}:{cfg.node.port}" if code == 0 else f"C-ECHO status 0x{code:04X}"
        except (AssociationError, OSError) as exc:
            listening = f"not answering on {host}:{cfg.node.port} ({exc})"
    spool = Spool(cfg.node.storage_dir)
    arriving = [s for s in spool.series_uids() if spool.incoming_files(s)]
    counts = store.counts()
    queued = store.queued()
    due_at = store.next_due_at()
    now = time.time()
    waiting = f", next due in {due_at - now:.0f} s" if queued and due_at is not None and due_at > now else ""
    queue_text = f"{len(queued)} job(s) queued{waiting} ({cfg.jobs.backend}: {store})"
    members = [{"id": m.id, "kind": m.kind, "host": m.host, "pid": m.pid, "detail": m.detail,
                "heartbeat_age_s": round(now - m.heartbeat_at, 1),
                "silent": now - m.heartbeat_at > cfg.jobs.takeover_s} for m in store.members()]
    recent_jobs = store.jobs(limit=recent)
    failed = store.jobs([JobState.FAILED, JobState.REJECTED], limit=20)
    dead = [j for j in store.jobs([JobState.PROCESSED], limit=200)
            if any(d.state is DeliveryState.DEAD for d in j.deliveries)]
    job_counts = {k[4:]: v for k, v in counts.items() if k.startswith("job:")}
    delivery_counts = {k[9:]: v for k, v in counts.items() if k.startswith("delivery:")}
    recent_rows = [{"id": j.id, "state": str(j.state), "created": when(j.created_at), "reason": j.reason,
                    "deliveries": delivery_summary(j)} for j in recent_jobs]
    failures = [{"id": j.id, "state": str(j.state), "reason": j.reason} for j in failed]
    failures += [{"id": j.id, "state": "dead delivery",
                  "reason": "; ".join(d.last_error for d in j.deliveries if d.last_error)} for j in dead]
    free_mb = spool.free_bytes() // 2**20
    schedules = []
    if (cfg.node.storage_dir / "retro").is_dir():  # a schedule was ever added (apscheduler loads slowly)
        from dicom_node.retro.schedules import schedule_summary

        schedules = schedule_summary(cfg)
    if as_json:
        click.echo(json.dumps({"node": listening, "storage_dir": str(cfg.node.storage_dir), "free_mb": free_mb,
                               "series_arriving": len(arriving), "queue_depth": len(queued), "members": members,
                               "jobs": job_counts,
                               "deliveries": delivery_counts, "recent": recent_rows, "failures": failures,
                               "schedules": schedules}, indent=1))
        return
    click.echo(f"listener     {listening}\nstorage      {cfg.node.storage_dir} ({free_mb} MiB free)\n"
               f"arriving     {len(arriving)} series\nqueue        {queue_text}")
    for m in members:
        silent = f"  SILENT (taken over after {cfg.jobs.takeover_s:.0f} s)" if m["silent"] else ""
        click.echo(f"{m['kind']:<12} {m['host']} pid {m['pid']}  heartbeat {m['heartbeat_age_s']:.0f} s ago  "
                   f"{m['detail']}{silent}")
    if not any(m["kind"] == "node" for m in members):
        click.echo("node         none running (no node has a heartbeat in the job store)")
    if not any(m["kind"] == "worker" for m in members):
        click.echo("worker       none running: queued jobs wait ('synthmrf serve' with jobs.workers > 0, or "
                   "'synthmrf worker')")
    click.echo("jobs         " + (", ".join(f"{k} {v}" for k, v in sorted(job_counts.items())) or "none"))
    click.echo("deliveries   " + (", ".join(f"{k} {v}" for k, v in sorted(delivery_counts.items())) or "none"))
    for r in recent_rows:
        click.echo(f"recent       {r['id']}  {r['state']}  {r['created']}  {r['deliveries']}  {r['reason']}")
    for f in failures:
        click.echo(f"FAILURE      {f['id']}  {f['state']}  {f['reason']}")
    for sch in schedules:
        last = sch["last_run"]
        last_text = f"last run {last['state']} ({last['studies']} studies)" if last else "never run"
        paused = " (paused)" if sch["paused"] else ""
        click.echo(f"schedule     {sch['name']}{paused}  '{sch['cron']}'  next {sch['next_run'] or '-'}  {last_text}")
