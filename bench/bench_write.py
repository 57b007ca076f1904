"""Benchmark of the pipeline's ``write`` stage (run on demand, prints a table): the DICOM results of one
192x192x150 MPRAGE series (the phantom world's full-resolution sagittal grid) as ``synthmrf process`` writes
them: a Parametric Map per quantity (T1, T2) and classic derived MR series of T1, T2, Q and the five synthetic
contrasts, 150 images each (1,202 files).

    .venv/bin/python bench/bench_write.py [--workdir DIR] [--runs 3] [--baseline DIR]

Per series kind: build seconds (``build_parametric_map``, ``build_derived_series``), write seconds
(``write_datasets`` into a fresh folder: encoding, flushing to disk, renaming), files and MB; then the whole
stage, ``write_result_series``, end to end (validation, source headers, building and writing everything). Each
run is a fresh process, timed after one untimed build that loads highdicom's tables (as in a node's worker);
the table shows the medians of the runs.

``--baseline DIR``: also measure an earlier version, a source tree made with ``git archive <rev> pipeline
training | tar -x -C DIR``, the same way, its runs interleaved with the current code's (so that other load on
the machine hits both alike), and print the ratios. A tree without ``write_datasets`` writes file by file with
its ``write_dataset_atomic``, as its ``write_result_series`` did.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from pipeline.contrasts import DEFAULT_CONTRASTS, synthesise
from pipeline.dicom_output import Provenance, build_derived_series, build_parametric_map, read_source_headers, writer
from pipeline.dicom_output.derived_series import DerivedMRImage
from pipeline.dicom_output.quantities import CONTRAST_SCALE, QUALITY, QUANTITIES, contrast_spec, result_series_number
from pipeline.dicom_series import read_series

SEED = 11
PROVENANCE = Provenance("synthmrf-unet", "1.2.0", "0123456789abcdef" * 4, "0.1.0")
STAGE = "whole stage (write_result_series)"


@dataclass(frozen=True)
class Row:
    kind: str
    files: int
    megabytes: float
    build_s: float | None  # None: the whole stage (build and write in one)
    write_s: float


def _source(workdir: Path) -> Path:
    """A classic 192x192x150 MPRAGE series (written once per workdir)."""
    from training.phantom.dicom_series import make_identity, write_mprage_series
    from training.phantom.geometry import acquisition_grid
    from training.phantom.mprage import MprageProtocol

    folder = workdir / "source"
    if not folder.is_dir():
        grid = acquisition_grid()
        rng = np.random.default_rng(SEED)
        image = rng.integers(0, 4000, grid.shape).astype(np.uint16)
        write_mprage_series(image, grid, folder, protocol=MprageProtocol(),
                            identity=make_identity("sub-001", "bench-write", rng))
    return folder


def _maps(shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """T1, T2 (ms), PD and Q volumes with brain-like values."""
    rng = np.random.default_rng(SEED)
    tissue = rng.choice(3, shape, p=[0.45, 0.40, 0.15])
    spread = np.exp(rng.normal(0, 0.15, shape))
    return {"T1": (np.array([830.0, 1500.0, 4000.0])[tissue] * spread).astype(np.float32),
            "T2": (np.array([80.0, 100.0, 1200.0])[tissue] * spread).astype(np.float32),
            "PD": np.array([0.69, 0.8, 1.0], np.float32)[tissue],
            "Q": rng.uniform(0.8, 1.0, shape).astype(np.float32)}


def _write(files: list[tuple[Path, Dataset]]) -> None:
    if hasattr(writer, "write_datasets"):
        writer.write_datasets(files)
    else:  # a baseline from before write_datasets
        for path, ds in files:
            writer.write_dataset_atomic(ds, path)


def _megabytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def measure(source: Path, out: Path) -> list[Row]:
    """One run in this process: a row per series kind, then the whole stage."""
    series = read_series(source)
    maps = _maps(series.grid.shape)
    contrasts = [(c, synthesise(c, maps["T1"], maps["T2"], maps["PD"])) for c in DEFAULT_CONTRASTS]
    headers = read_source_headers(series)
    build_derived_series(series, maps["T1"], "T1", PROVENANCE, series_number=311)  # highdicom loads its tables
    builds: list[tuple[str, Callable[[], Dataset | list[DerivedMRImage]]]] = []
    for q in ("T1", "T2"):
        builds.append((f"parametric map {q}", partial(
            build_parametric_map, series, maps[q], q, PROVENANCE, source_images=headers,
            series_number=result_series_number(series, QUANTITIES[q], derived=False))))
    for q in ("T1", "T2"):
        builds.append((f"derived {q}", partial(
            build_derived_series, series, maps[q], q, PROVENANCE,
            series_number=result_series_number(series, QUANTITIES[q], derived=True))))
    builds.append(("derived Q", partial(build_derived_series, series, maps["Q"], QUALITY, PROVENANCE,
                                        series_number=result_series_number(series, QUALITY, derived=True))))
    for index, (contrast, signal) in enumerate(contrasts):
        values = signal * CONTRAST_SCALE
        spec = contrast_spec(contrast, index, values)
        builds.append((f"synthetic {contrast.name}", partial(
            build_derived_series, series, values, spec, PROVENANCE,
            series_number=result_series_number(series, spec, derived=True),
            series_description=f"synthMRF synthetic {contrast.name}, not acquired",
            derivation=PROVENANCE.contrast_derivation(contrast))))
    rows = []
    for kind, build in builds:
        folder = out / kind.replace(" ", "_")
        folder.mkdir(parents=True)
        start = time.perf_counter()
        result = build()
        built = time.perf_counter()
        files = [(folder / f"{n:04d}.dcm", ds) for n, ds in enumerate(result if isinstance(result, list) else [result])]
        _write(files)
        rows.append(Row(kind, len(files), _megabytes([p for p, _ in files]), built - start,
                        time.perf_counter() - built))
    start = time.perf_counter()
    paths = writer.write_result_series(series, maps, out / "stage", PROVENANCE, quality=maps["Q"], contrasts=contrasts)
    rows.append(Row(STAGE, len(paths), _megabytes(paths), None, time.perf_counter() - start))
    return rows


def _run(tree: Path | None, source: Path, workdir: Path) -> list[Row]:
    """One run in a fresh process, importing ``pipeline`` from ``tree`` (None: this checkout)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    out = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", str(source), str(out)], env=env, check=True,
                              capture_output=True, text=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return [Row(**row) for row in json.loads(done.stdout.splitlines()[-1])]


