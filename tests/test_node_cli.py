"""The node's commands against a node running in-process: echo, send, jobs list/show/retry, status;
dead-lettered deliveries and failed jobs brought back with 'synthmrf jobs retry'."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from node_support import ResultSink, Series, fast_processor, free_port, make_series, wait_until

from dicom_node.commands.echo import echo
from dicom_node.commands.jobs import jobs
from dicom_node.commands.send import send
from dicom_node.commands.status import status
from dicom_node.config import load_config
from dicom_node.node import Node
from dicom_node.node.job_store import DeliveryState, JobState
from dicom_node.workers.processor import ProcessResult


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return make_series(tmp_path_factory.mktemp("mprage"), n=40, patient_id="CLI001", seed=7)


def write_config(folder: Path, sink_port: int, **extra: str) -> Path:
    """A TOML file as an operator would write it (the node's port fixed so the commands can reach it)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[node]", 'host = "127.0.0.1"', f"port = {free_port()}", f'storage_dir = "{folder / "var"}"',
        "min_free_mb = 0",
        "[series]", "quiet_seconds = 1.5", "settle_seconds = 0.2",
        "[jobs]", "poll_interval_s = 0.1", "retry_delay_s = 0.2", extra.get("jobs", ""),
        "[pipeline]", 'processor = "node_support:fast_processor"',
        "[dispatch]", "backoff_initial_s = 0.1", "backoff_max_s = 0.2", "connect_timeout_s = 2",
        extra.get("dispatch", ""),
        "[[destinations]]", 'name = "sink"', 'ae_title = "SINK"', 'host = "127.0.0.1"', f"port = {sink_port}",
    ]
    path = folder / "synthmrf.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def invoke(command: Any, *args: str) -> Result:
    return CliRunner().invoke(command, list(args), catch_exceptions=False)


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    s = ResultSink(port=free_port())
    yield s
    s.stop()


def test_echo_send_jobs_and_status(tmp_path: Path, series: Series, sink: ResultSink) -> None:
    sink.start()
    config = write_config(tmp_path, sink.port)
    with Node(load_config(config, environ={}), processor=fast_processor) as node:
        r = invoke(echo, "--config", str(config), "--host", "127.0.0.1", "--port", str(node.port), "--aet", "SYNTHMRF")
        assert r.exit_code == 0 and "C-ECHO to SYNTHMRF@127.0.0.1" in r.output and "success" in r.output
        r = invoke(echo, "--config", str(config), "sink")
        assert r.exit_code == 0, r.output
        r = invoke(echo, "--host", "127.0.0.1", "--port", str(free_port()))
        assert r.exit_code == 1 and "association with ANY-SCP@127.0.0.1" in r.output
        r = invoke(echo, "--config", str(config), "nosuch")
        assert r.exit_code == 1 and "destination 'nosuch': not configured" in r.output
        (series.folder / "README.txt").write_text("not DICOM")
        r = invoke(send, "--config", str(config), "--host", "127.0.0.1", "--port", str(node.port), "--aet", "SYNTHMRF",
                   str(series.folder))
        assert r.exit_code == 0, r.output
        assert "40 stored, 0 failed, 1 skipped" in r.output
        wait_until(sink.results, 30, what="the result")
        wait_until(node.idle, 10, what="the node to be idle")
        job_id = f"{series.series_uid}-v1"
        r = invoke(jobs, "list", "--config", str(config))
        assert r.exit_code == 0 and job_id in r.output and "delivered" in r.output and "sink:sent" in r.output
        r = invoke(jobs, "show", "--config", str(config), series.series_uid)
        assert r.exit_code == 0, r.output
        assert f"job        {job_id}" in r.output and f"study      {series.study_uid}" in r.output
        assert "delivery   sink: sent, 1 attempt(s)" in r.output
        r = invoke(jobs, "retry", "--config", str(config), job_id)
        assert r.exit_code == 1 and "is delivered with nothing to retry" in r.output
        r = invoke(status, "--config", str(config), "--json", "--echo")
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["node"].startswith("answering C-ECHO")
        assert sorted(m["kind"] for m in report["members"]) == ["node", "worker"]
        assert all(m["heartbeat_age_s"] < 60 and not m["silent"] for m in report["members"])
        assert report["jobs"] == {"delivered": 1} and report["queue_depth"] == 0 and report["failures"] == []
        assert report["recent"][0]["id"] == job_id
        r = invoke(status, "--config", str(config))
        assert r.exit_code == 0 and "jobs         delivered 1" in r.output


