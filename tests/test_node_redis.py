"""The Redis queue backend against a real redis-server: a series processed and delivered once, two nodes with one
AE title sharing a server without touching each other's tasks, a restart that loses no queued job, and
'synthmrf status' reporting the Redis queue depth (or why it cannot)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import redis
from click.testing import CliRunner
from node_support import (
    RedisServer,
    ResultSink,
    Series,
    fast_processor,
    make_series,
    redis_server,
    result_sink,
    wait_until,
)

from dicom_node.commands.status import status
from dicom_node.config import NodeConfig, load_config
from dicom_node.dicom_client import Peer, store_files
from dicom_node.job_store import Job, JobState, JobStore
from dicom_node.jobs import JobQueue, JobWorkers, make_huey, queue_name
from dicom_node.node import STATE_FILE, Node
from dicom_node.processor import ProcessResult


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as s:
        yield s


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    with result_sink() as s:
        yield s


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for n in started:
        n.stop(drain=False)


def write_config(folder: Path, server: RedisServer, sink: ResultSink) -> Path:
    """A TOML file for a node with the Redis backend (a file, so 'synthmrf status' can read it too)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthmrf.toml"
    path.write_text("\n".join([
        "[node]", 'host = "127.0.0.1"', "port = 0", f'storage_dir = "{folder / "var"}"', "min_free_mb = 0",
        "[series]", "quiet_seconds = 1.5", "settle_seconds = 0.2",
        "[jobs]", 'backend = "redis"', f'redis_url = "{server.url}"', "poll_interval_s = 0.1",
        "[pipeline]", 'processor = "node_support:fast_processor"',
        "[dispatch]", "backoff_initial_s = 0.1", "backoff_max_s = 0.2", "connect_timeout_s = 2",
        "[[destinations]]", 'name = "sink"', f'ae_title = "{sink.ae_title}"', 'host = "127.0.0.1"',
        f"port = {sink.port}",
    ]) + "\n")
    return path


class GatedProcessor:
    """The fast test processor, recording the series it gets; its first run waits until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.series: list[str] = []

    def __call__(self, input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult:
        first = min(input_dir.iterdir())
        self.series.append(str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID))
        if len(self.series) == 1:
            assert self.gate.wait(30), "the test never opened the gate"
        return fast_processor(input_dir, out_dir, model=model)


def send(node: Node, series: Series) -> None:
    report = store_files(series.files, Peer(node.config.node.ae_title, "127.0.0.1", node.port), "MODALITY")
    assert report.ok and len(report.stored) == len(series.files)


def job_id(series: Series) -> str:
    return f"{series.series_uid}-v1"


def held(cfg: NodeConfig) -> set[str]:
    """The job ids the node's Redis queue holds (read as 'synthmrf jobs retry' would write it)."""
    return JobQueue(make_huey(cfg)).held()


def jobs_in(cfg: NodeConfig, *states: JobState) -> list[Job]:
    store = JobStore(cfg.node.storage_dir / STATE_FILE)
    try:
        return store.jobs(list(states))
    finally:
        store.close()


def series_of(tmp_path: Path, name: str, seed: int) -> Series:
    return make_series(tmp_path / name, n=5, size=32, patient_id=name.upper(), seed=seed)


