"""The node in-process with real peers on loopback: dcmtk storescu/echoscu and pynetdicom as senders,
a pynetdicom storage SCP as the destination that records every result it receives."""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pydicom
import pytest
from node_support import (
    TOOL_ENV,
    ResultSink,
    Series,
    fast_processor,
    legacy_multiframe,
    make_series,
    mr_datasets,
    node_config,
    result_sink,
    run_tool,
    tool,
    wait_until,
    write_series,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config

from dicom_node.dimse.client import AssociationError, Peer, echo
from dicom_node.dimse.status import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
)
from dicom_node.node import Node
from dicom_node.node import spool as spool_module
from dicom_node.node.instances import InstanceInfo, patient_key
from dicom_node.node.job_store import JobState
from dicom_node.node.retention import sweep
from dicom_node.node.series_identity import SeriesIdentities

N = 40


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    """One 40-slice 96x96 MPRAGE-like series, built once for the module."""
    return make_series(tmp_path_factory.mktemp("mprage"), n=N, patient_id="SCP001", seed=1)


@pytest.fixture
def sink() -> Iterator[ResultSink]:
    with result_sink() as s:
        yield s


StartNode = Callable[..., Node]


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    nodes: list[Node] = []

    def start(sink: ResultSink | None = None, **sections: Any) -> Node:
        destinations = [sink.destination()] if sink is not None else []
        cfg = node_config(tmp_path / f"node{len(nodes)}", destinations=destinations, **sections)
        node = Node(cfg, processor=fast_processor).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop(drain=False)


