"""Retrospective passes against a real Orthanc archive holding phantom studies: C-FIND finds exactly the
MPRAGE series, C-MOVE brings them to a node started in-process (fast processor), the results land back
in the archive, a second pass fetches nothing, an interrupted pass resumes without duplicates."""

from __future__ import annotations

import datetime
import logging
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from node_support import RESULT_DESCRIPTION, fast_processor, free_port, wait_until
from retro_support import (
    HARVEST_AET,
    NODE_AET,
    ArchiveOrthanc,
    ArchiveStudy,
    config_toml,
    make_archive_studies,
    retro_config,
)

from dicom_node.cli import cli
from dicom_node.config import NodeConfig
from dicom_node.node import Node
from dicom_node.node.job_store import JobState
from dicom_node.retro.progress import ProgressStore, RunState, SeriesState
from dicom_node.retro.runner import NodeView, PassRunner, PassSpec, PlannedSeries
from dicom_node.retro.schedules import start_scheduler

N_STUDIES = 4
QUERY = {"Modality": "MR"}


@pytest.fixture(scope="module")
def phantom_mprage(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from training.phantom.dataset import make_dataset
    from training.phantom.subject import PhantomOptions

    out = tmp_path_factory.mktemp("retro-phantom")
    make_dataset(1, out, seed=21, options=PhantomOptions(downsample=2, mrf=False), progress=False)
    return sorted((out / "sub-001" / "mprage_dicom").glob("*.dcm"))


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, phantom_mprage: list[Path], node_port: int
            ) -> Iterator[tuple[ArchiveOrthanc, list[ArchiveStudy]]]:
    folder = tmp_path_factory.mktemp("retro-archive")
    orthanc = ArchiveOrthanc(folder, {NODE_AET: ("127.0.0.1", node_port), HARVEST_AET: ("127.0.0.1", free_port())})
    orthanc.start()
    try:
        studies, files = make_archive_studies(phantom_mprage, folder / "studies", N_STUDIES)
        orthanc.upload(files)
        yield orthanc, studies
    finally:
        orthanc.stop()


def make_config(tmp_path: Path, archive: ArchiveOrthanc, node_port: int, **retro: object) -> NodeConfig:
    return retro_config(tmp_path / "node", node_port=node_port, sources=[archive.source()],
                        destinations=[{"name": "pacs", "ae_title": archive.ae_title, "host": "127.0.0.1",
                                       "port": archive.dicom_port}],
                        retro=retro, series={"quiet_seconds": 4.0, "settle_seconds": 0.2})


def results_for(archive: ArchiveOrthanc, studies: list[ArchiveStudy]) -> dict[str, int]:
    """Result series in the archive per study (fast processor: SeriesDescription 'test result')."""
    wanted = {s.study_uid for s in studies}
    out: dict[str, int] = {}
    for series in archive.series_by_description(RESULT_DESCRIPTION):
        study = archive.get(f"/studies/{series['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
        if study in wanted:
            out[study] = out.get(study, 0) + 1
    return out


def test_pass_fetches_exactly_the_mprage_series_and_results_land_in_the_archive(
        tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]], node_port: int) -> None:
    orthanc, studies = archive
    cfg = make_config(tmp_path, orthanc, node_port)
    config_file = config_toml(cfg, tmp_path / "synthmrf.toml")
    mprage = {s.mprage_series_uid for s in studies}
    with Node(cfg, processor=fast_processor) as node:
        dry = CliRunner().invoke(cli, ["retro", "run", "--config", str(config_file), "--source", "archive",
                                       "--query", "Modality=MR", "--dry-run", "--json"])
        assert dry.exit_code == 0, dry.output
        assert {line for line in mprage if line in dry.output} == mprage
        assert all(uid not in dry.output for s in studies for uid in s.distractor_series_uids)
        assert node.store.counts() == {}  # a dry run fetches nothing

        started = time.monotonic()
        result = CliRunner().invoke(cli, ["retro", "run", "--config", str(config_file), "--source", "archive",
                                          "--query", "Modality=MR", "--query", "StudyDate=20000101-20301231",
                                          "--query", "SeriesDescription=*mprage*", "--progress"])
        assert result.exit_code == 0, result.output
        assert f"{N_STUDIES} series fetched" in result.output
        assert node.wait_idle(120)
        elapsed = time.monotonic() - started
        jobs = node.store.jobs()
        assert {j.series_uid for j in jobs} == mprage  # exactly the MPRAGE series, each once
        assert all(j.state is JobState.DELIVERED for j in jobs), [(j.id, j.state, j.reason) for j in jobs]
        assert wait_until(lambda: results_for(orthanc, studies) == {s.study_uid: 1 for s in studies}, 30, 0.2,
                          "one result series per study in the archive")
        print(f"\nretro pass: {N_STUDIES} studies fetched, processed and delivered in {elapsed:.1f} s "
              f"= {N_STUDIES * 3600 / elapsed:.0f} studies/hour")

        again = CliRunner().invoke(cli, ["retro", "run", "--config", str(config_file), "--source", "archive",
                                         "--query", "Modality=MR"])
        assert again.exit_code == 0, again.output
        assert "0 series fetched" in again.output
        assert node.wait_idle(30)
        assert len(node.store.jobs()) == N_STUDIES
    progress = ProgressStore.open(cfg.node.storage_dir)
    assert {s.series_uid for s in progress.all_series((SeriesState.RETRIEVED,))} == mprage
    assert [r.state for r in progress.runs()] == [RunState.FINISHED] * 3