def test_dead_letter_and_retry(tmp_path: Path, series: Series, sink: ResultSink) -> None:
    config = write_config(tmp_path, sink.port, dispatch="max_attempts = 2")  # the sink is not started yet
    with Node(load_config(config, environ={}), processor=fast_processor) as node:
        r = invoke(send, "--config", str(config), "--host", "127.0.0.1", "--port", str(node.port), "--aet", "SYNTHMRF",
                   *map(str, series.files))
        assert r.exit_code == 0, r.output

        def dead() -> bool:
            found = node.store.jobs()
            return bool(found and found[0].deliveries and found[0].deliveries[0].state is DeliveryState.DEAD)

        wait_until(dead, 30, what="the dead letter")
        r = invoke(jobs, "list", "--config", str(config))
        assert "sink:dead" in r.output
        r = invoke(status, "--config", str(config))
        assert "FAILURE" in r.output and "dead delivery" in r.output
        sink.start()
        r = invoke(jobs, "retry", "--config", str(config), series.series_uid)
        assert r.exit_code == 0 and "delivery to sink pending" in r.output
        wait_until(sink.results, 30, what="the result after the retry")
        wait_until(node.idle, 10, what="the node to be idle")
        [job] = node.store.jobs()
        assert job.state is JobState.DELIVERED and job.deliveries[0].attempts == 1
    r = invoke(status, "--config", str(config), "--echo")  # the node has stopped
    assert r.exit_code == 0 and "not answering on 127.0.0.1" in r.output
    assert "node         none running" in r.output and "worker       none running" in r.output


def test_failed_processing_is_retried_then_given_up_then_queued_again(tmp_path: Path, series: Series,
                                                                     sink: ResultSink,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    sink.start()
    config = write_config(tmp_path, sink.port, jobs="max_attempts = 2")
    runs: list[Path] = []

    def flaky(input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult:
        runs.append(input_dir)
        if len(runs) <= 2:
            raise RuntimeError(f"simulated failure {len(runs)} of patient SECRET^NAME")
        return fast_processor(input_dir, out_dir, model=model)

    caplog.set_level(logging.INFO)
    with Node(load_config(config, environ={}), processor=flaky) as node:
        r = invoke(send, "--config", str(config), "--host", "127.0.0.1", "--port", str(node.port), "--aet", "SYNTHMRF",
                   *map(str, series.files))
        assert r.exit_code == 0, r.output
        [job] = wait_until(lambda: node.store.jobs([JobState.FAILED]), 30, what="the failed job")
        # the job and the log above DEBUG carry the exception's type, never its text (it may quote header values)
        assert job.attempts == 2 and job.reason == "processing error RuntimeError (details: worker log at DEBUG)"
        assert "RuntimeError" in caplog.text and "SECRET" not in caplog.text
        r = invoke(jobs, "retry", "--config", str(config), job.id)
        assert r.exit_code == 0 and "processing queued" in r.output
        wait_until(sink.results, 30, what="the result after the retry")
        assert len(runs) == 3


def test_the_command_line_starts_without_torch() -> None:
    """``synthmrf --help`` and every command's import stay light: torch, SimpleITK and the pipeline load only in
    the commands (and worker processes) that use them."""
    code = ("import sys, dicom_node.cli as c\n"
            "[c.cli.get_command(None, n) for n in c.COMMANDS]\n"
            "heavy = sorted(m for m in ('torch', 'SimpleITK', 'pynetdicom', 'apscheduler') if m in sys.modules)\n"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""