def _median(runs: list[list[Row]], kind: str, key: str) -> float | None:
    values = [getattr(row, key) for run in runs for row in run if row.kind == kind]
    return None if None in values else statistics.median(values)


def _cell(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _table(runs: dict[str, list[list[Row]]]) -> None:
    labels = list(runs)
    current = labels[-1]
    header = [f"{what} {label}" for what in ("build s", "write s") for label in labels]
    if len(labels) == 2:
        header += ["build x", "write x"]
    print(f"{'series kind':<34} {'files':>5} {'MB':>6} " + " ".join(f"{h:>14}" for h in header)
          + f" {f'ms/file {current}':>14}")
    for row in runs[current][0]:
        medians = {(key, label): _median(runs[label], row.kind, key) for key in ("build_s", "write_s")
                   for label in labels}
        cells = [_cell(medians[key, label]) for key in ("build_s", "write_s") for label in labels]
        if len(labels) == 2:
            for key in ("build_s", "write_s"):
                before, after = medians[key, labels[0]], medians[key, labels[1]]
                cells.append(_cell(None if before is None or not after else before / after, "{:.1f}x"))
        seconds = sum(medians[key, current] or 0.0 for key in ("build_s", "write_s"))
        print(f"{row.kind:<34} {row.files:>5} {row.megabytes:>6.1f} " + " ".join(f"{c:>14}" for c in cells)
              + f" {seconds / row.files * 1e3:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the source series here.")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, default=None, help="Source tree of an earlier version.")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps([asdict(row) for row in measure(*args.worker)]))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-write-"))
    source = _source(workdir)
    trees = {"before": args.baseline, "after": None} if args.baseline else {"now": None}
    runs: dict[str, list[list[Row]]] = {label: [] for label in trees}
    for r in range(args.runs):
        for label in list(trees) if r % 2 == 0 else list(reversed(trees)):  # interleaved, each first in turn
            runs[label].append(_run(trees[label], source, workdir))
            print(f"run {r + 1} {label}: whole stage {runs[label][-1][-1].write_s:.1f} s", flush=True)
    print(f"\n{source}: {len(list(source.iterdir()))} files; medians of {args.runs} runs\n")
    _table(runs)


if __name__ == "__main__":
    main()
