"""State that a failure must not wedge: crash-looping jobs, failed hand-overs, a full state database,
partial deliveries."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from node_support import fast_processor, mr_datasets, node_config, result_sink, wait_until, write_series
from pydicom.dataset import Dataset

from dicom_node.config import MprageSection
from dicom_node.node import Node
from dicom_node.node import service as node_module
from dicom_node.node.dispatch import Dispatcher
from dicom_node.node.job_store import STATE_FILE, DeliveryState, JobState, JobStore
from dicom_node.node.router import Router
from dicom_node.node.spool import Spool


def spool_series(spool: Spool, datasets: list[Dataset], folder: Path) -> None:
    """Put instances in the spool's incoming/ as the listener would."""
    for path, ds in zip(write_series(datasets, folder).files, datasets, strict=True):
        spool.store(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path.read_bytes())


def failing_once(real: Callable[..., Any], exc: Exception) -> Callable[..., Any]:
    calls = []

    def call(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)
    return call


# -- jobs whose runs kill their workers (finding: re-run at every restart forever) -----------------------------


def test_a_job_that_killed_its_workers_max_attempts_times_is_failed_at_start(tmp_path: Path) -> None:
    storage = tmp_path / "n"
    spool = Spool(storage)
    spool.prepare()
    store = JobStore.sqlite(storage / STATE_FILE)
    for i, deaths in enumerate((1, 2)):  # two series: the process ended once in one's runs, twice in the other's
        datasets = mr_datasets(3, 16, patient_id=f"DIE{i}", seed=i)
        spool_series(spool, datasets, tmp_path / f"s{i}")
        claim = spool.claim(str(datasets[0].SeriesInstanceUID))
        assert claim is not None
        job = store.create_job(claim.series_uid, 1, "1.2", 3, JobState.QUEUED, "")
        run = store.claim_job("worker@dead")
        assert run is not None and store.end_job(run.id, run.run_token, JobState.QUEUED, "")  # an error
        for death in range(deaths):
            assert store.claim_job(f"worker@dead{i}{death}") is not None  # ... and then the worker died
            if death < deaths - 1:  # a start in between takes it over
                assert store.take_over(5, owners=[f"worker@dead{i}{death}"])[0] == [job.id]
    store.close()
    calls: list[Path] = []

    def processor(input_dir: Path, out_dir: Path, *, model: str | None = None) -> Any:
        calls.append(input_dir)
        return fast_processor(input_dir, out_dir, model=model)

    node = Node(node_config(storage, jobs={"max_attempts": 2}), processor=processor).start()
    try:
        wait_until(node.idle, 10, what="the node to be idle")
        assert sorted((j.state, j.attempts, j.reason) for j in node.store.jobs()) == [
            (JobState.DELIVERED, 2, ""),  # the error and the run that completed; the interrupted run not counted
            (JobState.FAILED, 1, "a worker ended while processing it, 2 times (killed, out of memory or crashed)")]
        assert len(calls) == 1
    finally:
        node.stop(drain=False)


# -- failed hand-overs are settled (claim, job) ----------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["link", "create_job"])
def test_a_failed_hand_over_is_settled_before_the_next_version_is_claimed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    store = JobStore.sqlite(tmp_path / "jobs.sqlite")
    router = Router(spool, store, MprageSection(), "node@test")
    datasets = mr_datasets(4, 16, patient_id="FAIL")
    uid = str(datasets[0].SeriesInstanceUID)
    spool_series(spool, datasets[:2], tmp_path / "a")
    assert router.series_complete(uid, "test") is not None  # version 1
    spool_series(spool, datasets[2:3], tmp_path / "b")
    if failure == "link":  # the disk filled up while the claim linked version 1's files
        monkeypatch.setattr(os, "link", failing_once(os.link, OSError(errno.ENOSPC, "No space left on device")))
    else:
        monkeypatch.setattr(store, "create_job", failing_once(store.create_job,
                                                              sqlite3.OperationalError("database or disk is full")))
    with pytest.raises((OSError, sqlite3.Error)):
        router.series_complete(uid, "test")  # version 2: stuck claim, or no job
    spool_series(spool, datasets[3:], tmp_path / "c")  # a late instance
    job = router.series_complete(uid, "the assembler's retry")
    assert job is not None and job.version == 3
    assert store.queued() == [f"{uid}-v1", f"{uid}-v2", f"{uid}-v3"]
    assert [(j.version, j.state, j.instances) for j in sorted(store.jobs(), key=lambda j: j.version)] == [
        (1, JobState.QUEUED, 2), (2, JobState.QUEUED, 3), (3, JobState.QUEUED, 4)]
    assert len(list(spool.version_dir(uid, 3).joinpath("input").iterdir())) == 4  # nothing of version 2 is lost
    assert router.reconcile() == 0  # all settled


