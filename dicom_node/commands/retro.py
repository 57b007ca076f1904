"""``synthmrf retro``: retrospective passes over an archive, their schedules, and training-data harvests."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from dicom_node.commands.options import config_option, load

if TYPE_CHECKING:
    from tqdm import tqdm

    from dicom_node.config import NodeConfig
    from dicom_node.retro.runner import PlannedSeries


def _query_option(command: Any) -> Any:
    return click.option("--query", "-q", "query", multiple=True, metavar="KEY=VALUE",
                        help="DICOM matching key (repeatable), e.g. Modality=MR, StudyDate=20100101-20151231, "
                             "SeriesDescription=*MPRAGE*.")(command)


def _limit_options(command: Any) -> Any:
    for option in reversed([
        click.option("--max-studies", type=click.IntRange(min=1), help="Cap of studies per run (default: "
                     "retro.max_studies_per_run)."),
        click.option("--rate", "max_studies_per_hour", type=click.FloatRange(min=0, min_open=True),
                     help="Rate limit in studies per hour (default: retro.max_studies_per_hour)."),
        click.option("--window", help="Only run between these local times, e.g. 20:00-06:00 (default: retro.window)."),
    ]):
        command = option(command)
    return command


def _loaded(config_path: Path | None) -> NodeConfig:
    if config_path is None:
        raise click.UsageError("give --config FILE (or SYNTHMRF_CONFIG): the sources are configured there")
    return load(config_path)


def _query_terms(query: tuple[str, ...]) -> dict[str, str]:
    from dicom_node.retro.query import QueryError, parse_query

    terms: dict[str, str] = {}
    for term in query:
        key, sep, value = term.partition("=")
        if not sep:
            raise click.BadParameter(f"{term!r}: expected KEY=VALUE", param_hint="--query")
        terms[key.strip()] = value.strip()
    try:
        parse_query(terms)
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint="--query") from exc
    return terms


class _Bars:
    """tqdm bars for an interactive pass: studies, and the series being fetched."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self.studies: tqdm[Any] | None = None
        self.series: tqdm[Any] | None = None

    def studies_found(self, n: int) -> None:
        self.studies = self._tqdm(total=n, desc="studies", unit="study", position=0)

    def study_done(self) -> None:
        if self.studies is not None:
            self.studies.update()

    def series_started(self, item: PlannedSeries) -> None:
        self.series = self._tqdm(total=item.expected, desc=f"series {item.series_number or item.series_uid[-12:]}",
                                 unit="inst", position=1, leave=False)

    def series_progress(self, item: PlannedSeries, done: int, total: int | None) -> None:
        if self.series is not None:
            if total is not None and self.series.total != total:
                self.series.total = total
            self.series.update(done - self.series.n)

    def series_done(self, item: PlannedSeries, ok: bool) -> None:
        if self.series is not None:
            self.series.close()
            self.series = None

    def close(self) -> None:
        for bar in (self.series, self.studies):
            if bar is not None:
                bar.close()


@click.group()
def retro() -> None:
    """Query/retrieve from archives: retrospective passes, schedules, training-data harvests.

    Archives are configured as [[sources]] (name, ae_title, host, port, retrieve = "move" or "get");
    limits and defaults in [retro]. Schedules run inside 'synthmrf serve'.
    """


@retro.command()
@config_option()
@click.option("--source", required=True, help="Name of a configured [[sources]] entry.")
@_query_option
@_limit_options
@click.option("--dry-run", is_flag=True, help="List what would be fetched; fetch nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when on a terminal).")
def run(config_path: Path | None, source: str, query: tuple[str, ...], max_studies: int | None,
        max_studies_per_hour: float | None, window: str | None, dry_run: bool, as_json: bool,
        progress: bool | None) -> None:
    """Run one pass now: find MPRAGE series matching the query and have the node fetch and process them.

    \b
    Example:
      synthmrf retro run --config node.toml --source pacs --query Modality=MR \\
          --query StudyDate=20100101-20151231 --query 'SeriesDescription=*MPRAGE*'
    """
    from dicom_node.config import ConfigError
    from dicom_node.retro.config import parse_window
    from dicom_node.retro.progress import ProgressStore, RunState
    from dicom_node.retro.runner import NodeView, PassRunner, PassSpec

    cfg = _loaded(config_path)
    terms = _query_terms(query)
    if window:
        try:
            parse_window(window)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--window") from exc
    spec = PassSpec(source, terms, max_studies, max_studies_per_hour, window, dry_run=dry_run)
    store = ProgressStore.open(cfg.node.storage_dir)
    view = NodeView(cfg)
    bars = _Bars() if (progress if progress is not None else sys.stderr.isatty()) and not as_json else None
    try:
        report = PassRunner(cfg, store, view).run(spec, bars)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if bars is not None:
            bars.close()
        view.close()
        store.close()
    if as_json:
        click.echo(json.dumps({"run": report.run_id, "state": str(report.state), "message": report.message,
                               "studies_found": report.studies_found, "studies": report.studies,
                               "planned": [p.__dict__ for p in report.planned], "fetched": report.fetched,
                               "failed": report.failed, "skipped": report.skipped, "instances": report.instances},
                              indent=1))
    else:
        for p in report.planned:
            click.echo(f"would fetch  study {p.study_uid}  series {p.series_uid}  #{p.series_number}  "
                       f"{p.description!r}  {p.expected if p.expected is not None else '?'} instances")
        for uid, error in report.failed.items():
            click.echo(f"FAILED       series {uid}: {error}")
        click.echo(report.summary())
    if report.state is RunState.FAILED:
        raise click.ClickException(report.message)


