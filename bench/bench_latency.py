"""End-to-end latency of a running node (run on demand, prints a table): last instance in to both T1 and
T2 Parametric Maps stored at the destination, for a 192x192x150 MPRAGE series, real pipeline and the
active model.

    .venv/bin/python bench/bench_latency.py [--workdir DIR] [--studies 2] [--quiet-seconds 2]

The node runs in this process with an embedded destination (as ``synthmrf demo``). The first study
also pays for importing torch and loading the model in the worker; the following ones show a warm
node. Each study is the same phantom series under new Study/Series/SOP Instance UIDs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from dicom_node.config import Destination, NodeConfig, NodeSection, PipelineSection, SeriesSection
from dicom_node.demo import DESTINATION_AE, SENDER_AE, ResultSink, phantom_subject
from dicom_node.dimse.client import Peer, store_files
from dicom_node.node import Node


def clone_study(files: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f.name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--quiet-seconds", type=float, default=2.0)
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bench-latency-"))).resolve()
    source = sorted((phantom_subject(workdir) / "mprage_dicom").iterdir())
    sink = ResultSink(workdir / "received")
    port = sink.start()
    config = NodeConfig(
        node=NodeSection(host="127.0.0.1", port=0, storage_dir=workdir / "node", min_free_mb=256),
        series=SeriesSection(quiet_seconds=args.quiet_seconds),
        pipeline=PipelineSection(models_dir=workdir / "node" / "models"),
        destinations=[Destination(name="sink", ae_title=DESTINATION_AE, host="127.0.0.1", port=port)],
    )
    rows = []
    with Node(config) as node:
        for n in range(args.studies):
            files = clone_study(source, workdir / f"study-{n + 1}")
            study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            store_files(files, Peer(config.node.ae_title, "127.0.0.1", node.port), SENDER_AE)
            last_in = time.monotonic()
            while not {"T1", "T2"} <= set(sink.maps(study)):
                time.sleep(0.2)
            rows.append((n + 1, time.monotonic() - last_in))
    sink.stop()
    print(f"quiet period {args.quiet_seconds:.1f} s (the series' completion rule; default config: 30 s, or the "
          "early trigger)")
    print(f"{'study':>5} {'last instance in -> T1+T2 maps stored, s':>42}")
    for n, seconds in rows:
        print(f"{n:>5} {seconds:>42.1f}")


if __name__ == "__main__":
    main()
