"""Benchmark: the node's memory while it receives one large instance, and the ingest rate of small ones.

Run on demand: ``python bench/bench_ingress_memory.py [--sizes-mb 400 1000] [--count 300]``.
Starts ``synthmrf serve`` (receive only: ``jobs.workers = 0``), sends each large MR instance (one
multi-frame image of the given size, 16 bit) with dcmtk's ``storescu`` and samples the node's resident
memory every 10 ms; then sends ``count`` 256x256 instances in one association (instances/s). Every
process runs with TCP_NODELAY=1 on loopback. Prints one table: size, seconds, MB/s, RSS before and peak,
and the peak's rise as a fraction of the instance.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).parent))
from bench_node import ENV, free_port, make_files, need, wait_echo


def large_instance(path: Path, megabytes: int) -> Path:
    """One MR image of ``megabytes`` MB of 16-bit pixels (512 x 512 frames), written without holding it twice."""
    frames = max(1, megabytes * 2**20 // (512 * 512 * 2))
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "BENCH^LARGE", "BENCHLARGE", "MR"
    ds.SeriesDescription, ds.MRAcquisitionType = "bench_large", "3D"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros(frames * 512 * 512, np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


class PeakRss:
    """Samples a process's resident memory in a thread; ``peak`` in MiB."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[400, 1000])
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args()
    storescu = need("storescu")
    with tempfile.TemporaryDirectory(prefix="bench-ingress-") as tmp:
        work = Path(tmp)
        port = free_port()
        config = work / "node.toml"
        config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\nstorage_dir = "{work / "node"}"\n'
                          "min_free_mb = 512\n[jobs]\nworkers = 0\n"
                          "[ingress]\nkeep_non_candidates = true\nresult_space_factor = 0\nmax_pixels = 1073741824\n"
                          "[series]\nquiet_seconds = 3600\nearly_trigger = false\n"
                          '[logging]\nlevel = "WARNING"\n')
        synthmrf = Path(sys.executable).with_name("synthmrf")
        node = subprocess.Popen([str(synthmrf), "serve", "--config", str(config)], env=ENV,
                                stdout=(work / "node.log").open("wb"), stderr=subprocess.STDOUT)
        try:
            wait_echo(port, "SYNTHMRF", node)
            rows = []
            for mb in args.sizes_mb:
                f = large_instance(work / f"large-{mb}.dcm", mb)
                size = f.stat().st_size / 2**20
                time.sleep(1.0)
                with PeakRss(node.pid) as rss:
                    before = rss.now()
                    start = time.perf_counter()
                    r = subprocess.run([storescu, "-aec", "SYNTHMRF", "127.0.0.1", str(port), str(f)], env=ENV,
                                       capture_output=True, text=True)
                    seconds = time.perf_counter() - start
                if r.returncode != 0:
                    sys.exit(f"bench_ingress_memory: storescu failed for {mb} MB: {(r.stdout + r.stderr)[-500:]}")
                f.unlink()
                rows.append((f"{size:,.0f} MB instance", seconds, size / seconds, before, rss.peak,
                             (rss.peak - before) / size))
            files = make_files(work / "small", args.count, 256, seed=1)
            with PeakRss(node.pid) as rss:
                before = rss.now()
                start = time.perf_counter()
                r = subprocess.run([storescu, "-aec", "SYNTHMRF", "127.0.0.1", str(port), *map(str, files)], env=ENV,
                                   capture_output=True, text=True)
                seconds = time.perf_counter() - start
            if r.returncode != 0:
                sys.exit(f"bench_ingress_memory: storescu failed (small instances): {(r.stdout + r.stderr)[-500:]}")
            small_mb = sum(p.stat().st_size for p in files) / 2**20
            rows.append((f"{args.count} x 256x256 ({args.count / seconds:.0f} inst/s)", seconds, small_mb / seconds,
                         before, rss.peak, (rss.peak - before) / small_mb))
        finally:
            node.terminate()
            node.wait(60)
    print(f"{'sent':<32} {'s':>7} {'MB/s':>7} {'RSS before MiB':>15} {'peak MiB':>9} {'rise/size':>10}")
    for name, seconds, rate, before, peak, ratio in rows:
        print(f"{name:<32} {seconds:7.1f} {rate:7.0f} {before:15.0f} {peak:9.0f} {ratio:10.3f}")


if __name__ == "__main__":
    main()
