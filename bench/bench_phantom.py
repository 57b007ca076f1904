"""Benchmark: seconds per phantom subject at full resolution (truths + MRF + MPRAGE NIfTI and DICOM).

Run on demand: ``python bench/bench_phantom.py [--subjects N] [--workers W] [--style classic]``.
Prints a table: one-off set-up (template, dictionary), then wall time per subject and the projection
for the paper's 35 training and test subjects.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, load_sequence
from training.phantom.anatomy import load_template
from training.phantom.dataset import make_dataset
from training.phantom.dicom_series import DicomStyle
from training.phantom.subject import PhantomOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--style", choices=[s.value for s in DicomStyle], default="classic")
    args = parser.parse_args()

    start = time.perf_counter()
    load_template()
    template_s = time.perf_counter() - start
    start = time.perf_counter()
    load_or_build_dictionary(load_sequence(DEFAULT_SEQUENCE), rank=4, device="cpu")
    dictionary_s = time.perf_counter() - start

    options = PhantomOptions(style=DicomStyle(args.style))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_dataset(args.subjects, Path(tmp), seed=0, options=options, workers=args.workers, progress=False)
        total_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
    per_subject = total_s / args.subjects
    rows = [
        ("template (once per process)", f"{template_s:.1f} s"),
        ("dictionary load/build (once)", f"{dictionary_s:.1f} s"),
        (f"{args.subjects} subjects, {args.workers} worker(s), {args.style}", f"{total_s:.1f} s"),
        ("wall time per subject", f"{per_subject:.1f} s"),
        ("projected 35 subjects", f"{35 * per_subject / 60:.1f} min"),
        ("disk per subject", f"{size_mb / args.subjects:.0f} MB"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'phantom benchmark (full grids: MRF 256^3, MPRAGE 192x192x150)':<{width + 12}}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")


if __name__ == "__main__":
    main()
