"""Throughput of a node with 1 and with 2 pipeline worker processes (run on demand, prints a table): a batch of
MPRAGE studies (192x192x150, the phantom series under new UIDs) sent back to back, real pipeline and the
active model; time from the first instance in to the last study's T1 and T2 maps stored, and studies/hour.

    .venv/bin/python bench/bench_throughput.py [--workdir DIR] [--studies 6] [--workers 1 2]

Each worker count gets a fresh node (its workers start cold: torch import and model load are included, as
for a node that was idle). Both worker counts run in one invocation, so their ratio is comparable.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom
from bench_latency import clone_study

from dicom_node.config import Destination, JobsSection, NodeConfig, NodeSection, PipelineSection, SeriesSection
from dicom_node.demo import DESTINATION_AE, SENDER_AE, ResultSink, phantom_subject
from dicom_node.dimse.client import Peer, store_files
from dicom_node.node import Node


def run_batch(workdir: Path, source: list[Path], studies: int, workers: int, quiet_s: float) -> tuple[float, float]:
    """(seconds from the first instance sent to the last maps stored, the node's peak RSS sum in GiB)."""
    import psutil

    sink = ResultSink(workdir / "received")
    port = sink.start()
    config = NodeConfig(
        node=NodeSection(host="127.0.0.1", port=0, storage_dir=workdir / "node", min_free_mb=256),
        series=SeriesSection(quiet_seconds=quiet_s),
        jobs=JobsSection(workers=workers),
        pipeline=PipelineSection(models_dir=workdir / "node" / "models"),
        destinations=[Destination(name="sink", ae_title=DESTINATION_AE, host="127.0.0.1", port=port)],
    )
    batches = [clone_study(source, workdir / f"study-{n + 1}") for n in range(studies)]
    uids = [str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID) for files in batches]
    peak = 0.0
    with Node(config) as node:
        start = time.monotonic()
        for files in batches:
            store_files(files, Peer(config.node.ae_title, "127.0.0.1", node.port), SENDER_AE)
        while not all({"T1", "T2"} <= set(sink.maps(uid)) for uid in uids):
            rss = sum(psutil.Process(pid).memory_info().rss for pid in node.worker_pids if psutil.pid_exists(pid))
            peak = max(peak, rss / 2**30)
            time.sleep(0.5)
        seconds = time.monotonic() - start
    sink.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-throughput-"))).resolve()
    source = sorted((phantom_subject(workdir) / "mprage_dicom").iterdir())
    rows = []
    for workers in args.workers:
        seconds, peak = run_batch(workdir / f"workers-{workers}", source, args.studies, workers, args.quiet_seconds)
        rows.append((workers, seconds, peak))
        print(f"workers {workers}: {args.studies} studies in {seconds:.0f} s", flush=True)
    base = rows[0][1]
    print(f"{args.studies} studies sent back to back, quiet period {args.quiet_seconds:.1f} s")
    print(f"{'workers':>7} {'seconds':>8} {'studies/hour':>13} {'speed-up':>9} {'workers peak RSS GiB':>21}")
    for workers, seconds, peak in rows:
        print(f"{workers:>7} {seconds:>8.0f} {3600 * args.studies / seconds:>13.1f} {base / seconds:>9.2f} "
              f"{peak:>21.1f}")


if __name__ == "__main__":
    main()