def storescu(node: Node, files: list[Path], aet: str = "STORESCU", *options: str) -> subprocess.CompletedProcess[str]:
    return run_tool(["storescu", *options, "-aet", aet, "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                     *map(str, files)])


def echoscu(node: Node, aet: str = "ECHOSCU", called: str = "SYNTHMRF") -> subprocess.CompletedProcess[str]:
    return run_tool(["echoscu", "-aet", aet, "-aec", called, "127.0.0.1", str(node.port)])


def disk_usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def spooled(node: Node) -> list[Path]:
    return sorted(p for p in (node.storage_dir / "series").rglob("*.dcm"))


def test_series_in_result_out(start_node: StartNode, sink: ResultSink, series: Series) -> None:
    node = start_node(sink)
    assert echoscu(node).returncode == 0
    r = storescu(node, series.files)
    assert r.returncode == 0, r.stderr
    [result] = wait_until(sink.results, 30, what="the result")
    assert (result.patient_id, result.study_uid, result.frame_of_reference_uid) == (
        series.patient_id, series.study_uid, series.frame_of_reference_uid)
    assert result.series_uid != series.series_uid
    assert result.referenced_series == series.series_uid
    assert result.comments == f"from {N} frames of {N} instances"
    wait_until(node.idle, 10, what="the node to be idle")
    [job] = node.store.jobs()
    assert (job.state, job.instances, job.version) == (JobState.DELIVERED, N, 1)


def test_allow_list_and_called_ae_title(start_node: StartNode, series: Series) -> None:
    node = start_node(node={"allowed_calling_aets": ["GOODPACS"]})
    bad = echoscu(node, aet="EVIL")
    assert bad.returncode != 0 and "Association Rejected" in bad.stderr
    assert storescu(node, series.files[:2], aet="EVIL").returncode != 0
    wrong_called = echoscu(node, aet="GOODPACS", called="NOTSYNTHMRF")
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr
    assert echoscu(node, aet="GOODPACS").returncode == 0
    assert spooled(node) == []


def test_peers_silent_in_the_middle_of_a_pdu_do_not_use_up_the_associations(
        start_node: StartNode, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(node={"max_associations": 2, "acse_timeout_s": 1, "network_timeout_s": 5})
    peer = Peer("SYNTHMRF", "127.0.0.1", node.port)
    stalled = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2)]
    try:
        for s in stalled:  # an A-ASSOCIATE-RQ announcing 1000 bytes, cut short (a pulled cable, a NAT timeout)
            s.sendall(struct.pack(">BBL", 0x01, 0, 1000) + b"\x00\x01")
        assert node._listener is not None
        listener = node._listener
        wait_until(lambda: len(listener.active_associations) == 2, 5, 0.05, what="both stalled peers to be counted")
        with caplog.at_level(logging.WARNING, logger="dicom_node"):
            with pytest.raises(AssociationError):  # both slots taken
                echo(peer, "ECHOSCU", timeout_s=2)
            wait_until(lambda: _echo_ok(peer), 20, 0.2, what="the stalled associations to be dropped")
        assert any("rejected: association limit reached (node.max_associations = 2)" in r.getMessage()
                   for r in caplog.records)
    finally:
        for s in stalled:
            s.close()


def _echo_from(address: str, port: int) -> bool:
    """Whether a C-ECHO from the loopback ``address`` (127.0.0.x) to the node succeeds."""
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = 2
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SYNTHMRF", bind_address=(address, 0))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().get("Status", -1)) == 0
    finally:
        assoc.release()


def test_idle_connections_are_capped_per_peer_address_and_in_all(
        start_node: StartNode, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(node={"max_associations": 3, "max_connections": 3, "max_connections_per_peer": 2,
                            "acse_timeout_s": 30, "network_timeout_s": 30})
    open_from = {"127.0.0.1": [], "127.0.0.2": []}  # type: dict[str, list[socket.socket]]

    def connect(address: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", node.port), source_address=(address, 0))
        open_from.setdefault(address, []).append(s)
        return s

    try:
        with caplog.at_level(logging.WARNING, logger="dicom_node"):
            for _ in range(2):  # connected, nothing sent: each holds a thread until the ACSE timeout
                connect("127.0.0.1")
            assert node._listener is not None
            server = node._listener.server
            wait_until(lambda: len(server.open_connections()) == 2, 5, 0.05, what="both idle connections counted")
            wait_until(lambda: len(server.active_associations) == 2, 5, 0.05, what="both handed over")
            third = connect("127.0.0.1")  # over the per-peer cap: closed at once, not left to the ACSE timeout
            wait_until(lambda: _closed_by_peer(third), 5, 0.05, what="the third connection from 127.0.0.1 closed")
            assert not _echo_from("127.0.0.1", node.port)
            assert _echo_from("127.0.0.2", node.port)  # another address still gets through
            wait_until(lambda: len(server.open_connections()) == 2, 5, 0.05, what="the echo's association to end")

            held = connect("127.0.0.2")  # 3 open in all: the node's cap, whatever the address
            wait_until(lambda: len(server.open_connections()) == 3, 5, 0.05, what="three connections counted")
            assert not _closed_by_peer(held)
            fourth = connect("127.0.0.3")
            wait_until(lambda: _closed_by_peer(fourth), 5, 0.05, what="a connection over max_connections closed")
        messages = [r.getMessage() for r in caplog.records]
        assert any("connection from 127.0.0.1 closed: 2 connections open from this address "
                   "(node.max_connections_per_peer = 2)" in m for m in messages)
        assert any("connection from 127.0.0.3 closed: 3 connections open (node.max_connections = 3)" in m
                   for m in messages)
        refused = {limit: node.metrics.registry.get_sample_value("synthmrf_connections_refused_total",
                                                                 {"limit": limit})
                   for limit in ("max_connections", "max_connections_per_peer")}
        assert refused == {"max_connections": 1.0, "max_connections_per_peer": 2.0}  # the third and the echo

        for s in open_from.pop("127.0.0.1"):  # once the idle ones are gone, their address is served again
            s.close()
        wait_until(lambda: _echo_from("127.0.0.1", node.port), 10, 0.1, what="127.0.0.1 served again")
    finally:
        for sockets in open_from.values():
            for s in sockets:
                s.close()


def test_a_connection_in_its_handover_is_counted_once(start_node: StartNode) -> None:
    # Between its association thread starting and leaving the accepted list, a connection is in both: counted twice,
    # a client's second connection was refused by max_connections_per_peer = 2 (a CI failure, under load).
    node = start_node(node={"max_connections_per_peer": 2, "acse_timeout_s": 30, "network_timeout_s": 30})
    held = socket.create_connection(("127.0.0.1", node.port))
    try:
        assert node._listener is not None
        server = node._listener.server
        wait_until(lambda: len(server.active_associations) == 1, 5, 0.05, what="the connection handed over")
        (assoc,) = server.active_associations
        with server._connections_lock:  # the handover's moment, held still
            server._starting[id(assoc.dul.socket.socket)] = "127.0.0.1"
        assert server.open_connections() == ["127.0.0.1"]
        second = socket.create_connection(("127.0.0.1", node.port))
        try:
            wait_until(lambda: len(server.active_associations) == 2, 5, 0.05, what="the second connection admitted")
            assert not _closed_by_peer(second)
        finally:
            second.close()
            with server._connections_lock:
                server._starting.pop(id(assoc.dul.socket.socket), None)
    finally:
        held.close()


def test_a_connection_flood_is_logged_sparsely(start_node: StartNode, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(node={"max_associations": 1, "max_connections": 1, "max_connections_per_peer": 1,
                            "acse_timeout_s": 30, "network_timeout_s": 30})
    held = socket.create_connection(("127.0.0.1", node.port))
    try:
        assert node._listener is not None
        server = node._listener.server
        wait_until(lambda: len(server.open_connections()) == 1, 5, 0.05, what="the idle connection counted")
        with caplog.at_level(logging.WARNING, logger="dicom_node"):
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", node.port))
                wait_until(lambda s=s: _closed_by_peer(s), 5, 0.02, what="a connection over the cap closed")
                s.close()
        refusals = [r.getMessage() for r in caplog.records if "connection from 127.0.0.1 closed" in r.getMessage()]
        assert [m.rsplit("; ", 1)[1] for m in refusals] == [f"{n} refused from this address since start"
                                                              for n in (1, 2, 4, 8, 16)]
    finally:
        held.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (what arrives is the end of the stream, or a reset)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except OSError:
        return True


def test_an_oversized_or_trickling_pdu_ends_the_connection_before_it_is_read(
        start_node: StartNode, caplog: pytest.LogCaptureFixture) -> None:
    """A PDU declared far over node.max_pdu is not read at all, and a PDU whose bytes trickle in (each read
    within the socket timeout) is cut at the network timeout; the node keeps serving."""
    node = start_node(node={"max_pdu": 65536, "network_timeout_s": 2})
    peer = Peer("SYNTHMRF", "127.0.0.1", node.port)
    with caplog.at_level(logging.WARNING, logger="dicom_node"), \
            socket.create_connection(("127.0.0.1", node.port)) as huge, \
            socket.create_connection(("127.0.0.1", node.port)) as trickle:
        huge.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + bytes(4096))  # an A-ASSOCIATE-RQ of 2 GiB, it says
        trickle.sendall(struct.pack(">BBL", 0x01, 0, 1000))
        started = time.monotonic()
        while not _closed_by_peer(trickle) and time.monotonic() - started < 20:
            with contextlib.suppress(OSError):
                trickle.sendall(b"\0")  # a byte every 0.3 s: no single read waits the 2 s socket timeout
            time.sleep(0.3)
        assert time.monotonic() - started < 10, "the trickling PDU was not cut at the network timeout"
        wait_until(lambda: _closed_by_peer(huge), 5, what="the oversized PDU's connection to close")
    messages = [r.getMessage() for r in caplog.records]
    assert any("PDU of 2147483648 bytes declared, over node.max_pdu (65536)" in m for m in messages), messages
    assert any("did not arrive within the network timeout" in m for m in messages), messages
    assert echo(peer, "ECHOSCU", timeout_s=5) == 0


def _echo_ok(peer: Peer) -> bool:
    try:
        return echo(peer, "ECHOSCU", timeout_s=2) == 0
    except AssociationError:
        return False


def send_with_pynetdicom(node: Node, items: list[Path | Dataset], chunked: bool,
                         monkeypatch: pytest.MonkeyPatch) -> list[Dataset]:
    """C-STORE each item (a raw file sent byte-for-byte when ``chunked``); return the responses."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", chunked)
    ae = AE("PYNETDICOM")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(item) for item in items]
    finally:
        assoc.release()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:Expected explicit VR")
def test_malformed_instances_are_refused_and_the_node_keeps_serving(
        start_node: StartNode, sink: ResultSink, series: Series, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(sink)
    source = series.files[0].read_bytes()
    meta = pydicom.dcmread(series.files[0])
    header_end = 132 + 12 + int(meta.file_meta.FileMetaInformationGroupLength)

    def variant(name: str, data: bytes) -> Path:
        ds = pydicom.dcmread(series.files[0])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(tmp_path / "base.dcm", enforce_file_format=True)
        fresh = (tmp_path / "base.dcm").read_bytes()
        path = tmp_path / name
        path.write_bytes(fresh[:header_end] + data if data else fresh[: len(fresh) * 3 // 5])
        return path

    truncated = variant("truncated.dcm", b"")
    garbage = variant("garbage.dcm", bytes(range(256)) * 40)
    no_pixels = pydicom.dcmread(series.files[1])
    no_pixels.SOPInstanceUID = generate_uid()
    del no_pixels.PixelData
    bad_uid = pydicom.dcmread(series.files[2])
    bad_uid.SOPInstanceUID = generate_uid()
    bad_uid.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    raw = send_with_pynetdicom(node, [truncated, garbage], True, monkeypatch)
    decoded = send_with_pynetdicom(node, [no_pixels, bad_uid], False, monkeypatch)
    codes = [int(r.Status) for r in raw + decoded]
    comments = [str(r.get("ErrorComment", "")) for r in raw + decoded]
    assert codes == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
                     DATA_SET_DOES_NOT_MATCH_SOP_CLASS], comments
    assert comments[0].startswith("data set truncated in (7FE0,0010)")
    assert comments[2] == "no pixel data"
    assert comments[3].startswith("SeriesInstanceUID: not a valid UID")
    assert spooled(node) == [] and list((node.storage_dir / "tmp").iterdir()) == []
    assert len(source) > header_end
    r = storescu(node, series.files)  # a good series after the bad ones
    assert r.returncode == 0, r.stderr
    [result] = wait_until(sink.results, 30, what="the result of the good series")
    assert result.comments == f"from {N} frames of {N} instances"


def test_disk_full_is_out_of_resources_and_nothing_is_half_written(
        start_node: StartNode, series: Series, monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(node={"min_free_mb": 2**40})  # a floor above any real free space
    [rsp] = send_with_pynetdicom(node, [series.files[0]], False, monkeypatch)
    assert int(rsp.Status) == OUT_OF_RESOURCES
    assert rsp.ErrorComment.startswith("storage full")
    r = storescu(node, series.files[:3])
    assert r.returncode != 0
    assert spooled(node) == [] and list((node.storage_dir / "tmp").iterdir()) == []
    assert echoscu(node).returncode == 0  # still serving


def test_duplicate_series_gives_one_result(start_node: StartNode, sink: ResultSink, series: Series) -> None:
    node = start_node(sink)
    assert storescu(node, series.files).returncode == 0
    assert storescu(node, series.files[:10]).returncode == 0  # duplicates while the first copy is pending
    wait_until(sink.results, 30, what="the result")
    wait_until(node.idle, 10, what="the node to be idle")
    assert storescu(node, series.files).returncode == 0  # the whole series again, after processing
    assert node.assembler.pending() == []  # nothing new arrived: no new series version
    wait_until(node.idle, 10, what="the node to be idle")
    assert len(sink.results()) == 1
    assert [j.version for j in node.store.jobs()] == [1]


def test_concurrent_studies_keep_their_own_patient_and_study(start_node: StartNode, sink: ResultSink,
                                                             tmp_path: Path) -> None:
    node = start_node(sink)
    studies = [make_series(tmp_path / f"s{i}", n=40, patient_id=f"CONC{i}", seed=10 + i) for i in range(3)]
    procs = [subprocess.Popen([tool("storescu"), "-aet", f"MOD{i}", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                               *map(str, s.files)], env=TOOL_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i, s in enumerate(studies)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    results = wait_until(lambda: len(sink.results()) == 3 and sink.results(), 30, what="three results")
    by_source = {r.referenced_series: r for r in results}
    for s in studies:
        r = by_source[s.series_uid]
        assert (r.patient_id, r.study_uid, r.frame_of_reference_uid) == (s.patient_id, s.study_uid,
                                                                         s.frame_of_reference_uid)
        assert r.comments == "from 40 frames of 40 instances"


def test_other_series_are_ignored_with_a_reason_and_expire(start_node: StartNode, sink: ResultSink, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """With ``ingress.keep_non_candidates`` (off by default) other MR series are kept, judged and expire."""
    node = start_node(sink, retention={"ignored_days": 0}, ingress={"keep_non_candidates": True})
    t2 = make_series(tmp_path / "t2", n=20, mprage=False, patient_id="T2")
    with caplog.at_level(logging.INFO, logger="dicom_node"):
        assert storescu(node, t2.files).returncode == 0
        wait_until(lambda: any("ignored: not a 3D acquisition" in r.getMessage() for r in caplog.records), 10,
                   what="the log line saying why the series is ignored")
    [job] = node.store.jobs()
    assert job.state is JobState.IGNORED
    assert job.reason == "not a 3D acquisition (MRAcquisitionType 2D)"
    assert not any("SECRET" in r.getMessage() for r in caplog.records)  # no patient names in the log
    assert sweep(node.store, node.spool, node.config.retention) == 1
    assert not (node.storage_dir / "series" / t2.series_uid).exists()
    assert node.store.jobs()[0].purged_at is not None
    assert sink.results() == []


def test_late_instance_makes_a_new_version_with_the_whole_series(start_node: StartNode, sink: ResultSink,
                                                                 tmp_path: Path) -> None:
    node = start_node(sink)
    s = make_series(tmp_path / "late", n=N, patient_id="LATE", seed=3)
    assert storescu(node, s.files[:-1]).returncode == 0  # Images in Acquisition says 40: waits for quiet
    wait_until(lambda: len(sink.results()) == 1, 30, what="the first result")
    assert storescu(node, s.files[-1:]).returncode == 0
    results = wait_until(lambda: len(sink.results()) == 2 and sink.results(), 30, what="the second result")
    assert [r.comments for r in results] == [f"from {N - 1} frames of {N - 1} instances",
                                            f"from {N} frames of {N} instances"]
    assert {r.referenced_series for r in results} == {s.series_uid}
    assert len({r.series_uid for r in results}) == 2
    assert [j.version for j in node.store.jobs()] == [2, 1]


def test_compressed_transfer_syntaxes(start_node: StartNode, sink: ResultSink, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(sink)
    ae = AE("PROBE")
    for ts in (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless):
        ae.add_requested_context(MRImageStorage, ts)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
    accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
    assoc.release()
    assert accepted == sorted(str(ts) for ts in (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
                                                 RLELossless))
    sources = []
    # storescu proposes the compressed syntax with -xt (JPEG-LS lossless), -xr (RLE), -xv (JPEG 2000 lossless)
    for i, (ts, option) in enumerate(((JPEGLSLossless, "-xt"), (RLELossless, "-xr"), (JPEG2000Lossless, "-xv"))):
        datasets = mr_datasets(10, 32, patient_id=f"COMP{i}", seed=20 + i)
        for ds in datasets:
            ds.compress(ts)
        sources.append(write_series(datasets, tmp_path / f"c{i}"))
        r = storescu(node, sources[-1].files, "STORESCU", option)
        assert r.returncode == 0, r.stderr
    results = wait_until(lambda: len(sink.results()) == 3 and sink.results(), 60, what="three results")
    assert {r.referenced_series for r in results} == {s.series_uid for s in sources}
    assert {r.comments for r in results} == {"from 10 frames of 10 instances"}


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_compressed_slices_larger_than_the_header_read_are_stored(start_node: StartNode, sink: ResultSink,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A 256 x 256 slice of noise compresses to fragments over the 64 KiB the header check reads (its pixel data
    stays on disk): the fragments are walked in the file. Pixel data cut short, or File Meta Information inside
    the data set (it would replace ours when the file is read back), are refused."""
    node = start_node(sink)
    datasets = mr_datasets(10, 256, patient_id="BIGJ2K", seed=31)
    for ds in datasets:
        ds.compress(JPEG2000Lossless)
    assert min(len(ds.PixelData) for ds in datasets) > 64 * 1024
    source = write_series(datasets, tmp_path / "j2k")
    r = storescu(node, source.files, "STORESCU", "-xv")
    assert r.returncode == 0, r.stderr
    [result] = wait_until(sink.results, 60, what="the result")
    assert result.comments == "from 10 frames of 10 instances"

    whole = source.files[0].read_bytes()
    cut = pydicom.dcmread(source.files[1])
    cut.SOPInstanceUID = cut.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    cut.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    data = (tmp_path / "cut.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 20_000])  # in the middle of its one fragment
    foreign = pydicom.dcmread(source.files[2])
    foreign.SOPInstanceUID = generate_uid()
    foreign.add_new(0x00020010, "UI", ExplicitVRBigEndian)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE("PYNETDICOM")
    ae.add_requested_context(MRImageStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
    try:
        responses = [assoc.send_c_store(tmp_path / "cut.dcm")]
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        responses.append(assoc.send_c_store(foreign))
    finally:
        assoc.release()
    assert [int(r.Status) for r in responses] == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND]
    comments = [str(r.get("ErrorComment", "")) for r in responses]
    assert comments[0].startswith("no element could be read") and "(0002,0010)" in comments[1], comments
    assert len(whole) > 64 * 1024 and list((node.storage_dir / "tmp").iterdir()) == []


def test_legacy_multiframe_object_completes_early(start_node: StartNode, sink: ResultSink, tmp_path: Path) -> None:
    node = start_node(sink, series={"quiet_seconds": 300})  # only the early trigger can complete it in time
    mf = legacy_multiframe(mr_datasets(N, 32, patient_id="MF1", seed=4), tmp_path / "mf")
    r = storescu(node, mf.files, "STORESCU", "-R")  # -R: propose the file's own SOP class (not in dcmtk's list)
    assert r.returncode == 0, r.stderr
    [result] = wait_until(sink.results, 30, what="the result")
    assert result.comments == f"from {N} frames of 1 instances"
    assert result.study_uid == mf.study_uid


def test_a_header_of_too_many_items_is_refused_before_it_is_parsed(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(ingress={"max_header_elements": 50_000}, series={"quiet_seconds": 300})
    bomb, ordinary = mr_datasets(2, 16, patient_id="HDR")
    bomb.PerFrameFunctionalGroupsSequence = [Dataset() for _ in range(60_000)]  # 480 KB: parsed, about 60 MB
    bomb["PerFrameFunctionalGroupsSequence"].is_undefined_length = True
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        responses = send_with_pynetdicom(node, [bomb, ordinary], False, monkeypatch)
    assert [int(r.Status) for r in responses] == [OUT_OF_RESOURCES, 0]
    assert str(responses[0].ErrorComment).startswith("header exceeds ingress.max_header_elements 50,000")
    assert "header exceeds ingress.max_header_elements 50,000 (elements and sequence items)" in caplog.text
    assert len(spooled(node)) == 1 and list((node.storage_dir / "tmp").iterdir()) == []


def test_an_instance_of_another_study_or_patient_in_a_series_is_logged_and_counted(
        start_node: StartNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(series={"quiet_seconds": 300})
    datasets = mr_datasets(3, 16, patient_id="IDENT1")
    odd = datasets[2]
    odd.PatientID, odd.StudyInstanceUID = "IDENT2", generate_uid()
    uid = str(odd.SeriesInstanceUID)
    with caplog.at_level(logging.DEBUG, logger="dicom_node"):
        assert [int(r.Status) for r in send_with_pynetdicom(node, datasets, False, monkeypatch)] == [0, 0, 0]
    [line] = [r.getMessage() for r in caplog.records if "differs from" in r.getMessage()]
    assert line.startswith(f"series {uid}: instance {odd.SOPInstanceUID} differs from the instances the series "
                           "holds in StudyInstanceUID and PatientID")
    assert not any("IDENT" in r.getMessage() or "SECRET" in r.getMessage() for r in caplog.records)
    for attribute in ("StudyInstanceUID", "PatientID"):
        assert node.metrics.registry.get_sample_value("synthmrf_identity_mismatches_total",
                                                      {"attribute": attribute}) == 1
    assert node.assembler.pending() == [uid]  # stored all the same
    again = datasets[0]
    again.PatientID = "IDENT3"  # a duplicate is dropped, so its identity is no news
    assert [int(r.Status) for r in send_with_pynetdicom(node, [again], False, monkeypatch)] == [0]
    assert node.metrics.registry.get_sample_value("synthmrf_identity_mismatches_total",
                                                  {"attribute": "PatientID"}) == 1
    # a process that has not seen the series yet compares with what the spool holds
    fresh = SeriesIdentities(node.spool, lambda attribute: None)
    stranger = InstanceInfo(generate_uid(), str(odd.SOPClassUID), generate_uid(), uid, 1, None,
                            str(odd.file_meta.TransferSyntaxUID), patient_key("SOMEONE"))
    assert fresh.check(stranger) == ["StudyInstanceUID", "PatientID"]


def test_an_instance_kept_but_not_acknowledged_and_a_waiting_duplicate_are_tracked(
        start_node: StartNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = start_node(node={"fsync_directories": True}, series={"quiet_seconds": 300})
    kept, waiting = mr_datasets(1, 16, patient_id="SYNC"), mr_datasets(1, 16, patient_id="WAIT")
    real = spool_module.fsync_dir
    failed: list[Path] = []

    def fail_once(path: Path) -> None:
        if path.name == "incoming" and not failed:
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", fail_once)
    [rsp] = send_with_pynetdicom(node, kept, False, monkeypatch)
    assert int(rsp.Status) == PROCESSING_FAILURE  # on disk, but not known to be durable: not acknowledged
    assert node.assembler.pending() == [str(kept[0].SeriesInstanceUID)]  # ... and still tracked
    [rsp] = send_with_pynetdicom(node, kept, False, monkeypatch)  # the sender's retry: a duplicate
    assert int(rsp.Status) == 0
    # an instance in incoming/ that nothing tracks; its resend makes the assembler track it
    [path] = write_series(waiting, tmp_path / "w").files
    node.spool.store(str(waiting[0].SeriesInstanceUID), str(waiting[0].SOPInstanceUID), path.read_bytes())
    assert str(waiting[0].SeriesInstanceUID) not in node.assembler.pending()
    [rsp] = send_with_pynetdicom(node, waiting, False, monkeypatch)
    assert int(rsp.Status) == 0
    assert str(waiting[0].SeriesInstanceUID) in node.assembler.pending()


# -- [ingress]: what is accepted and kept ---------------------------------------------------------------------------


def ct_datasets(n: int, size: int = 64) -> list[Dataset]:
    """``n`` CT images of one series (a PACS forwarding everything)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID = CTImageStorage, generate_uid(), frame
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientID, ds.PatientName, ds.InstanceNumber = "CT001", "SECRET^CT", k + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.full((size, size), k, dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def test_non_mr_and_non_candidate_instances_are_acknowledged_and_not_kept(start_node: StartNode, sink: ResultSink,
                                                                         tmp_path: Path) -> None:
    node = start_node(sink, metrics={"port": 0}, jobs={"takeover_s": 5})
    ct = write_series(ct_datasets(300, 512), tmp_path / "ct")  # a PACS forwarding a CT: 150 MB
    t2 = make_series(tmp_path / "t2", n=20, mprage=False, patient_id="T2")
    before = disk_usage(node.storage_dir)
    assert storescu(node, ct.files).returncode == 0  # every instance acknowledged (Success)
    assert storescu(node, t2.files).returncode == 0
    assert spooled(node) == [] and node.store.jobs() == []
    assert disk_usage(node.storage_dir) - before < 1 * 2**20
    assert echoscu(node).returncode == 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert 'synthmrf_instances_total{outcome="discarded"} 320.0' in text
    # what 'synthmrf status' prints for the node: its heartbeat's detail line
    wait_until(lambda: any("instances since start: 320 discarded" in m.detail for m in node.store.members()), 10,
               what="the node's status line to count the discarded instances")


def test_ingress_limits_refuse_with_out_of_resources_naming_the_limit(start_node: StartNode, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    node = start_node(ingress={"max_instance_mb": 0.01, "max_instances_per_series": 3})
    ae = AE("LIMITS")
    ae.add_requested_context(MRImageStorage)
    small = mr_datasets(5, 32, patient_id="LIM")  # 2 KB each: under 0.01 MB
    big = mr_datasets(1, 96, patient_id="BIG")[0]  # 18 KB: over
    bomb = mr_datasets(1, 16, patient_id="BOMB")[0]
    bomb.Rows = bomb.Columns = 65535
    bomb.NumberOfFrames = 4000  # 17 T pixels claimed, 512 bytes of pixel data
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
    assert assoc.is_established
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        codes = [int(assoc.send_c_store(ds).Status) for ds in (*small, big, bomb)]
    assoc.release()
    assert codes == [0, 0, 0, 0xA700, 0xA700, 0xA700, 0xA700]
    text = caplog.text
    assert "series already holds ingress.max_instances_per_series 3 instances" in text
    assert "exceeds ingress.max_instance_mb 0.01" in text
    assert "exceeds ingress.max_pixels" in text
    assert len(spooled(node)) == 3


def large_instance(folder: Path, megabytes: int) -> tuple[Path, Dataset]:
    """One MPRAGE-like MR image of ``megabytes`` MB: 512 x 512 x frames, 16 bit."""
    ds = mr_datasets(1, 16, patient_id="LARGE")[0]
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = megabytes * 2**20 // (512 * 512 * 2)
    ds.PixelData = np.full(int(ds.NumberOfFrames) * 512 * 512, 7, np.uint16).tobytes()
    path = folder / f"large-{megabytes}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def cutting_proxy(port: int, cut_after: int, before_cut: Callable[[], object]) -> tuple[int, Callable[[], int]]:
    """A one-connection TCP proxy to 127.0.0.1:``port`` that forwards ``cut_after`` bytes of the client's stream,
    calls ``before_cut``, then resets both connections. Returns its port and a function that waits for the cut and
    returns the bytes forwarded."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()
    count = [0]

    def replies(upstream: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                client.sendall(data)

    def run() -> None:
        client, _ = listener.accept()
        listener.close()
        upstream = socket.create_connection(("127.0.0.1", port))
        back = threading.Thread(target=replies, args=(upstream, client), daemon=True)
        back.start()
        with contextlib.suppress(OSError):
            while count[0] < cut_after and (data := client.recv(min(65536, cut_after - count[0]))):
                upstream.sendall(data)
                count[0] += len(data)
        with contextlib.suppress(Exception):  # a failed wait shows as the test's own assertion
            before_cut()
        # a reset: linger 0, then close once no thread blocks in recv on the socket (a blocked recv keeps the
        # kernel socket, and the close would send nothing); shutting the read side down wakes that recv
        for sock in (upstream, client):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
        back.join(10)
        upstream.close()
        client.close()
        done.set()

    threading.Thread(target=run, daemon=True).start()

    def forwarded() -> int:
        assert done.wait(60), "the proxy did not cut the connection"
        return count[0]
    return listener.getsockname()[1], forwarded


def test_a_large_instance_streams_to_disk_and_a_cut_association_leaves_nothing(
        start_node: StartNode, tmp_path: Path) -> None:
    # no series completes during the test: a claim links the first instance into a version folder, which spooled()
    # would count again (under load the cut below outlasted the default quiet period)
    node = start_node(ingress={"max_instance_mb": 300}, series={"quiet_seconds": 300})
    path, ds = large_instance(tmp_path, 160)
    del ds
    me = psutil.Process()
    rss_before = me.memory_info().rss
    peak = rss_before
    sender = subprocess.Popen([tool("storescu"), "-aet", "BIGSCU", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                               str(path)], env=TOOL_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while sender.poll() is None:
        peak = max(peak, me.memory_info().rss)
    assert sender.returncode == 0, sender.stderr.read() if sender.stderr else ""
    assert (peak - rss_before) / 2**20 < 160 / 4  # held in memory, the instance would cost 160-320 MB here
    [stored] = spooled(node)
    received = pydicom.dcmread(stored, stop_before_pixels=True)
    assert received.file_meta.SourceApplicationEntityTitle == "BIGSCU"  # the node's File Meta, not pynetdicom's
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    with stored.open("rb") as a, path.open("rb") as b:  # the data set bytes as sent, after each file's meta
        a.seek(-64 * 2**20, 2)
        b.seek(-64 * 2**20, 2)
        assert a.read() == b.read()

    # the connection dies in the middle of the data set (a proxy forwards 64 MB of storescu's stream, then resets
    # both sides: deterministic, where killing storescu raced a loopback transfer of 250 MB): what had arrived is
    # deleted, nothing is stored
    cut, _ = large_instance(tmp_path, 250)
    tmp = node.storage_dir / "tmp"
    arrived: list[int] = []

    def arriving() -> bool:
        for p in tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):  # a file may go between listing and stat
                if p.stat().st_size > 32 * 2**20:
                    arrived.append(p.stat().st_size)
                    return True
        return False

    proxy_port, forwarded = cutting_proxy(node.port, 64 * 2**20,
                                          lambda: wait_until(arriving, 30, what="the data set to be arriving"))
    sender = subprocess.Popen([tool("storescu"), "-aec", "SYNTHMRF", "127.0.0.1", str(proxy_port), str(cut)],
                              env=TOOL_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sender.wait(60) != 0
    assert forwarded() == 64 * 2**20
    assert arrived, "the node did not stream the data set to its tmp folder"
    wait_until(lambda: not any(tmp.iterdir()), 10, what="the partial file to be deleted")
    assert len(spooled(node)) == 1
    assert echoscu(node).returncode == 0
