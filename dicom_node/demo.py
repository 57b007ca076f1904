"""``synthmrf demo``: the whole round trip on embedded defaults, in one process.

A phantom subject's MPRAGE study (192x192x150, the phantom world) is sent by C-STORE to a node
started in-process; the node assembles the series, runs the pipeline with the active model and sends
the results to an embedded destination SCP (a stand-in PACS). The demo then reads the T1 and T2
Parametric Maps that arrived, checks they belong to the source study, patient and frame of reference,
and compares their per-tissue medians with the phantom's ground truth.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pynetdicom.sop_class import ParametricMapStorage  # type: ignore[attr-defined]

from dicom_node.config import Destination, NodeConfig, NodeSection, PipelineSection, SeriesSection
from dicom_node.dimse.client import Peer, store_files
from dicom_node.dimse.folder_scp import FolderSCP
from dicom_node.node import Node

logger = logging.getLogger(__name__)

DESTINATION_AE = "DEMOPACS"
SENDER_AE = "DEMOSCANNER"
PLAUSIBLE_RELATIVE_ERROR = 0.25  # per-tissue median vs truth, WM and GM (the shipped model: see README)
TIMEOUT_S = 900.0


@dataclass
class DemoReport:
    """What the demo saw: timings, the received results, per-tissue medians and verdicts."""

    workdir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    received: list[Path] = field(default_factory=list)
    rows: list[tuple[str, str, float, float]] = field(default_factory=list)  # quantity, tissue, truth, measured
    problems: list[str] = field(default_factory=list)
    qc_figure: Path | None = None
    maps_dir: Path | None = None

    @property
    def plausible(self) -> bool:
        return not self.problems and bool(self.rows)

    def table(self) -> str:
        lines = [f"{'map':<4} {'tissue':<6} {'truth ms':>9} {'measured':>9} {'error':>7}"]
        for quantity, tissue, truth, measured in self.rows:
            error = 100 * (measured / truth - 1)
            lines.append(f"{quantity:<4} {tissue:<6} {truth:>9.0f} {measured:>9.0f} {error:>+6.1f}%")
        return "\n".join(lines)


class ResultSink:
    """The embedded destination: a storage SCP filing what it receives under a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.received: list[Path] = []
        self._maps: list[tuple[str, str, Path]] = []  # (study UID, quantity, path) of Parametric Maps
        self._lock = threading.Lock()
        self._scp = FolderSCP(DESTINATION_AE, folder, on_stored=self._stored)

    def _stored(self, path: Path, ds: Dataset) -> None:
        with self._lock:
            self.received.append(path)
            if ds.SOPClassUID == ParametricMapStorage:
                self._maps.append((str(ds.StudyInstanceUID), _quantity(ds), path))

    def start(self) -> int:
        return self._scp.start("127.0.0.1", 0)

    def stop(self) -> None:
        self._scp.stop()

    def maps(self, study_uid: str | None = None) -> dict[str, Path]:
        """The Parametric Maps received so far (of one study), by quantity (T1, T2, PD)."""
        with self._lock:
            return {q: path for study, q, path in self._maps if study_uid in (None, study)}


def _quantity(ds: Dataset) -> str:
    """T1/T2/PD from a Parametric Map's content label (T1MAP etc.) or its series description."""
    label = str(ds.get("ContentLabel", "")).upper()
    for q in ("T1", "T2", "PD"):
        if label.startswith(q):
            return q
    return str(ds.get("SeriesDescription", "?"))


def phantom_subject(workdir: Path) -> Path:
    """The demo's phantom subject folder in ``workdir`` (made once, seed 2024, full resolution)."""
    from training.phantom.dataset import make_dataset
    from training.phantom.subject import PhantomOptions

    subject = workdir / "phantom" / "sub-001"
    if not (subject / "mprage_dicom").is_dir():
        make_dataset(1, workdir / "phantom", seed=2024, options=PhantomOptions(mrf=False), progress=False)
    return subject


