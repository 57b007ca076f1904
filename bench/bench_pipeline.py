"""``synthmrf process`` benchmark (run on demand, prints tables): seconds and peak memory per stage for a
192x192x150 MPRAGE DICOM series (the phantom world's full-resolution sagittal acquisition).

    .venv/bin/python bench/bench_pipeline.py [--workdir DIR] [--runs 2] [--compare-crop] [--compare-precision]
        [--device auto|cpu|cuda]

``--compare-precision`` runs the networks once more in float32 and reports how far the chosen precision (bfloat16
where the hardware has it) moves the matched maps, in dictionary steps. ``--device cuda`` (or ``auto`` on a machine
with CUDA) gives the GPU column.

The first run of a fresh process pays for building the dictionary and its clusters unless they are in
the cache (``SYNTHMRF_CACHE_DIR``); later runs show the steady state of a node's worker. Peak RSS is the
process's high-water mark at the end of each stage (ru_maxrss), so it only grows. ``--compare-crop``
also runs the networks on whole 256x256 slices and reports the time saved by cropping to the brain and
the change it makes to the matched T1/T2 inside the brain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.model.inference import (
    features_for,
    inference_dtype,
    network_input,
    resolve_backend,
    synthesise_channels,
)
from pipeline.model.package import SHIPPED_DIR, load_package
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.epg import resolve_device
from pipeline.mrf.matching import match_volume
from pipeline.normalise import normalise
from pipeline.process import ProcessOptions, _matcher, process_series
from pipeline.protocol import PAPER_PROTOCOL
from pipeline.volume_io import load_volume


def _subject(workdir: Path) -> Path:
    from training.phantom.dataset import make_dataset
    from training.phantom.subject import PhantomOptions

    if not (workdir / "sub-001" / "mprage_dicom").is_dir():
        make_dataset(1, workdir, seed=123, options=PhantomOptions(mrf=False), progress=False)
    return workdir / "sub-001"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the phantom and results here.")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--compare-crop", action="store_true")
    parser.add_argument("--compare-precision", action="store_true",
                        help="Also match the maps of float32 inference and report how far the chosen precision moves "
                             "them, in dictionary steps.")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N].")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    subject = _subject(workdir)
    package = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    device = resolve_device(args.device)
    options = ProcessOptions(device=str(device))
    dtype = inference_dtype(device, options.precision)
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{gpu}; torch threads {torch.get_num_threads()}; inference {dtype} with "
          f"{resolve_backend(options.backend, device, dtype)} (bf16 native: {dtype == torch.bfloat16}); "
          f"input {subject / 'mprage_dicom'}")
    runs = []
    for r in range(args.runs):
        start = time.perf_counter()
        result = process_series(subject / "mprage_dicom", workdir / f"result-{r}", package, options=options)
        runs.append((time.perf_counter() - start, result.stages))
    print(f"\n{'stage':<10}" + "".join(f" {'run ' + str(r + 1) + ' s':>9} {'peak MB':>8}" for r in range(len(runs))))
    for name in runs[0][1]:
        print(f"{name:<10}" + "".join(f" {s[name]['seconds']:>9.2f} {s[name]['peak_rss_mb']:>8.0f}" for _, s in runs))
    print(f"{'total':<10}" + "".join(f" {total:>9.2f} {'':>8}" for total, _ in runs))

    if not (args.compare_crop or args.compare_precision):
        return
    working = workdir / "result-working"
    process_series(subject / "mprage_dicom", working, package, options=replace(options, keep_working=True))
    volume, _ = load_volume(working / "working" / "mprage.nii.gz")
    mask = load_volume(working / "working" / "brain_mask.nii.gz")[0] > 0
    normalised = network_input(package, normalise(volume, mask, package.normalisation), mask, PAPER_PROTOCOL)
    matcher = _matcher(package.sequence, str(device))
    protocol = features_for(package, PAPER_PROTOCOL)

    if args.compare_precision:
        maps, seconds = {}, {}
        for precision in ("float32", options.precision):
            start = time.perf_counter()
            channels = synthesise_channels(normalised, mask, package, device=str(device), precision=precision,
                                           protocol=protocol)
            seconds[precision] = time.perf_counter() - start
            maps[precision] = match_volume(from_channels(channels), mask, matcher)
        step = np.log1p(matcher.dictionary.grid.step)
        print(f"\ninference float32 {seconds['float32']:.1f} s, {options.precision} ({dtype}) "
              f"{seconds[options.precision]:.1f} s ({seconds['float32'] / seconds[options.precision]:.2f}x)")
        for q in ("T1", "T2"):
            steps = np.abs(np.log(maps[options.precision][q][mask] / maps["float32"][q][mask])) / step
            print(f"{q}: {dtype} vs float32 in the brain, dictionary steps ({matcher.dictionary.grid.step:.0%}): "
                  f"median {np.median(steps):.2f}, 99th percentile {np.percentile(steps, 99):.2f}, "
                  f"voxels beyond one step {np.mean(steps > 1.01):.2%}")

    if args.compare_crop:
        maps, seconds = {}, {}
        for crop in (True, False):
            start = time.perf_counter()
            channels = synthesise_channels(normalised, mask, package, crop=crop, device=str(device),
                                           protocol=protocol)
            seconds[crop] = time.perf_counter() - start
            maps[crop] = match_volume(from_channels(channels), mask, matcher)
        print(f"\ninference on brain crops {seconds[True]:.1f} s, on whole slices {seconds[False]:.1f} s "
              f"({seconds[False] / seconds[True]:.2f}x)")
        for q in ("T1", "T2"):
            change = np.abs(maps[True][q][mask] / maps[False][q][mask] - 1)
            print(f"{q}: crop vs whole-slice relative change in the brain: median {np.median(change):.2e}, "
                  f"99th percentile {np.percentile(change, 99):.2e}, max {change.max():.2e}")


if __name__ == "__main__":
    main()