@retro.command()
@config_option()
@click.argument("name")
@click.option("--source", required=True, help="Name of a configured [[sources]] entry.")
@click.option("--cron", required=True, help="'minute hour day month weekday' (or six fields, seconds first), "
              "local time, e.g. '0 2 * * *'.")
@_query_option
@_limit_options
@click.option("--replace", is_flag=True, help="Replace a schedule of the same name.")
def add(config_path: Path | None, name: str, source: str, cron: str, query: tuple[str, ...],
        max_studies: int | None, max_studies_per_hour: float | None, window: str | None, replace: bool) -> None:
    """Schedule a pass (stored in the node's storage folder; 'synthmrf serve' runs it).

    \b
    Example:
      synthmrf retro add nightly --config node.toml --source pacs --cron '0 1 * * *' \\
          --window 01:00-06:00 --max-studies 200 --query Modality=MR --query StudyDate=20100101-20151231
    """
    from pydantic import ValidationError

    from dicom_node.config import ConfigError
    from dicom_node.retro.schedules import ScheduleError, ScheduleSpec, add_schedule

    cfg = _loaded(config_path)
    try:
        spec = ScheduleSpec(name=name, source=source, cron=cron, query=_query_terms(query), max_studies=max_studies,
                            max_studies_per_hour=max_studies_per_hour, window=window)
        info = add_schedule(cfg, spec, replace=replace)
    except ValidationError as exc:
        raise click.ClickException("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                                   ) from exc
    except (ScheduleError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"schedule {name!r} added: {spec.cron} from {source}; next run {_when(info.next_run)}")


def _when(value: datetime.datetime | str | None) -> str:
    if value is None:
        return "(paused)"
    return value if isinstance(value, str) else value.isoformat(timespec="seconds")


@retro.command(name="list")
@config_option()
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def list_(config_path: Path | None, as_json: bool) -> None:
    """Schedules with their next and last runs."""
    from dicom_node.retro.schedules import schedule_summary

    rows = schedule_summary(_loaded(config_path))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no schedules")
    for r in rows:
        last = r["last_run"]
        last_text = "never run" if last is None else (
            f"last run {datetime.datetime.fromtimestamp(last['started_at']).isoformat(timespec='seconds')} "
            f"{last['state']}: {last['series_fetched']} series fetched, {last['series_failed']} failed"
            f"{' (' + last['message'] + ')' if last['message'] else ''}")
        click.echo(f"{r['name']}  [{r['cron']}] from {r['source']} {r['query']}  next {_when(r['next_run'])}  "
                   f"{last_text}")


def _edit(config_path: Path | None, name: str, action: str) -> None:
    from dicom_node.retro.schedules import ScheduleError, pause_schedule, remove_schedule, resume_schedule

    cfg = _loaded(config_path)
    try:
        if action == "pause":
            pause_schedule(cfg, name)
        elif action == "resume":
            info = resume_schedule(cfg, name)
            click.echo(f"schedule {name!r} resumed; next run {_when(info.next_run)}")
            return
        else:
            remove_schedule(cfg, name)
    except ScheduleError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"schedule {name!r} {'paused' if action == 'pause' else 'removed'}")


@retro.command()
@config_option()
@click.argument("name")
def pause(config_path: Path | None, name: str) -> None:
    """Pause a schedule (it stays stored)."""
    _edit(config_path, name, "pause")


@retro.command()
@config_option()
@click.argument("name")
def resume(config_path: Path | None, name: str) -> None:
    """Resume a paused schedule."""
    _edit(config_path, name, "resume")


@retro.command()
@config_option()
@click.argument("name")
def remove(config_path: Path | None, name: str) -> None:
    """Remove a schedule."""
    _edit(config_path, name, "remove")