def test_a_series_is_processed_once_and_delivered(tmp_path: Path, server: RedisServer, sink: ResultSink,
                                                  nodes: list[Node]) -> None:
    config = write_config(tmp_path / "node", server, sink)
    cfg = load_config(config, environ={})
    name = queue_name(cfg)
    assert name.startswith("synthmrf_SYNTHMRF_") and make_huey(cfg).storage.queue_key == f"huey.redis.{name}"
    node = Node(cfg, processor=fast_processor).start()
    nodes.append(node)
    series = series_of(tmp_path, "one", 1)
    send(node, series)
    [result] = wait_until(sink.results, 20, what="the result")
    wait_until(node.idle, 10, what="the node to be idle")
    assert result.comments == "from 5 frames of 5 instances" and result.referenced_series == series.series_uid
    [job] = node.store.jobs()
    assert (job.id, job.state, job.attempts) == (job_id(series), JobState.DELIVERED, 1)
    assert len(sink.received) == 1 and held(cfg) == set()
    r = CliRunner().invoke(status, ["--config", str(config), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["queue_depth"] == 0
    r = CliRunner().invoke(status, ["--config", str(config)], catch_exceptions=False)
    assert r.exit_code == 0 and "queue        0 task(s) waiting (redis)" in r.output
    node.stop()
    server.stop()
    r = CliRunner().invoke(status, ["--config", str(config)], catch_exceptions=False)
    assert r.exit_code == 0 and "queue        unknown (redis: ConnectionError: " in r.output
    assert "jobs         delivered 1" in r.output


def test_two_nodes_with_one_ae_title_share_a_server(tmp_path: Path, server: RedisServer, sink: ResultSink,
                                                    nodes: list[Node]) -> None:
    cfg_a = load_config(write_config(tmp_path / "a", server, sink), environ={})
    cfg_b = load_config(write_config(tmp_path / "b", server, sink), environ={})
    assert cfg_a.node.ae_title == cfg_b.node.ae_title and queue_name(cfg_a) != queue_name(cfg_b)
    a1, a2, b1 = series_of(tmp_path, "a1", 1), series_of(tmp_path, "a2", 2), series_of(tmp_path, "b1", 3)
    proc_a, proc_b = GatedProcessor(), GatedProcessor()
    proc_b.gate.set()
    node_a = Node(cfg_a, processor=proc_a).start()
    nodes.append(node_a)
    send(node_a, a1)  # A's only worker holds a1 ...
    wait_until(lambda: node_a.store.jobs([JobState.PROCESSING]), 20, what="a1 to be processing")
    send(node_a, a2)  # ... so a2 waits in A's queue
    wait_until(lambda: held(cfg_a) == {job_id(a2)}, 20, what="a2 in A's queue")

    node_b = Node(cfg_b, processor=proc_b).start()  # its start empties its own queue, not A's
    nodes.append(node_b)
    send(node_b, b1)
    wait_until(lambda: node_b.store.jobs([JobState.DELIVERED]), 20, what="B's result delivered")
    assert held(cfg_a) == {job_id(a2)}  # B's worker never took A's task
    assert proc_b.series == [b1.series_uid]

    proc_a.gate.set()
    wait_until(lambda: len(node_a.store.jobs([JobState.DELIVERED])) == 2, 20, what="A's two results delivered")
    assert proc_a.series == [a1.series_uid, a2.series_uid]
    assert sorted(j.id for j in node_a.store.jobs()) == sorted([job_id(a1), job_id(a2)])
    assert [j.id for j in node_b.store.jobs()] == [job_id(b1)]
    assert all(j.attempts == 1 for j in node_a.store.jobs() + node_b.store.jobs())
    assert sorted(r.referenced_series for r in sink.results()) == sorted(s.series_uid for s in (a1, a2, b1))
    assert len(sink.received) == 3


@pytest.mark.parametrize("queue_lost", [False, True], ids=["queue-kept", "queue-lost"])
def test_a_restart_loses_no_queued_job(tmp_path: Path, server: RedisServer, sink: ResultSink, nodes: list[Node],
                                       monkeypatch: pytest.MonkeyPatch, queue_lost: bool) -> None:
    """Stopped without draining while s1 runs and s2 waits in Redis; s2 is processed once after the restart, also
    when Redis lost the queue meanwhile (a Redis restart without persistence, or a queue under an older name)."""
    config = write_config(tmp_path / "node", server, sink)
    cfg = load_config(config, environ={})
    s1, s2 = series_of(tmp_path, "s1", 1), series_of(tmp_path, "s2", 2)
    proc = GatedProcessor()
    stop_workers = JobWorkers.stop

    def stop_then_open_gate(self: JobWorkers, timeout_s: float) -> bool:
        self.stop_flag.set()  # s1 finishes now, and no worker takes s2 any more
        proc.gate.set()
        return stop_workers(self, timeout_s)

    monkeypatch.setattr(JobWorkers, "stop", stop_then_open_gate)
    node = Node(cfg, processor=proc).start()
    nodes.append(node)
    send(node, s1)
    wait_until(lambda: node.store.jobs([JobState.PROCESSING]), 20, what="s1 to be processing")
    send(node, s2)
    wait_until(lambda: held(cfg) == {job_id(s2)}, 20, what="s2 in the queue")
    node.stop(drain=False)

    assert [j.id for j in jobs_in(cfg, JobState.QUEUED)] == [job_id(s2)]
    assert held(cfg) == {job_id(s2)}
    r = CliRunner().invoke(status, ["--config", str(config), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["queue_depth"] == 1 and report["jobs"].get("queued") == 1
    if queue_lost:
        redis.Redis(port=server.port).flushall()

    node = Node(cfg, processor=proc).start()
    nodes.append(node)
    wait_until(lambda: len(node.store.jobs([JobState.DELIVERED])) == 2, 20, what="both results delivered")
    assert proc.series == [s1.series_uid, s2.series_uid]
    assert all(j.attempts == 1 for j in node.store.jobs())
    assert sorted(r.referenced_series for r in sink.results()) == sorted([s1.series_uid, s2.series_uid])
    assert len(sink.received) == 2 and held(cfg) == set()
