"""Helpers for the node tests: synthetic MR series, a fast honest processor, real peers (and Redis) on loopback.

Not a test module. ``fast_processor`` is importable as ``node_support:fast_processor`` by a node
started in a subprocess (the tests put this folder on its PYTHONPATH).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicom_node.config import NodeConfig, config_from_mapping
from dicom_node.dimse.client import AssociationError, Peer, echo
from pipeline.dicom_series import SeriesRejected

TOOL_ENV = {**os.environ, "TCP_NODELAY": "1"}
VERIFICATION = UID("1.2.840.10008.1.1")
RESULT_DESCRIPTION = "test result"


# -- waiting and ports ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout_s: float, poll_s: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def tool(name: str) -> str:
    """Path of an external tool; a missing tool fails the test (never skips)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").is_file() else None)
    if path is None:
        pytest.fail(f"required external tool {name!r} is not installed")
    return path


def run_tool(args: Sequence[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool with TCP_NODELAY=1; stdout and stderr captured."""
    return subprocess.run([tool(args[0]), *args[1:]], env=TOOL_ENV, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


# -- synthetic series ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """A synthetic series written to disk."""

    files: list[Path]
    folder: Path
    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str


def mr_datasets(n: int = 40, size: int = 96, *, patient_id: str = "NODE001", seed: int = 0, mprage: bool = True,
                images_in_acquisition: bool = True, study_uid: str | None = None,
                series_uid: str | None = None) -> list[Dataset]:
    """``n`` single-frame MR Image datasets of one series, ``size`` x ``size``, Siemens-MPRAGE-like headers."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    base = rng.integers(100, 3000, size=(size, size), dtype=np.uint16)
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName = f"SECRET^NAME^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = "20240102"
        ds.StudyTime = ds.SeriesTime = "101010"
        ds.AccessionNumber = f"A{patient_id}"
        ds.StudyID = "1"
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        if mprage:
            ds.SeriesDescription = ds.ProtocolName = "t1_mprage_sag_p2_iso"
            ds.SequenceName = "*tfl3d1_16ns"
            ds.ScanningSequence = ["GR", "IR"]
            ds.MRAcquisitionType = "3D"
            ds.InversionTime = "900"
        else:
            ds.SeriesDescription = ds.ProtocolName = "t2_tse_tra"
            ds.SequenceName = "*tse2d1_15"
            ds.ScanningSequence = "SE"
            ds.MRAcquisitionType = "2D"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = "2300", "2.98", "9"
        if images_in_acquisition:
            ds.ImagesInAcquisition = n
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [-50.0 + 2.0 * k, -96.0, 96.0]
        ds.PixelSpacing = [2.0, 2.0]
        ds.SliceThickness = "2"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (base + np.uint16(k)).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def write_series(datasets: Sequence[Dataset], folder: Path) -> Series:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for ds in datasets:
        path = folder / f"MR{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    first = datasets[0]
    return Series(files, folder, str(first.PatientID), str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                  str(first.FrameOfReferenceUID))


def make_series(folder: Path, n: int = 40, size: int = 96, **kwargs: Any) -> Series:
    return write_series(mr_datasets(n, size, **kwargs), folder)


def legacy_multiframe(datasets: Sequence[Dataset], folder: Path) -> Series:
    """The same series as one Legacy Converted Enhanced MR object (highdicom)."""
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    first = datasets[0]
    frame = LegacyConvertedEnhancedMRImage(list(datasets), series_instance_uid=first.SeriesInstanceUID,
                                           series_number=3, sop_instance_uid=generate_uid(), instance_number=1)
    if "ReferencedSeriesSequence" in frame:
        del frame.ReferencedSeriesSequence
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "MF000001.dcm"
    frame.save_as(path, enforce_file_format=True)
    assert frame.SOPClassUID == LegacyConvertedEnhancedMRImageStorage
    return Series([path], folder, str(first.PatientID), str(first.StudyInstanceUID), str(first.SeriesInstanceUID),
                  str(first.FrameOfReferenceUID))


# -- the fast, honest test processor -------------------------------------------------------------------------------


PROCESSOR_DELAYING_IN = "test processor: delaying in process"  # logged with the worker's PID


@dataclass(frozen=True)
class FastResult:
    dicom_files: list[Path]


def fast_processor(input_dir: Path, out_dir: Path, *, model: str | None = None) -> FastResult:
    """One derived object per series: the mean of every frame, in a new series of the source study.

    Same patient, study and frame of reference; new SOP Instance and Series UIDs; SeriesDescription
    "test result"; ImageComments says how many source instances went in; it references the source
    series. Raises SeriesRejected for a folder that is not one MR image series. The environment
    variable NODE_TEST_PROCESSOR_DELAY_S makes it take that much longer (to stop a node mid-job);
    NODE_TEST_PROCESSOR_SWALLOW_STOP=1 makes the delay swallow the first interrupt, as a library that catches
    BaseException would.
    """
    delay = float(os.environ.get("NODE_TEST_PROCESSOR_DELAY_S", "0"))
    if delay:
        logging.getLogger(__name__).info("%s %d", PROCESSOR_DELAYING_IN, os.getpid())
    try:
        time.sleep(delay)
    except BaseException:
        if os.environ.get("NODE_TEST_PROCESSOR_SWALLOW_STOP") != "1":
            raise
        time.sleep(delay)
    files = sorted(p for p in Path(input_dir).iterdir() if p.is_file())
    if not files:
        raise SeriesRejected(f"{input_dir}: no files")
    datasets = [pydicom.dcmread(f) for f in files]
    if len({str(d.SeriesInstanceUID) for d in datasets}) != 1:
        raise SeriesRejected(f"{input_dir}: mixed series")
    frames = np.concatenate([d.pixel_array.reshape(-1, int(d.Rows), int(d.Columns)) for d in datasets])
    mean = frames.astype(np.float64).mean(axis=0).round().astype(np.uint16)
    src = datasets[len(datasets) // 2]
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "AccessionNumber", "StudyID", "FrameOfReferenceUID", "Modality"):
        if keyword in src:
            setattr(ds, keyword, src.data_element(keyword).value)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1003
    ds.InstanceNumber = 1
    ds.SeriesDescription = RESULT_DESCRIPTION
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ImageComments = f"from {len(frames)} frames of {len(datasets)} instances"
    ref = Dataset()
    ref.SeriesInstanceUID = src.SeriesInstanceUID
    ds.ReferencedSeriesSequence = [ref]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [0.0, -96.0, 96.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = mean.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = mean.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = Path(out_dir) / "dicom"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "result.dcm"
    ds.save_as(path, enforce_file_format=True)
    return FastResult([path])


def node_config(storage: Path, *, destinations: Sequence[dict[str, object]] = (), **sections: dict[str, object]
                ) -> NodeConfig:
    """A test configuration: loopback, a free port, the fast processor, short periods; ``sections`` override."""
    data: dict[str, Any] = {
        "node": {"host": "127.0.0.1", "port": 0, "storage_dir": str(storage), "min_free_mb": 0,
                 "drain_timeout_s": 10},
        "series": {"quiet_seconds": 1.5, "settle_seconds": 0.2},
        "jobs": {"poll_interval_s": 0.1, "retry_delay_s": 0.2},
        "pipeline": {"processor": "node_support:fast_processor"},
        "dispatch": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0, "connect_timeout_s": 2},
        "retention": {"sweep_interval_s": 3600, "high_water_free_mb": 0},
        "destinations": list(destinations),
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_mapping(data, environ={})


# -- a destination that records what it receives ------------------------------------------------------------------


@dataclass
class Received:
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str
    series_description: str
    comments: str
    referenced_series: str


@dataclass
class ResultSink:
    """A pynetdicom storage SCP on 127.0.0.1 that records every C-STORE it gets (duplicates included)."""

    port: int = 0
    ae_title: str = "SINK"
    received: list[Received] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _store(self, event: Event) -> int:
        ds = event.dataset
        refs = ds.get("ReferencedSeriesSequence") or [Dataset()]
        with self._lock:
            self.received.append(Received(
                str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID),
                str(ds.get("FrameOfReferenceUID", "")), str(ds.get("SeriesDescription", "")),
                str(ds.get("ImageComments", "")), str(refs[0].get("SeriesInstanceUID", ""))))
        return 0x0000

    def start(self, refuse: Sequence[str] = ()) -> ResultSink:
        """Listen; ``refuse``: SOP classes it does not accept (as a PACS without Parametric Map support)."""
        ae = AE(self.ae_title)
        ae.supported_contexts = [cx for cx in AllStoragePresentationContexts if cx.abstract_syntax not in refuse]
        ae.add_supported_context(VERIFICATION)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def results(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.series_description == RESULT_DESCRIPTION]

    def destination(self, name: str = "sink") -> dict[str, object]:
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}


@contextmanager
def result_sink(port: int = 0) -> Iterator[ResultSink]:
    sink = ResultSink(port=port).start()
    try:
        yield sink
    finally:
        sink.stop()


# -- Orthanc -------------------------------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """A real Orthanc on loopback (DICOM and HTTP on free ports), configured in a temp folder."""

    folder: Path
    node_port: int
    dicom_port: int = 0
    http_port: int = 0
    ae_title: str = "ORTHANC"
    extra_config: dict[str, object] = field(default_factory=dict)  # e.g. LuaScripts, StableAge
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.dicom_port = self.dicom_port or free_port()
        self.http_port = self.http_port or free_port()
        db = self.folder / "db"
        db.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "synthmrf-test", "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "StorageDirectory": str(db), "IndexDirectory": str(db),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": {"synthmrf": ["SYNTHMRF", "127.0.0.1", self.node_port]},
            "ConcurrentJobs": 1, "Plugins": [], "StorageCompression": False,
            **self.extra_config,
        }
        config = {k: v for k, v in config.items() if v is not None}
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen([tool("Orthanc"), str(path)], stdout=log, stderr=subprocess.STDOUT,
                                        env=TOOL_ENV)
        wait_until(self._ready, 30.0, 0.1, "Orthanc REST API")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.process.returncode}: {(self.folder / 'orthanc.log').read_text()}")
        try:
            self.get("/system")
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object) -> Any:
        """POST JSON (or raw bytes, e.g. a DICOM file to /instances)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def series_tags(self, description: str = RESULT_DESCRIPTION) -> list[dict[str, str]]:
        """Simplified tags of one instance of each series with this SeriesDescription."""
        found = self.post("/tools/find", {"Level": "Series", "Query": {"SeriesDescription": description}})
        out = []
        for series_id in found:
            instances = self.get(f"/series/{series_id}/instances")
            tags = self.get(f"/instances/{instances[0]['ID']}/simplified-tags")
            tags["_instances"] = len(instances)
            out.append(tags)
        return out

    def stop(self) -> None:
        if self.process is not None:
            end_process(self.process, 15)
            self.process = None

    def destination(self, name: str = "pacs") -> dict[str, object]:
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.dicom_port}


def end_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


# -- TLS ------------------------------------------------------------------------------------------------------------


def ca_signed(folder: Path, names: list[str]) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A CA and, per name, a certificate it signed (CN and DNS SAN = the name; 127.0.0.1 also gets an IP SAN)."""
    ca_cert, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert), "-days", "1", "-subj", "/CN=test CA"],
                   check=True, capture_output=True)
    issued = {}
    for name in names:
        key, csr, cert = folder / f"{name}-key.pem", folder / f"{name}.csr", folder / f"{name}.pem"
        san = f"IP:{name}" if name.replace(".", "").isdigit() else f"DNS:{name}"
        subprocess.run([tool("openssl"), "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"], check=True, capture_output=True)
        ext = folder / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\n")
        subprocess.run([tool("openssl"), "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                        "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext)],
                       check=True, capture_output=True)
        issued[name] = (cert, key)
    return ca_cert, issued