def _map_on_source_grid(path: Path, grid_positions: np.ndarray, normal: np.ndarray, shape: tuple[int, int, int]
                        ) -> np.ndarray:
    """A received Parametric Map as a (columns, rows, frames) volume on the source grid, by frame position."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    source_along = grid_positions @ normal
    volume = np.zeros(shape, dtype=np.float32)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        along = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float) @ normal
        k = int(np.argmin(np.abs(source_along - along)))
        if abs(source_along[k] - along) > 0.01:
            raise ValueError(f"{path.name}: frame {f + 1} is not at a source slice position")
        volume[:, :, k] = pixels[f].T
    return volume


def _compare(report: DemoReport, subject: Path, maps: dict[str, Path]) -> None:
    import json

    from pipeline.dicom_series import read_series
    from pipeline.geometry import resample_to_grid
    from pipeline.volume_io import load_volume
    from training.evaluation.subjects import tissue_masks_from_labels

    series = read_series(subject / "mprage_dicom")
    grid = series.grid
    labels, label_affine = load_volume(subject / "labels.nii.gz")
    names = {int(k): v for k, v in json.loads((subject.parent / "manifest.json").read_text())["labels"].items()}
    on_source = resample_to_grid(labels, label_affine, grid.shape, grid.ras_affine, order=0).astype(int)
    tissues = tissue_masks_from_labels(on_source, names)
    for quantity in ("T1", "T2"):
        measured = _map_on_source_grid(maps[quantity], grid.positions, grid.normal, grid.shape)
        truth_volume, truth_affine = load_volume(subject / f"{quantity}.nii.gz")
        truth = resample_to_grid(truth_volume, truth_affine, grid.shape, grid.ras_affine, order=0)
        for tissue in ("WM", "GM", "CSF"):
            sel = tissues[tissue] & (measured > 0)
            if sel.sum() < 100:
                report.problems.append(f"{quantity} {tissue}: almost no mapped voxels ({int(sel.sum())})")
                continue
            t, m = float(np.median(truth[sel])), float(np.median(measured[sel]))
            report.rows.append((quantity, tissue, t, m))
            if tissue != "CSF" and abs(m / t - 1) > PLAUSIBLE_RELATIVE_ERROR:
                report.problems.append(f"{quantity} {tissue}: median {m:.0f} ms vs truth {t:.0f} ms")
    source = series.header
    for quantity, path in maps.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
            if ds.get(keyword) != source.get(keyword):
                report.problems.append(f"{quantity} map: {keyword} differs from the source")


def run_demo(workdir: Path, *, say: Callable[[str], None] = print, device: str = "auto") -> DemoReport:
    """Run the round trip in ``workdir`` (kept: phantom, node storage, received results)."""
    workdir = workdir.resolve()
    report = DemoReport(workdir)
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        report.seconds[name] = time.monotonic() - clock
        clock = time.monotonic()

    say("1/4 making a phantom subject (MPRAGE 192x192x150 DICOM, ground truth T1/T2/PD) ...")
    subject = phantom_subject(workdir)
    lap("phantom")
    sink = ResultSink(workdir / "received")
    sink_port = sink.start()
    config = NodeConfig(
        node=NodeSection(ae_title="SYNTHMRF", host="127.0.0.1", port=0, storage_dir=workdir / "node",
                         min_free_mb=256),
        series=SeriesSection(quiet_seconds=2.0),
        pipeline=PipelineSection(models_dir=workdir / "node" / "models", device=device),
        destinations=[Destination(name="demo-pacs", ae_title=DESTINATION_AE, host="127.0.0.1", port=sink_port)],
    )
    node = Node(config).start()
    try:
        files = sorted((subject / "mprage_dicom").iterdir())
        say(f"2/4 node listening on 127.0.0.1:{node.port}; sending {len(files)} instances by C-STORE ...")
        sent = store_files(files, Peer("SYNTHMRF", "127.0.0.1", node.port), SENDER_AE)
        if not sent.ok:
            report.problems.append(f"C-STORE to the node failed: {sent}")
            return report
        lap("send")
        say("3/4 the node assembles the series and runs the pipeline (registration, brain mask, seven U-Nets, "
            "matching; a few minutes on 2 cores, the first run also builds the dictionary) ...")
        deadline = time.monotonic() + TIMEOUT_S
        maps: dict[str, Path] = {}
        while time.monotonic() < deadline:
            maps = sink.maps()
            if {"T1", "T2"} <= set(maps) and node.idle():
                break
            failed = [j for j in node.store.jobs() if j.state in ("failed", "rejected")]
            if failed:
                report.problems.append(f"job {failed[0].id} {failed[0].state}: {failed[0].reason}")
                return report
            time.sleep(0.5)
        lap("process and send back")
        if not {"T1", "T2"} <= set(maps):
            report.problems.append(f"no T1/T2 Parametric Maps arrived within {TIMEOUT_S:.0f} s")
            return report
        report.received = sorted(sink.received)
        say(f"4/4 {len(report.received)} result instances arrived at the destination; checking them ...")
        _compare(report, subject, maps)
        outputs = sorted((workdir / "node").rglob("qc.png"))
        if outputs:
            report.qc_figure = outputs[-1]
            report.maps_dir = outputs[-1].parent
    finally:
        node.stop()
        sink.stop()
    return report
