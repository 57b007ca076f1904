"""``synthmrf serve`` as a subprocess: kill -9 in the middle of a series and in the middle of a job,
SIGTERM while a job runs; every acknowledged instance is processed and the result delivered once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import TOOL_ENV, ResultSink, Series, free_port, make_series, run_tool, wait_until
from pynetdicom import AE

from dicom_node.dicom_client import AssociationError, Peer, echo
from dicom_node.job_store import Job, JobState, JobStore

TESTS = Path(__file__).resolve().parent
SYNTHMRF = Path(sys.executable).with_name("synthmrf")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return make_series(tmp_path_factory.mktemp("mprage"), n=40, patient_id="KILL001", seed=9)


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    s = ResultSink(port=free_port()).start()
    yield s
    s.stop()


class Serve:
    """One ``synthmrf serve`` process with its log file."""

    def __init__(self, config: Path, log: Path, port: int, **env: str) -> None:
        self.port = port
        self.log = log
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                   **env}
        self.proc = subprocess.Popen([str(SYNTHMRF), "serve", "--config", str(config)], env=environ,
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_until(self._answers, 60, 0.1, f"synthmrf serve to answer C-ECHO (log: {log})")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"synthmrf serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return echo(Peer("SYNTHMRF", "127.0.0.1", self.port), "PROBE", timeout_s=2.0) == 0
        except (AssociationError, OSError):
            return False

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout_s: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


def jobs_of(storage: Path) -> list[Job]:
    path = storage / "jobs.sqlite"
    if not path.exists():
        return []
    store = JobStore(path)
    try:
        return store.jobs()
    finally:
        store.close()


@pytest.mark.slow
def test_kill_9_and_sigterm_then_results_exactly_once(tmp_path: Path, series: Series, sink: ResultSink) -> None:
    port = free_port()
    storage = tmp_path / "var"
    config = tmp_path / "synthmrf.toml"
    config.write_text(f"""
[node]
host = "127.0.0.1"
port = {port}
storage_dir = "{storage}"
min_free_mb = 0
drain_timeout_s = 30
[series]
quiet_seconds = 2.0
settle_seconds = 0.2
[jobs]
poll_interval_s = 0.1
[pipeline]
processor = "node_support:fast_processor"
[dispatch]
backoff_initial_s = 0.2
[[destinations]]
name = "sink"
ae_title = "SINK"
host = "127.0.0.1"
port = {sink.port}
""")
    log = tmp_path / "serve.log"

    # 1. kill -9 in the middle of an association: 25 of 40 instances acknowledged
    node = Serve(config, log, port)
    ae = AE("MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHMRF")
    assert assoc.is_established
    assert [int(assoc.send_c_store(f).Status) for f in series.files[:25]] == [0] * 25
    node.kill9()
    assoc.abort()

    # 2. restart; the sender sends the whole series again; kill -9 while the job runs
    node = Serve(config, log, port, NODE_TEST_PROCESSOR_DELAY_S="60")
    r = run_tool(["storescu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(port),
                  *map(str, series.files)])
    assert r.returncode == 0, r.stderr
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.PROCESSING], 30,
               what="the job to be processing")
    node.kill9()

    # 3. restart; SIGTERM while the (re-queued) job runs: the job finishes, the node exits cleanly
    node = Serve(config, log, port, NODE_TEST_PROCESSOR_DELAY_S="3")
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.PROCESSING], 30,
               what="the recovered job to be processing")
    assert node.terminate(60) == 0
    [job] = jobs_of(storage)
    assert job.state in (JobState.PROCESSED, JobState.DELIVERED) and job.attempts == 1  # the killed run not counted
    with sqlite3.connect(storage / "jobs.sqlite") as db:
        assert db.execute("SELECT interruptions FROM jobs WHERE id = ?", (job.id,)).fetchone() == (1,)

    # 4. restart: whatever was left is delivered; exactly one result, made from all 40 instances
    node = Serve(config, log, port)
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.DELIVERED], 30, what="delivery")
    assert node.terminate(60) == 0
    [job] = jobs_of(storage)
    assert (job.version, job.instances, job.attempts) == (1, 40, 1)  # one counted run (the killed one is not)
    assert len(sink.received) == 1, sink.received
    [result] = sink.results()
    assert result.comments == "from 40 frames of 40 instances"
    assert (result.study_uid, result.patient_id, result.referenced_series) == (series.study_uid, series.patient_id,
                                                                              series.series_uid)
    assert "Traceback" not in log.read_text()
    assert TOOL_ENV["TCP_NODELAY"] == "1"
