"""``synthmrf serve`` as a subprocess: kill -9 in the middle of a series; kill -9 of its worker process and of
the node itself in the middle of a job; SIGTERM while a job runs; every acknowledged instance is processed and
the result delivered once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from node_support import (
    PROCESSOR_DELAYING_IN,
    TOOL_ENV,
    ResultSink,
    Series,
    Serve,
    free_port,
    make_series,
    run_tool,
    wait_until,
)
from pynetdicom import AE

from dicom_node.node.job_store import Job, JobState, JobStore


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return make_series(tmp_path_factory.mktemp("mprage"), n=40, patient_id="KILL001", seed=9)


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    s = ResultSink(port=free_port()).start()
    yield s
    s.stop()


@pytest.fixture
def serves() -> Iterator[list[Serve]]:
    """The serve processes a test starts; whatever still runs at its end (a failed test) is killed."""
    made: list[Serve] = []
    yield made
    for serve in made:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait(10)


def worker_processes(node: Serve) -> list[psutil.Process]:
    """The node's worker processes (not multiprocessing's resource tracker)."""
    return [c for c in psutil.Process(node.proc.pid).children() if "resource_tracker" not in " ".join(c.cmdline())]


def jobs_of(storage: Path) -> list[Job]:
    path = storage / "jobs.sqlite"
    if not path.exists():
        return []
    store = JobStore.sqlite(path)
    try:
        return store.jobs()
    finally:
        store.close()


@pytest.mark.slow
def test_kill_9_and_sigterm_then_results_exactly_once(tmp_path: Path, series: Series, sink: ResultSink,
                                                     serves: list[Serve]) -> None:
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
stop_timeout_s = 45
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
    serves.append(node)
    ae = AE("MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHMRF")
    assert assoc.is_established
    assert [int(assoc.send_c_store(f).Status) for f in series.files[:25]] == [0] * 25
    node.kill9()
    assoc.abort()

    # 2. restart; the sender sends the whole series again; kill -9 of the worker process while the job runs:
    #    the node hands the job back at once and starts a new worker, which runs it again (a job that swallows
    #    the first interrupt, as a library catching BaseException would)
    node = Serve(config, log, port, NODE_TEST_PROCESSOR_DELAY_S="60", NODE_TEST_PROCESSOR_SWALLOW_STOP="1")
    serves.append(node)
    r = run_tool(["storescu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(port),
                  *map(str, series.files)])
    assert r.returncode == 0, r.stderr
    [first] = wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.PROCESSING], 30,
                         what="the job to be processing")
    [worker] = worker_processes(node)
    worker.kill()
    [again] = wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.PROCESSING
                                  and j.run_token != first.run_token], 60, what="the job to run again")
    assert again.interruptions == 1
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE
    [replacement] = worker_processes(node)
    # the job's second run is inside the processor (where it swallows an interrupt), not still being set up
    wait_until(lambda: f"{PROCESSOR_DELAYING_IN} {replacement.pid}" in log.read_text(), 60,
               what="the second run to reach the processor")

    # 3. SIGTERM while the job runs (the worker also gets the parent-death signal of the thread that started it):
    #    the worker interrupts the job again when the first interrupt is swallowed, hands it back, and the node
    #    exits in seconds, not after the job's 60 s nor the 45 s after which it kills its workers
    start = time.monotonic()
    assert node.terminate(60) == 0
    stopped_in = time.monotonic() - start
    text = log.read_text()
    assert stopped_in < 20 and "did not stop in" not in text, (stopped_in, text[-4000:])
    assert "interrupting it again" in text
    assert not psutil.pid_exists(replacement.pid)
    [job] = jobs_of(storage)
    assert (job.state, job.attempts, job.interruptions) == (JobState.QUEUED, 0, 1)  # handed back, not counted

    # 3b. kill -9 of the node while its worker runs the job: the orphaned worker hands the job back and exits
    node = Serve(config, log, port, NODE_TEST_PROCESSOR_DELAY_S="60")
    serves.append(node)
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.PROCESSING], 30,
               what="the job to be processing again")
    [orphan] = worker_processes(node)
    node.kill9()
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.QUEUED], 20,
               what="the orphaned worker to hand the job back")
    psutil.wait_procs([orphan], timeout=20)
    assert not psutil.pid_exists(orphan.pid)

    # 4. restart: whatever was left is delivered; exactly one result, made from all 40 instances
    node = Serve(config, log, port)
    serves.append(node)
    wait_until(lambda: [j for j in jobs_of(storage) if j.state is JobState.DELIVERED], 30, what="delivery")
    assert node.terminate(60) == 0
    [job] = jobs_of(storage)
    assert (job.version, job.instances, job.attempts, job.interruptions) == (1, 40, 1, 1)  # the killed run is
    # an interruption, the stopped ones are nothing
    assert len(sink.received) == 1, sink.received
    [result] = sink.results()
    assert result.comments == "from 40 frames of 40 instances"
    assert (result.study_uid, result.patient_id, result.referenced_series) == (series.study_uid, series.patient_id,
                                                                              series.series_uid)
    assert "Traceback" not in log.read_text()
    assert TOOL_ENV["TCP_NODELAY"] == "1"
