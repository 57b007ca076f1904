"""A node on a small tmpfs that really fills: admission keeps room for results, a job that meets ENOSPC
waits and runs again, retention frees the oldest delivered series, and every acknowledged series is mapped
exactly once. Needs root (it mounts the tmpfs)."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import ResultSink, fast_processor, make_series, node_config, result_sink, run_tool, wait_until

from dicom_node.node import Node
from dicom_node.node.job_store import JobState

DISK_MB = 40
SERIES = 8
INSTANCES = 24  # 256 x 256 x 16 bit: 3 MB per series
RESULT_FACTOR = 3  # the processor writes results of three times a series' bytes


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:  # a container without CAP_SYS_ADMIN: the environment, not the product
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


class BallastProcessor:
    """The fast test processor plus "maps" of ``RESULT_FACTOR`` times the input's bytes; its first run tries to
    write more than the disk holds (ENOSPC in the middle of a write)."""

    def __init__(self) -> None:
        self.runs = 0
        self.lock = threading.Lock()

    def __call__(self, input_dir: Path, out_dir: Path, *, model: str | None = None) -> object:
        with self.lock:
            self.runs += 1
            first = self.runs == 1
        result = fast_processor(input_dir, out_dir)
        size = sum(p.stat().st_size for p in input_dir.iterdir()) * RESULT_FACTOR
        chunk = b"\x5a" * 2**20
        with (out_dir / "maps.bin").open("wb") as f:
            for _ in range((2 * DISK_MB if first else size // 2**20) + 1):
                f.write(chunk)
        return result


def test_a_full_disk_delays_work_and_loses_nothing(small_disk: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    processor = BallastProcessor()
    cfg = node_config(small_disk, destinations=[],
                      node={"min_free_mb": 4},
                      ingress={"result_space_factor": RESULT_FACTOR},
                      retention={"high_water_free_mb": 20},
                      jobs={"takeover_s": 5, "retry_delay_s": 0.5},
                      series={"quiet_seconds": 1.0})
    series = [make_series(tmp_path / f"s{k}", n=INSTANCES, size=256, patient_id=f"DISK{k}", seed=k)
              for k in range(SERIES)]
    with result_sink() as sink, caplog.at_level(logging.INFO, logger="dicom_node"):
        cfg = cfg.model_copy(update={"destinations": node_config(small_disk, destinations=[sink.destination()])
                                     .destinations})
        node = Node(cfg, processor=processor).start()
        try:
            refusals = send_all(node, series)
            wait_until(lambda: len(sink.results()) >= SERIES and node.idle(), 120, poll_s=0.2,
                       what="every series to be mapped and delivered")
            jobs = node.store.jobs()
        finally:
            node.stop(drain=False)
        check_results(sink, series, jobs, refusals, caplog.text, small_disk)


def send_all(node: Node, series: list) -> int:
    """Send each series with storescu, again after a refusal (as a PACS retries); return the refusals."""
    refusals = 0
    for s in series:
        for _ in range(200):
            r = run_tool(["storescu", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port), *map(str, s.files)])
            if r.returncode == 0:
                break
            refusals += 1
            threading.Event().wait(0.3)
        else:
            pytest.fail(f"series {s.series_uid} was never accepted")
    return refusals


def check_results(sink: ResultSink, series: list, jobs: list, refusals: int, log: str, disk: Path) -> None:
    mapped = sorted(r.referenced_series for r in sink.results())
    assert mapped == sorted(s.series_uid for s in series)  # every acknowledged series mapped exactly once
    assert all(j.state is JobState.DELIVERED for j in jobs), [(j.state, j.reason) for j in jobs]
    assert len(jobs) == SERIES
    assert refusals > 0 and "the node keeps free would remain" in log  # admission refused
    assert "the disk is full" in log and "not counted as an attempt" in log  # the first run met ENOSPC
    assert "before its retention ended" in log  # retention freed delivered series under pressure
    assert not any((disk / "tmp").iterdir())
    for run in disk.glob("series/*/v*/output/run-*"):  # only finished runs remain: none holds the huge maps
        assert (run / "maps.bin").stat().st_size < 2 * DISK_MB * 2**20 // 4
    assert len(list(disk.glob("series/*/v*/output"))) == len(list(disk.glob("series/*/v*/output/run-*")))
