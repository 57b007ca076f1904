"""The job store as the queue, on SQLite and on a real PostgreSQL: claims, takeover, locks, schema versions;
and an installation of two nodes and two worker machines sharing one database and one storage folder."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from node_support import (
    PostgresServer,
    ResultSink,
    Serve,
    Worker,
    free_port,
    make_series,
    postgres_server,
    run_tool,
    wait_until,
)

from dicom_node.node.job_store import SCHEMA, STATE_FILE, JobState, JobStore
from dicom_node.state_db import SchemaTooNewError


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


def reset(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS deliveries, jobs, members, locks, schema_versions CASCADE")


StoreFactory = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """A function opening a new connection to one fresh store (one per thread, as processes would)."""
    opened: list[JobStore] = []
    if request.param == "sqlite":
        connect: StoreFactory = lambda: JobStore.sqlite(tmp_path / STATE_FILE)  # noqa: E731
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        reset(server.url)
        connect = lambda: JobStore.postgres(server.url)  # noqa: E731

    def open_store() -> JobStore:
        opened.append(connect())
        return opened[-1]

    yield open_store
    for s in opened:
        s.close()


def test_concurrent_workers_claim_each_job_exactly_once(store_factory: StoreFactory) -> None:
    first = store_factory()
    ids = [first.create_job(f"1.2.{i}", 1, "1.2", 1, JobState.QUEUED, "").id for i in range(40)]
    claimed: dict[str, list[str]] = {}
    lock = threading.Lock()

    def work(n: int) -> None:
        store = store_factory()
        while (job := store.claim_job(f"worker@{n}")) is not None:
            with lock:
                claimed.setdefault(job.id, []).append(f"worker@{n}")
            assert store.finish_job(job.id, job.run_token, [], [])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)
    assert all(len(v) == 1 for v in claimed.values())
    assert first.counts() == {"job:delivered": 40}


def test_a_dead_workers_job_is_taken_over_and_its_late_finish_refused(store_factory: StoreFactory) -> None:
    store = store_factory()
    job = store.create_job("1.2.9", 1, "1.2", 1, JobState.QUEUED, "")
    store.join("worker@a", "worker")
    store.join("worker@b", "worker")
    run = store.claim_job("worker@a")
    assert run is not None and run.owner == "worker@a"
    assert store.take_over(2, stale_before=time.time() - 60) == ([], [], 0)  # a is alive: nothing to take over
    time.sleep(0.05)
    cutoff = time.time()
    store.beat("worker@b")  # b is alive, a has been silent since before the cutoff
    assert store.take_over(2, stale_before=cutoff) == ([job.id], [], 0)
    rerun = store.claim_job("worker@b")
    assert rerun is not None and rerun.run_token != run.run_token and rerun.attempts == 1
    assert not store.finish_job(job.id, run.run_token, [], [])  # the old run cannot complete the job
    assert not store.release_job(job.id, run.run_token)
    assert store.finish_job(job.id, rerun.run_token, [], [])
    done = store.job(job.id)
    assert done is not None and (done.state, done.attempts, done.interruptions) == (JobState.DELIVERED, 1, 1)


def test_locks_have_one_owner_until_released_or_expired(store_factory: StoreFactory) -> None:
    a, b = store_factory(), store_factory()
    assert a.try_lock("series:1.2.3", "node@a", ttl_s=60)
    assert not b.try_lock("series:1.2.3", "node@b", ttl_s=60)
    assert a.try_lock("series:1.2.3", "node@a", ttl_s=60)  # renewal by the owner
    a.unlock("series:1.2.3", "node@a")
    assert b.try_lock("series:1.2.3", "node@b", ttl_s=0.01)
    time.sleep(0.05)
    assert a.try_lock("series:1.2.3", "node@a", ttl_s=60)  # b's lock expired


def test_retries_back_off_and_wait_for_their_time(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.create_job("1.2.5", 1, "1.2", 1, JobState.QUEUED, "")
    run = store.claim_job("worker@a")
    assert run is not None and store.end_job(run.id, run.run_token, JobState.QUEUED, "error", time.time() + 0.5)
    assert store.claim_job("worker@a") is None  # not due yet
    due = store.next_due_at()
    assert due is not None and due > time.time()
    time.sleep(0.6)
    assert store.claim_job("worker@a") is not None


def test_an_old_state_file_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    with sqlite3.connect(path) as db:  # a job store written by synthmrf 0.1 (schema 1, user_version 0)
        db.executescript(SCHEMA[0])
        db.execute("INSERT INTO jobs (id, series_uid, version, state, created_at, updated_at) "
                   "VALUES ('1.2-v1', '1.2', 1, 'queued', 1.0, 1.0)")
    store = JobStore.sqlite(path)
    run = store.claim_job("worker@a")
    assert run is not None and run.id == "1.2-v1" and run.owner == "worker@a"
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(SCHEMA),)
        db.execute(f"PRAGMA user_version = {len(SCHEMA) + 1}")
    with pytest.raises(SchemaTooNewError, match="upgrade synthmrf"):
        JobStore.sqlite(path)


# -- an installation: two nodes, two worker machines, one PostgreSQL, one shared storage folder ----------------------


def installation_config(path: Path, storage: Path, port: int, url: str, sink: ResultSink, workers: int) -> Path:
    path.write_text(f"""
