"""Benchmark: C-STORE ingest rate of the synthmrf node vs dcmtk storescp vs Orthanc, same files, same storescu.

Run on demand: ``python bench/bench_node.py [--count 300] [--size 256] [--rounds 3]``.
Each round sends a fresh set of ``count`` single-frame MR instances (``size`` x ``size``, 16 bit) with
one ``storescu`` association to each receiver in turn (interleaved, so a noisy neighbour hurts all
alike); every process runs with TCP_NODELAY=1 and only loopback traffic. The node runs as
``synthmrf serve`` (twice: with its event-driven reactors, and with pynetdicom's stock polling ones)
and acknowledges an instance only after its bytes are fsynced; storescp and Orthanc write the image
files without fsync (Orthanc syncs its SQLite index). Prints instances/s (median and best of the
rounds) and MB/s per receiver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None)
    if path is None:
        sys.exit(f"bench_node: {tool} is not installed")
    return path


def make_files(folder: Path, count: int, size: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
    files = []
    for k in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "BENCH^NODE", f"BENCH{seed}", "MR"
        ds.SeriesDescription, ds.MRAcquisitionType, ds.ScanningSequence = "bench_t2_2d", "2D", "SE"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, float(k)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1, 1]
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{k:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def wait_echo(port: int, aet: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_node: receiver on port {port} exited with {proc.returncode}")
        r = subprocess.run([need("echoscu"), "-aec", aet, "127.0.0.1", str(port)], env=ENV, capture_output=True,
                           check=False)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    sys.exit(f"bench_node: no C-ECHO answer on port {port}")


def start_node(work: Path, event_driven: bool = True) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    name = "node" if event_driven else "node-stock"
    config = work / f"{name}.toml"
    config.write_text(f'[node]\nhost = "127.0.0.1"\nport = {port}\nstorage_dir = "{work / name}"\n'
                      f"min_free_mb = 512\nevent_driven = {str(event_driven).lower()}\n"
                      "[series]\nquiet_seconds = 3600\nearly_trigger = false\n"
                      '[logging]\nlevel = "WARNING"\n')
    synthmrf = Path(sys.executable).with_name("synthmrf")
    proc = subprocess.Popen([str(synthmrf), "serve", "--config", str(config)], env=ENV,
                            stdout=(work / f"{name}.log").open("wb"), stderr=subprocess.STDOUT)
    return proc, port, "SYNTHMRF"


def start_stock_node(work: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    return start_node(work, event_driven=False)


def start_storescp(work: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen([need("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)], env=ENV,
                            stdout=(work / "storescp.log").open("wb"), stderr=subprocess.STDOUT)
    return proc, port, "STORESCP"


def start_orthanc(work: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port, http = free_port(), free_port()
    db = work / "orthanc"
    db.mkdir()
    config = {"Name": "bench", "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
              "StorageDirectory": str(db), "IndexDirectory": str(db), "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "StorageCompression": False,
              "Plugins": []}
    (work / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen([need("Orthanc"), str(work / "orthanc.json")], env=ENV,
                            stdout=(work / "orthanc.log").open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=2).read()
            break
        except OSError:
            time.sleep(0.2)
    return proc, port, "ORTHANC"


def send(files: list[Path], port: int, aet: str) -> float:
    start = time.perf_counter()
    r = subprocess.run([need("storescu"), "-aec", aet, "127.0.0.1", str(port), *map(str, files)], env=ENV,
                       capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        sys.exit(f"bench_node: storescu to {aet} failed ({r.returncode}): {r.stderr[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="instances per round")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each instance")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        work = Path(tmp)
        sets = [make_files(work / f"set{r}", args.count, args.size, seed=r) for r in range(args.rounds)]
        mb = sum(f.stat().st_size for f in sets[0]) / 1e6
        receivers = {}
        for name, start in (("synthmrf node (fsync, event-driven)", start_node),
                            ("synthmrf node (fsync, stock reactors)", start_stock_node),
                            ("dcmtk storescp (no fsync)", start_storescp), ("Orthanc (no file fsync)", start_orthanc)):
            proc, port, aet = start(work)
            wait_echo(port, aet, proc)
            receivers[name] = (proc, port, aet)
        times: dict[str, list[float]] = {name: [] for name in receivers}
        try:
            for files in sets:
                for name, (_, port, aet) in receivers.items():
                    times[name].append(send(files, port, aet))
        finally:
            for proc, _, _ in receivers.values():
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"C-STORE ingest, one storescu association per round, {args.count} instances of {args.size}x{args.size} "
          f"({mb:.1f} MB), {args.rounds} rounds, TCP_NODELAY=1, {os.cpu_count()} CPU cores")
    print(f"{'receiver':<40} {'median inst/s':>14} {'best inst/s':>12} {'median MB/s':>12}")
    for name, secs in times.items():
        med = statistics.median(secs)
        print(f"{name:<40} {args.count / med:>14.0f} {args.count / min(secs):>12.0f} {mb / med:>12.1f}")


if __name__ == "__main__":
    main()
