"""``synthmrf process`` benchmark (run on demand, prints tables): seconds and peak memory per stage for a
192x192x150 MPRAGE DICOM series (the phantom world's full-resolution sagittal acquisition).

    .venv/bin/python bench/bench_pipeline.py [--workdir DIR] [--runs 2] [--compare-crop]

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
from pathlib import Path

import numpy as np
import torch

from pipeline.model.inference import features_for, inference_dtype, resolve_backend, synthesise_channels
from pipeline.model.package import SHIPPED_DIR, load_package
from pipeline.mrf.coefficients import from_channels
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
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    subject = _subject(workdir)
    package = load_package(next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir()))
    dtype = inference_dtype(torch.device("cpu"), ProcessOptions().precision)
    print(f"torch threads {torch.get_num_threads()}; inference {dtype} with "
          f"{resolve_backend(ProcessOptions().backend, torch.device('cpu'), dtype)} (CPU bf16 native: "
          f"{dtype == torch.bfloat16}); input {subject / 'mprage_dicom'}")
    runs = []
    for r in range(args.runs):
        start = time.perf_counter()
        result = process_series(subject / "mprage_dicom", workdir / f"result-{r}", package)
        runs.append((time.perf_counter() - start, result.stages))
    print(f"\n{'stage':<10}" + "".join(f" {'run ' + str(r + 1) + ' s':>9} {'peak MB':>8}" for r in range(len(runs))))
    for name in runs[0][1]:
        print(f"{name:<10}" + "".join(f" {s[name]['seconds']:>9.2f} {s[name]['peak_rss_mb']:>8.0f}" for _, s in runs))
    print(f"{'total':<10}" + "".join(f" {total:>9.2f} {'':>8}" for total, _ in runs))

    if args.compare_crop:
        working = workdir / "result-crop"
        process_series(subject / "mprage_dicom", working, package, options=ProcessOptions(keep_working=True))
        volume, _ = load_volume(working / "working" / "mprage.nii.gz")
        mask = load_volume(working / "working" / "brain_mask.nii.gz")[0] > 0
        normalised = normalise(volume, mask, package.normalisation)
        matcher = _matcher(package.sequence, "cpu")
        maps, seconds = {}, {}
        for crop in (True, False):
            start = time.perf_counter()
            channels = synthesise_channels(normalised, mask, package, crop=crop,
                                           protocol=features_for(package, PAPER_PROTOCOL))
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
