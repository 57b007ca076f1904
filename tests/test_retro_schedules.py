"""Schedules: added with the CLI, fired by the scheduler running beside a node, persistent across a restart;
unreachable and refusing archives give clear errors and a retry, never a crash."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from node_support import fast_processor, free_port, make_series, wait_until
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from retro_support import NODE_AET, ArchiveOrthanc, config_toml, retro_config

from dicom_node.cli import cli
from dicom_node.config import NodeConfig
from dicom_node.node import Node
from dicom_node.retro.config import SourceConfig
from dicom_node.retro.progress import ProgressStore, Run, RunState
from dicom_node.retro.schedules import (
    ScheduleSpec,
    add_schedule,
    list_schedules,
    schedule_summary,
    start_scheduler,
)


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[tuple[ArchiveOrthanc, list[str]]]:
    """Two small synthetic MPRAGE studies (patients SCHED000, SCHED001)."""
    folder = tmp_path_factory.mktemp("schedule-archive")
    orthanc = ArchiveOrthanc(folder, {NODE_AET: ("127.0.0.1", node_port)}).start()
    try:
        uids = []
        for k in range(2):
            series = make_series(folder / f"s{k}", n=12, size=32, patient_id=f"SCHED{k:03d}", seed=k)
            orthanc.upload(series.files)
            uids.append(series.series_uid)
        yield orthanc, uids
    finally:
        orthanc.stop()


def runs_of(cfg: NodeConfig, schedule: str) -> list[Run]:
    store = ProgressStore.open(cfg.node.storage_dir)
    try:
        return list(reversed(store.runs(schedule=schedule)))
    finally:
        store.close()


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, ["retro", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_schedule_added_with_the_cli_fires_and_survives_a_restart(
        tmp_path: Path, archive: tuple[ArchiveOrthanc, list[str]], node_port: int) -> None:
    orthanc, uids = archive
    cfg = retro_config(tmp_path / "node", node_port=node_port, sources=[orthanc.source()],
                       retro={"scheduler_poll_s": 0.2}, series={"quiet_seconds": 1.0, "settle_seconds": 0.1})
    conf = str(config_toml(cfg, tmp_path / "synthmrf.toml"))
    with Node(cfg, processor=fast_processor) as node:
        scheduler = start_scheduler(cfg, node)
        try:
            out = invoke("add", "every2s", "--config", conf, "--source", "archive", "--cron", "*/2 * * * * *",
                         "--query", "PatientID=SCHED000", "--max-studies", "5")
            assert "schedule 'every2s' added" in out
            fired = wait_until(lambda: [r for r in runs_of(cfg, "every2s") if r.state is RunState.FINISHED], 20, 0.1,
                               "the schedule added on the command line to fire")
            assert fired[0].series_fetched == 1
            assert node.wait_idle(30)
            assert [j.series_uid for j in node.store.jobs()] == [uids[0]]
        finally:
            scheduler.stop()
        [info] = list_schedules(cfg)
        assert info.spec == ScheduleSpec(name="every2s", source="archive", cron="*/2 * * * * *",
                                         query={"PatientID": "SCHED000"}, max_studies=5)
        before = len(runs_of(cfg, "every2s"))

        scheduler = start_scheduler(cfg, node)  # a restart: a new scheduler reading the persistent store
        try:
            after = wait_until(lambda: runs_of(cfg, "every2s")[before:], 20, 0.1, "a firing after the restart")
            assert after[0].series_fetched == 0  # already retrieved: nothing twice
            summary = schedule_summary(cfg)
            assert summary[0]["name"] == "every2s" and summary[0]["paused"] is False
            assert summary[0]["last_run"]["state"] in ("finished", "running")

            invoke("pause", "every2s", "--config", conf)
            listed = json.loads(invoke("list", "--config", conf, "--json"))
            assert listed[0]["paused"] is True and listed[0]["next_run"] is None
            assert "next run" in invoke("resume", "every2s", "--config", conf)
            assert json.loads(invoke("list", "--config", conf, "--json"))[0]["paused"] is False
            text = invoke("list", "--config", conf)
            assert "every2s" in text and "last run" in text
            invoke("remove", "every2s", "--config", conf)
            assert invoke("list", "--config", conf).strip() == "no schedules"
        finally:
            scheduler.stop()
        assert len(node.store.jobs()) == 1


@pytest.fixture
def refusing_archive() -> Iterator[int]:
    """A Query/Retrieve SCP that rejects every association (it only accepts the calling AE NOT_US)."""
    ae = AE("REFUSER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.require_calling_aet = ["NOT_US"]
    server = ae.start_server(("127.0.0.1", 0), block=False)
    assert server is not None
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_unreachable_and_refusing_archives_give_clear_errors_and_a_retry(tmp_path: Path,
                                                                         refusing_archive: int) -> None:
    sources = [
        SourceConfig(name="dead", ae_title="NOBODY", host="127.0.0.1", port=free_port(), retrieve="get",
                     connect_timeout_s=2),
        SourceConfig(name="refusing", ae_title="REFUSER", host="127.0.0.1", port=refusing_archive, retrieve="get",
                     connect_timeout_s=2),
        SourceConfig(name="moving", ae_title="REFUSER", host="127.0.0.1", port=refusing_archive, retrieve="move"),
    ]
    cfg = retro_config(tmp_path / "node", node_port=free_port(), sources=sources,
                       retro={"scheduler_poll_s": 0.2, "archive_retry_s": 0.3})
    conf = str(config_toml(cfg, tmp_path / "synthmrf.toml"))
    expected = {"dead": "cannot connect (Connection refused)", "refusing": "association rejected",
                "moving": "does not answer"}  # C-MOVE needs the node, which is not running
    for name, message in expected.items():
        result = CliRunner().invoke(cli, ["retro", "run", "--config", conf, "--source", name, "-q", "Modality=MR"])
        assert result.exit_code == 1, result.output
        assert message in result.output and "try again" in result.output, result.output
        assert "Traceback" not in result.output
    store = ProgressStore.open(cfg.node.storage_dir)
    assert [r.state for r in store.runs()] == [RunState.FAILED] * 3
    store.close()

    add_schedule(cfg, ScheduleSpec(name="nightly", source="dead", cron="0 3 * * *"))
    scheduler = start_scheduler(cfg)
    try:
        report = scheduler.run_schedule(list_schedules(cfg)[0].spec)
        assert report is not None and report.state is RunState.FAILED and report.retry_later
        failed = wait_until(lambda: [r for r in runs_of(cfg, "nightly") if r.state is RunState.FAILED][2:], 20, 0.05,
                            "two retries of the failed pass")
        assert "cannot connect" in failed[0].message
        assert all(r.state in (RunState.FAILED, RunState.RUNNING) for r in runs_of(cfg, "nightly"))
        assert scheduler.scheduler.running
        assert list_schedules(cfg)[0].next_run is not None  # the schedule itself is untouched
    finally:
        scheduler.stop()


def test_a_schedule_another_node_is_running_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Several nodes of one installation fire the same stored schedules: the job store's lock lets one run."""
    from dicom_node.node.job_store import JobStore
    from dicom_node.retro.schedules import RetroScheduler, ScheduleSpec, job_store_lock

    source = SourceConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=free_port())
    cfg = retro_config(tmp_path / "node", node_port=free_port(), sources=[source])
    store = JobStore.sqlite(tmp_path / "jobs.sqlite")
    try:
        assert store.try_lock("retro:nightly", "node@a", 60)  # node A runs the pass
        spec = ScheduleSpec(name="nightly", source="pacs", cron="0 2 * * *")
        with caplog.at_level("INFO", logger="dicom_node"):
            assert RetroScheduler(cfg, None, job_store_lock(store, "node@b")).run_schedule(spec) is None
        assert "schedule nightly: another node is running it; skipped here" in caplog.text
        assert not store.try_lock("retro:nightly", "node@b", 60)  # B did not take or drop A's lock
    finally:
        store.close()