# -- synthmrf serve / worker as subprocesses --------------------------------------------------------------------------

TESTS = Path(__file__).resolve().parent
SYNTHMRF = Path(sys.executable).with_name("synthmrf")


def test_environment(**env: str) -> dict[str, str]:
    """The environment of a synthmrf subprocess: ``node_support`` importable (the fast processor)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **env}


class Serve:
    """One ``synthmrf serve`` process with its log file."""

    def __init__(self, config: Path, log: Path, port: int, **env: str) -> None:
        self.port = port
        self.log = log
        environ = test_environment(**env)
        self.proc = subprocess.Popen([str(SYNTHMRF), "serve", "--config", str(config)], env=environ,
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT)
        wait_until(self._answers, 60, 0.1, f"synthmrf serve to answer C-ECHO (log: {log})")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"synthmrf serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return echo(Peer("SYNTHMRF", "127.0.0.1", self.port), "PROBE", timeout_s=2.0) == 0
        except (AssociationError, OSError):
            return False

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout_s: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)




class Worker:
    """One ``synthmrf worker`` process (its own process group: kill it with its children, as a lost machine)."""

    def __init__(self, config: Path, log: Path, **env: str) -> None:
        self.log = log
        self.proc = subprocess.Popen([str(SYNTHMRF), "worker", "--config", str(config)], env=test_environment(**env),
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)

    def kill9_group(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout_s: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)


# -- PostgreSQL ------------------------------------------------------------------------------------------------------


def postgres_tool(name: str) -> str:
    """A PostgreSQL server binary (on PATH, or Debian's /usr/lib/postgresql/<version>/bin); missing fails."""
    found = shutil.which(name) or max(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), default=None)
    if found is None:
        pytest.fail(f"{name} not found: install postgresql (scripts/setup.sh --test does)")
    return found