def test_housekeeping_settles_versions_without_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    store = JobStore.sqlite(tmp_path / "jobs.sqlite")
    router = Router(spool, store, MprageSection(), "node@test")
    a, b = mr_datasets(2, 16, patient_id="LOSTA"), mr_datasets(2, 16, patient_id="LOSTB")
    for datasets, folder in ((a, "a"), (b, "b")):
        spool_series(spool, datasets, tmp_path / folder)
        assert spool.claim(str(datasets[0].SeriesInstanceUID)) is not None  # as if create_job had failed
    assert router.reconcile() == 2
    assert sorted(store.queued()) == sorted(f"{d[0].SeriesInstanceUID}-v1" for d in (a, b))
    assert router.reconcile() == 0

    # the node runs it from its housekeeping thread
    monkeypatch.setattr(node_module, "RECONCILE_INTERVAL_S", 0.2)
    node = Node(node_config(tmp_path / "n"), processor=fast_processor).start()
    try:
        c = mr_datasets(2, 16, patient_id="LOSTC")
        spool_series(node.spool, c, tmp_path / "c")
        assert node._router is not None
        with node._router._lock:  # claimed as a hand-over would, whose job creation then failed
            assert node.spool.claim(str(c[0].SeriesInstanceUID)) is not None
        [job] = wait_until(lambda: node.store.jobs([JobState.DELIVERED]), 10, what="the job to be made and run")
        assert job.series_uid == str(c[0].SeriesInstanceUID)
    finally:
        node.stop(drain=False)


# -- a full state database (finding: the real error was hidden, the connection left in a transaction) -------------


def test_a_full_database_reports_itself_and_leaves_the_connection_usable(tmp_path: Path) -> None:
    store = JobStore.sqlite(tmp_path / "jobs.sqlite")
    db = store.db._db  # type: ignore[attr-defined]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        for i in range(200):
            store.create_job(f"1.2.{i}", 1, "1.2", 1, JobState.QUEUED, "x" * 2000)
    assert not db.in_transaction
    db.execute(f"PRAGMA max_page_count = {pages * 100}")
    store.create_job("1.3", 1, "1.2", 1, JobState.QUEUED, "after")
    assert store.job("1.3-v1") is not None
    store.close()


# -- a partial delivery is a failed attempt ----------------------------------------------------------------------


def test_a_delivery_missing_a_result_file_is_retried_then_dead_lettered(tmp_path: Path) -> None:
    datasets = mr_datasets(1, 16, patient_id="PART")
    [present] = write_series(datasets, tmp_path / "out").files
    missing = tmp_path / "out" / "gone.dcm"
    with result_sink() as sink:
        cfg = node_config(tmp_path / "n", destinations=[sink.destination()],
                          dispatch={"max_attempts": 2, "backoff_initial_s": 0})
        store = JobStore.sqlite(tmp_path / "jobs.sqlite")
        job = store.create_job("1.2.3", 1, "1.2", 1, JobState.QUEUED, "")
        run = store.claim_job("worker@test")
        assert run is not None and store.finish_job(run.id, run.run_token, [present, missing], ["sink"])
        dispatcher = Dispatcher(cfg, store)
        assert dispatcher.run_once() == 1
        [delivery] = store.job(job.id).deliveries  # type: ignore[union-attr]
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 1)
        assert delivery.last_error.startswith("1 of 2 result files unreadable, not sent: gone.dcm")
        assert dispatcher.run_once() == 1
        after = store.job(job.id)
        assert after is not None and after.deliveries[0].state is DeliveryState.DEAD
        assert after.state is JobState.PROCESSED
        assert len(sink.received) == 2  # the readable file, sent at each attempt
        store.close()


# -- a full disk while processing (finding: the job failed for good, its acknowledged data never mapped) ------------


def test_a_job_that_meets_a_full_disk_waits_and_runs_again_uncounted(tmp_path: Path) -> None:
    calls: list[Path] = []

    def processor(input_dir: Path, out_dir: Path, *, model: str | None = None) -> Any:
        calls.append(input_dir)
        if len(calls) <= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return fast_processor(input_dir, out_dir, model=model)

    node = Node(node_config(tmp_path / "n", jobs={"max_attempts": 1, "retry_delay_s": 0.2}), processor=processor)
    node.start()
    try:
        spool_series(node.spool, mr_datasets(3, 16, patient_id="FULL"), tmp_path / "s")
        [uid] = node.spool.series_uids()
        assert node._router is not None
        job = node._router.series_complete(uid, "test")  # as the assembler would
        assert job is not None
        [done] = wait_until(lambda: node.store.jobs([JobState.DELIVERED]), 20, what="the job after space returned")
        assert (done.attempts, len(calls)) == (1, 4)  # three full-disk runs were not attempts (max_attempts 1)
    finally:
        node.stop(drain=False)