def test_verbose_passes_log_no_patient_identifiers(tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]],
                                                    node_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom logs every C-FIND identifier at INFO by default (PatientID, PatientName): not ours."""
    orthanc, studies = archive
    cfg = make_config(tmp_path, orthanc, node_port)
    config_file = config_toml(cfg, tmp_path / "synthmrf.toml")
    caplog.set_level(logging.DEBUG)
    result = CliRunner().invoke(cli, ["-v", "retro", "run", "--config", str(config_file), "--source", "archive",
                                      "--query", "Modality=MR", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert all(s.mprage_series_uid in result.output for s in studies)  # it found them: the answers were read
    said = result.output + caplog.text
    assert not [s.patient_id for s in studies if s.patient_id in said]
    assert "SECRET^" not in said

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="pynetdicom")  # whatever the level, the identifiers stay out
    progress = ProgressStore.open(cfg.node.storage_dir)
    report = PassRunner(cfg, progress, NodeView(cfg, node_port)).run(PassSpec("archive", QUERY, dry_run=True))
    progress.close()
    assert len(report.planned) == N_STUDIES and "Find SCP Response" in caplog.text
    assert not [s.patient_id for s in studies if s.patient_id in caplog.text] and "SECRET^" not in caplog.text


def instances(node: Node, outcome: str) -> float:
    return node.metrics.registry.get_sample_value("synthmrf_instances_total", {"outcome": outcome}) or 0.0


class InterruptAfter:
    """Pass events that raise KeyboardInterrupt once the n-th series has reported ``after`` sub-operations."""

    def __init__(self, nth: int, after: int) -> None:
        self.nth, self.after = nth, after
        self.started: list[str] = []
        self.interrupted: str | None = None

    def studies_found(self, n: int) -> None:
        pass

    def study_done(self) -> None:
        pass

    def series_started(self, item: PlannedSeries) -> None:
        self.started.append(item.series_uid)

    def series_progress(self, item: PlannedSeries, done: int, total: int | None) -> None:
        if len(self.started) == self.nth and done >= self.after and self.interrupted is None:
            self.interrupted = item.series_uid
            raise KeyboardInterrupt

    def series_done(self, item: PlannedSeries, ok: bool) -> None:
        pass


def test_interrupted_pass_resumes_without_duplicates(tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]],
                                                     node_port: int, phantom_mprage: list[Path]) -> None:
    """Ctrl-C in the middle of a series; the scheduler started with the node finishes that series at once,
    fetching only its missing instances; the next pass fetches the rest; every series is processed once."""
    orthanc, studies = archive
    cfg = make_config(tmp_path, orthanc, node_port)
    mprage = {s.mprage_series_uid for s in studies}
    expected = len(phantom_mprage)
    with Node(cfg, processor=fast_processor) as node:
        progress = ProgressStore.open(cfg.node.storage_dir)
        view = NodeView(cfg, node.port)
        events = InterruptAfter(nth=2, after=10)
        with pytest.raises(KeyboardInterrupt):
            PassRunner(cfg, progress, view).run(PassSpec("archive", QUERY), events)
        cut = events.interrupted
        assert cut is not None
        record = progress.series(cut)
        assert record is not None and record.state is SeriesState.RETRIEVING
        held_before = view.held_instances(cut)
        assert 0 < len(held_before) < expected, "the interruption should leave the series partly fetched"
        assert [r.state for r in progress.runs()] == [RunState.INTERRUPTED]
        wait_until(lambda: cut in node.assembler.not_complete(), 30, 0.1,  # quiet, but incomplete: held for the resume
                   "the node to hold the partly retrieved series")
        assert [j.series_uid for j in node.store.jobs()] == [events.started[0]]

        scheduler = start_scheduler(cfg, node)  # what 'synthmrf serve' does after the node started
        try:
            wait_until(lambda: progress.series(cut).state is SeriesState.RETRIEVED, 30, 0.1,  # type: ignore[union-attr]
                       "the scheduler to resume the interrupted series")
        finally:
            scheduler.stop()
        resumed = progress.runs()[0]
        assert (resumed.kind, resumed.state, resumed.series_fetched) == ("resume", RunState.FINISHED, 1)
        assert resumed.instances <= expected - len(held_before)  # only the missing ones were asked for

        report = PassRunner(cfg, progress, view).run(PassSpec("archive", QUERY))
        assert report.state is RunState.FINISHED, report.summary()
        assert set(report.fetched) == mprage - {events.started[0], cut}
        assert len(view.held_instances(cut)) == expected
        assert node.wait_idle(120)
        # nothing came twice: the node's storage SCP saw no duplicate, and each series was processed once, whole
        assert instances(node, "duplicate") == 0
        assert instances(node, "stored") == expected * N_STUDIES
        jobs = node.store.jobs()
        assert sorted(j.series_uid for j in jobs) == sorted(mprage)
        assert all(j.instances == expected for j in jobs), [(j.id, j.instances) for j in jobs]
        view.close()
        progress.close()


class StopNodeAfter(InterruptAfter):
    """Stops the node (no drain: like a crash) in the middle of the first series."""

    def __init__(self, node: Node, after: int) -> None:
        super().__init__(nth=1, after=after)
        self.node = node

    def series_progress(self, item: PlannedSeries, done: int, total: int | None) -> None:
        if done >= self.after and self.interrupted is None:
            self.interrupted = item.series_uid
            self.node.stop(drain=False)


def test_node_stopped_mid_retrieve_then_the_next_pass_completes_the_series(
        tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]], node_port: int,
        phantom_mprage: list[Path]) -> None:
    orthanc, studies = archive
    cfg = make_config(tmp_path, orthanc, node_port, retry_after_s=0)
    expected = len(phantom_mprage)
    one = {"PatientID": studies[0].patient_id}
    progress = ProgressStore.open(cfg.node.storage_dir)
    node = Node(cfg, processor=fast_processor).start()
    events = StopNodeAfter(node, after=10)
    report = PassRunner(cfg, progress, NodeView(cfg, node_port)).run(PassSpec("archive", one), events)
    node.stop()
    assert report.state is RunState.FINISHED and report.failed, report.summary()  # the archive reported failures
    record = progress.series(studies[0].mprage_series_uid)
    assert record is not None and record.state is SeriesState.FAILED, record

    with Node(cfg, processor=fast_processor) as node:
        view = NodeView(cfg, node.port)
        held = len(view.held_instances(studies[0].mprage_series_uid))
        assert 0 < held < expected
        again = PassRunner(cfg, progress, view).run(PassSpec("archive", one))
        assert again.fetched == [studies[0].mprage_series_uid] and again.instances == expected - held
        assert node.wait_idle(60)
        assert instances(node, "duplicate") == 0
        [job] = node.store.jobs()
        assert job.instances == expected and job.state is JobState.DELIVERED
        view.close()
    progress.close()


def test_c_get_source_forwards_to_the_node(tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]],
                                           node_port: int, phantom_mprage: list[Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    orthanc, studies = archive
    system_tmp = tmp_path / "system-tmp"  # where pynetdicom puts the data set of each C-GET sub-operation
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    cfg = make_config(tmp_path, orthanc, node_port).model_copy(update={"sources": [orthanc.source(retrieve="get")]})
    with Node(cfg, processor=fast_processor) as node:
        progress = ProgressStore.open(cfg.node.storage_dir)
        view = NodeView(cfg, node.port)
        report = PassRunner(cfg, progress, view).run(PassSpec("archive", {"PatientID": studies[1].patient_id}))
        assert report.fetched == [studies[1].mprage_series_uid], report.summary()
        assert report.instances == len(phantom_mprage)
        assert node.wait_idle(60)
        [job] = node.store.jobs()
        assert job.state is JobState.DELIVERED and job.instances == len(phantom_mprage)
        assert not (Path(cfg.node.storage_dir) / "retro" / "get" / str(report.run_id)).exists()  # scratch removed
        assert sorted(p.name for p in system_tmp.iterdir()) == []  # no temporary file left behind
        view.close()
        progress.close()


def test_a_stop_cancels_the_series_in_flight_and_it_resumes(
        tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]], node_port: int,
        phantom_mprage: list[Path]) -> None:
    orthanc, studies = archive
    cfg = make_config(tmp_path, orthanc, node_port)
    one = {"PatientID": studies[2].patient_id}
    uid = studies[2].mprage_series_uid
    with Node(cfg, processor=fast_processor) as node:
        progress = ProgressStore.open(cfg.node.storage_dir)
        view = NodeView(cfg, node.port)
        cancel = threading.Event()
        cancel.set()  # as RetroScheduler.stop does when its timeout has passed
        report = PassRunner(cfg, progress, view, cancel=cancel).run(PassSpec("archive", one))
        assert report.state is RunState.INTERRUPTED and "cancelled mid-series" in report.message
        assert [s.series_uid for s in progress.interrupted()] == [uid]
        again = PassRunner(cfg, progress, view).run(PassSpec("archive", one))
        assert again.fetched == [uid] and again.state is RunState.FINISHED
        assert node.wait_idle(60)
        assert instances(node, "duplicate") == 0 and instances(node, "stored") == len(phantom_mprage)
        view.close()
        progress.close()


def test_cap_rate_limit_and_window(tmp_path: Path, archive: tuple[ArchiveOrthanc, list[ArchiveStudy]],
                                   node_port: int) -> None:
    orthanc, _ = archive
    cfg = make_config(tmp_path, orthanc, node_port, max_studies_per_run=2, max_studies_per_hour=3600.0)
    now = datetime.datetime.now()
    closed = f"{now + datetime.timedelta(hours=2):%H:%M}-{now + datetime.timedelta(hours=3):%H:%M}"
    with Node(cfg, processor=fast_processor) as node:
        progress = ProgressStore.open(cfg.node.storage_dir)
        view = NodeView(cfg, node.port)
        skipped = PassRunner(cfg, progress, view).run(PassSpec("archive", QUERY, window=closed))
        assert skipped.state is RunState.SKIPPED and f"outside the run window {closed}" in skipped.message
        report = PassRunner(cfg, progress, view).run(PassSpec("archive", QUERY))
        assert len(report.fetched) == 2 and "cap of 2 studies per run reached" in report.message
        assert [s.state for s in progress.all_series()] == [SeriesState.RETRIEVED] * 2
        times = sorted(s.created_at for s in progress.all_series())  # claims: one study a second at 3600/hour
        assert times[1] - times[0] >= 0.95, times
        assert node.wait_idle(60)
        view.close()
        progress.close()