@dataclass
class PostgresServer:
    """A real PostgreSQL on 127.0.0.1 (a free port), its cluster in a fresh folder; as root it runs as the
    ``postgres`` user (PostgreSQL refuses root), in a folder that user can reach (pytest's are root-only)."""

    port: int = 0
    folder: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://synthmrf@127.0.0.1:{self.port}/synthmrf"

    def start(self) -> PostgresServer:
        import psycopg

        self.port = self.port or free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.folder = Path(tempfile.mkdtemp(prefix="synthmrf-pg-"))
        if self.user is not None:
            shutil.chown(self.folder, self.user, self.user)
        data = self.folder / "data"
        init = subprocess.run([postgres_tool("initdb"), "-D", str(data), "-U", "synthmrf", "--auth=trust", "-E",
                               "UTF8", "--no-sync"], user=self.user, capture_output=True, timeout=120)
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stderr.decode(errors='replace')}")
        with (self.folder / "postgres.log").open("wb") as log:
            self.process = subprocess.Popen(
                [postgres_tool("postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.folder),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=60"],
                user=self.user, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"postgres exited with {self.process.returncode}: "
                            f"{(self.folder / 'postgres.log').read_text()}")  # type: ignore[operator]
            try:
                with psycopg.connect(f"postgresql://synthmrf@127.0.0.1:{self.port}/postgres", connect_timeout=1,
                                     autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                return False

        wait_until(ready, 60.0, 0.1, "postgres to accept connections")
        with psycopg.connect(f"postgresql://synthmrf@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE synthmrf")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()