@retro.command()
@config_option()
@click.option("--retry", "retry_uid", metavar="SERIES_UID", help="Make a failed or given-up series due again.")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
def progress(config_path: Path | None, retry_uid: str | None, as_json: bool) -> None:
    """Series counts by state, the failed and given-up series, and recent runs."""
    from dicom_node.retro.progress import ProgressStore, SeriesState

    cfg = _loaded(config_path)
    store = ProgressStore.open(cfg.node.storage_dir)
    try:
        if retry_uid:
            if not store.retry(retry_uid):
                raise click.ClickException(f"series {retry_uid}: not failed or given up")
            click.echo(f"series {retry_uid}: due again at the next pass")
            return
        failed = store.all_series((SeriesState.FAILED, SeriesState.GAVE_UP))
        runs = store.runs(limit=10)
        if as_json:
            click.echo(json.dumps({"series": store.counts(),
                                   "failed": [{"series_uid": s.series_uid, "state": str(s.state),
                                               "attempts": s.attempts, "error": s.last_error} for s in failed],
                                   "runs": [r.as_dict() for r in runs]}, indent=1))
            return
        click.echo("series  " + (", ".join(f"{k} {v}" for k, v in sorted(store.counts().items())) or "none"))
        for s in failed:
            click.echo(f"{s.state}  {s.series_uid}  attempts {s.attempts}: {s.last_error}")
        for r in runs:
            started = datetime.datetime.fromtimestamp(r.started_at).isoformat(timespec="seconds")
            click.echo(f"run {r.id}  {r.kind}  {r.schedule or '(command line)'}  {started}  {r.state}  "
                       f"{r.series_fetched} fetched, {r.series_failed} failed  {r.message}")
    finally:
        store.close()


@retro.command()
@config_option()
@click.option("--source", required=True, help="Name of a configured [[sources]] entry.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder (created; subjects already there are kept and skipped).")
@_query_option
@click.option("--max-subjects", type=click.IntRange(min=1), help="Stop after this many new subjects.")
@click.option("--dry-run", is_flag=True, help="List the studies with an MPRAGE and an MRF series; fetch nothing.")
@click.option("--keep-dicom", is_flag=True, help="Keep the retrieved DICOM files in OUT/.incoming.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when on a terminal).")
def harvest(config_path: Path | None, source: str, out_dir: Path, query: tuple[str, ...], max_subjects: int | None,
            dry_run: bool, keep_dicom: bool, as_json: bool, progress: bool | None) -> None:
    """Build a training dataset from archive studies with both an MPRAGE and an MRF SVD series.

    Writes per subject mprage.nii.gz, mrf_svd.nii.gz and brain_mask.nii.gz, and manifest.json (split,
    sequence hash): the layout 'synthmrf train' reads. The MRF series must be in the documented DICOM
    form (Parametric Maps of the SVD coefficients, see the README). Nothing is sent to the node.

    \b
    Example:
      synthmrf retro harvest --config node.toml --source research-pacs --out data/harvest \\
          --query StudyDate=20220101-20241231 --query PatientID='MRF*'
    """
    from dicom_node.config import ConfigError
    from dicom_node.retro.harvest import Harvester, HarvestSpec
    from dicom_node.retro.progress import ProgressStore, RunState
    from training.harvested import HarvestedDataset

    cfg = _loaded(config_path)
    spec = HarvestSpec(source, out_dir, _query_terms(query), max_subjects, dry_run, keep_dicom)
    store = ProgressStore.open(cfg.node.storage_dir)
    bars = _Bars() if (progress if progress is not None else sys.stderr.isatty()) and not as_json else None
    try:
        report = Harvester(cfg, store, HarvestedDataset()).run(spec, bars)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if bars is not None:
            bars.close()
        store.close()
    if as_json:
        click.echo(json.dumps({"run": report.run_id, "state": str(report.state), "message": report.message,
                               "studies_found": report.studies_found,
                               "pairs": [{"subject": p.subject, "study": p.study_uid, "mprage": p.mprage.series_uid,
                                          "mrf": p.mrf.series_uid} for p in report.pairs],
                               "harvested": report.harvested, "failed": report.failed, "skipped": report.skipped,
                               "manifest": str(report.manifest) if report.manifest else None}, indent=1))
    else:
        for p in report.pairs:
            click.echo(f"{'pair' if dry_run else 'subject'}  {p.subject}  study {p.study_uid}  MPRAGE "
                       f"{p.mprage.description!r}  MRF {p.mrf.description!r}")
        for subject, error in report.failed.items():
            click.echo(f"FAILED  {subject}: {error}")
        click.echo(report.summary())
        if report.manifest:
            click.echo(f"dataset manifest: {report.manifest}")
    if report.state is RunState.FAILED:
        raise click.ClickException(report.message)