[node]
host = "127.0.0.1"
port = {port}
storage_dir = "{storage}"
min_free_mb = 0
drain_timeout_s = 10
[series]
quiet_seconds = 1.5
settle_seconds = 0.2
[jobs]
backend = "postgres"
database_url = "{url}"
workers = {workers}
poll_interval_s = 0.2
takeover_s = 6
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
    return path


@pytest.mark.slow
def test_two_nodes_and_two_workers_deliver_each_study_once_through_kill_9(
        tmp_path: Path, postgres: PostgresServer) -> None:
    reset(postgres.url)
    storage = tmp_path / "shared"
    studies = [make_series(tmp_path / f"s{i}", n=8, size=32, patient_id=f"SCALE{i}", seed=40 + i) for i in range(6)]
    sink = ResultSink(port=free_port()).start()
    ports = [free_port(), free_port()]
    configs = [installation_config(tmp_path / f"node{i}.toml", storage, ports[i], postgres.url, sink, workers=0)
               for i in range(2)]
    worker_config = installation_config(tmp_path / "worker.toml", storage, ports[0], postgres.url, sink, workers=1)
    nodes = [Serve(configs[i], tmp_path / f"node{i}.log", ports[i]) for i in range(2)]
    workers = [Worker(worker_config, tmp_path / f"worker{i}.log", NODE_TEST_PROCESSOR_DELAY_S="3") for i in range(2)]
    store = JobStore.postgres(postgres.url)
    try:
        def send(i: int, port: int) -> None:
            r = run_tool(["storescu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(port),
                          *map(str, studies[i].files)])
            assert r.returncode == 0, r.stderr

        for i in range(3):  # three studies to each node
            send(i, ports[0])
            send(3 + i, ports[1])
        # machine loss: kill -9 worker 0 with its children while it runs a job; the other worker takes it over
        wait_until(lambda: [m for m in store.members() if m.kind == "worker" and m.detail.startswith("running")
                            and psutil.Process(m.pid).ppid() == workers[0].proc.pid]
                   if len([m for m in store.members() if m.kind == "worker"]) == 2 else None, 60,
                   what="worker 0 to run a job")
        lost_at = time.monotonic()
        workers[0].kill9_group()
        taken = wait_until(lambda: [j for j in store.jobs() if j.interruptions == 1], 30,
                           what="the lost worker's job to be taken over")
        takeover_s = time.monotonic() - lost_at
        # node loss: kill -9 node 0; node 1 keeps receiving
        nodes[0].kill9()
        late = make_series(tmp_path / "late", n=8, size=32, patient_id="SCALE6", seed=60)
        r = run_tool(["storescu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(ports[1]),
                      *map(str, late.files)])
        assert r.returncode == 0, r.stderr
        wait_until(lambda: len(store.jobs([JobState.DELIVERED])) == 7, 180, 0.5, "all seven studies delivered")
        results = sink.results()
        assert sorted(r.study_uid for r in results) == sorted(s.study_uid for s in [*studies, late])  # once each
        assert all(r.comments == "from 8 frames of 8 instances" for r in results)
        [lost] = taken
        done = store.job(lost.id)
        assert done is not None and (done.state, done.attempts, done.interruptions) == (JobState.DELIVERED, 1, 1)
        print(f"takeover after a lost worker machine: {takeover_s:.1f} s (jobs.takeover_s = 6)")
        assert takeover_s < 6 * 3  # the takeover period (6 s) plus the heartbeat and claim intervals
        for log in tmp_path.glob("*.log"):
            assert "Traceback" not in log.read_text(), log
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.terminate(60)
        for n in nodes:
            if n.proc.poll() is None:
                n.terminate(60)
        store.close()
        sink.stop()


@pytest.mark.parametrize("module", ["dicom_node.workers.pool", "dicom_node.node.job_store", "dicom_node.node",
                                    "dicom_node.dimse.folder_scp", "dicom_node.retro.harvest"])
def test_each_entry_module_imports_alone(module: str) -> None:
    """A spawned worker process imports its module first, without the node around it (no import cycles)."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
