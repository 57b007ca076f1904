"""Hostile input over a real association, driven by hypothesis: data sets cut short, overwritten or padded
with random bytes at random places. Whatever arrives, the node answers each C-STORE with a status (never
an exception or a dropped association), keeps nothing partial, stores only whole DICOM files, and goes
on serving."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from node_support import fast_processor, make_series, node_config
from pydicom.uid import MRImageStorage, generate_uid
from pynetdicom import AE, _config

from dicom_node.dimse.client import Peer, echo
from dicom_node.node import Node
from dicom_node.node.instances import complete_file_uids

ANSWERS = {0x0000, 0xA700, 0xA900, 0xC000, 0xC211, 0x0110}  # Success, or the refusals the node gives


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    cfg = node_config(tmp_path_factory.mktemp("fuzz") / "node", series={"quiet_seconds": 3600},
                      ingress={"keep_non_candidates": True})
    n = Node(cfg, processor=fast_processor).start()
    yield n
    n.stop(drain=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """One valid instance's file bytes and where its data set starts."""
    [f] = make_series(tmp_path_factory.mktemp("src"), n=1, size=24, patient_id="FUZZ").files
    meta = pydicom.dcmread(f, stop_before_pixels=True).file_meta
    return f.read_bytes(), 132 + 12 + int(meta.FileMetaInformationGroupLength)


mutation = st.tuples(st.sampled_from(["cut", "overwrite", "insert"]), st.floats(0.0, 1.0),
                     st.binary(min_size=1, max_size=64))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_data_sets_get_a_status_and_leave_nothing_partial(
        node: Node, source: tuple[bytes, int], tmp_path_factory: pytest.TempPathFactory,
        mutations: list[tuple[str, float, bytes]]) -> None:
    raw, start = source
    data = bytearray(raw[start:])
    for kind, where, junk in mutations:
        at = int(where * len(data))
        if kind == "cut":
            del data[at:]
        elif kind == "overwrite":
            data[at:at + len(junk)] = junk
        else:
            data[at:at] = junk
    meta = pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw), stop_before_pixels=True).file_meta
    meta.MediaStorageSOPInstanceUID = generate_uid()  # every example a new instance in the command
    head = pydicom.filebase.DicomBytesIO()
    pydicom.filewriter.write_file_meta_info(head, meta)
    path = tmp_path_factory.mktemp("case") / "case.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + bytes(data))
    ae = AE("FUZZER")
    ae.add_requested_context(MRImageStorage)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True  # bytes as they are
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
        assert assoc.is_established
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rsp = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert "Status" in rsp and int(rsp.Status) in ANSWERS, rsp
    assert not any((node.storage_dir / "tmp").iterdir())
    for stored in (node.storage_dir / "series").rglob("*.dcm"):
        assert complete_file_uids(stored) is not None, stored.name
    assert echo(Peer("SYNTHMRF", "127.0.0.1", node.port), "FUZZER") == 0


# -- what the coverage-guided run (tests/fuzz_receive.py) found, kept as regression cases -------------------------


def with_vr(raw: bytes, tag: bytes, vr: bytes, bad: bytes) -> bytes:
    """``raw`` with the VR of one explicit-VR little-endian element replaced by an unknown one."""
    assert raw.count(tag + vr) == 1
    return raw.replace(tag + vr, tag + bad)


def test_an_unknown_vr_in_a_header_the_rules_read_is_refused_as_undecodable(
        source: tuple[bytes, int], tmp_path: Path) -> None:
    raw, _ = source
    node = Node(node_config(tmp_path / "node"), processor=fast_processor).start()  # the [mprage] rules read it
    path = tmp_path / "bad-vr.dcm"
    path.write_bytes(with_vr(raw, b"\x18\x00\x24\x00", b"SH", b"SI"))  # SequenceName: VR 'SI'
    ae = AE("FUZZER")
    ae.add_requested_context(MRImageStorage)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", node.port, ae_title="SYNTHMRF")
        rsp = assoc.send_c_store(path)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        node.stop(drain=False)
    assert int(rsp.Status) == 0xC000 and str(rsp.ErrorComment).startswith("undecodable header value")


def test_an_unknown_vr_in_a_series_is_a_rejection_by_the_pipeline(tmp_path: Path) -> None:
    from pipeline.dicom_series import MIN_FRAMES, SeriesRejected, read_series

    series = make_series(tmp_path / "s", n=MIN_FRAMES, size=8, patient_id="VR")
    first = series.files[0]
    first.write_bytes(with_vr(first.read_bytes(), b"\x20\x00\x52\x00", b"UI", b"YI"))  # FrameOfReferenceUID
    with pytest.raises(SeriesRejected, match=r"unreadable DICOM file .*Unknown Value Representation 'YI'"):
        read_series(series.folder)


def test_a_bounded_coverage_guided_run_finds_no_crash(tmp_path: Path) -> None:
    harness = Path(__file__).with_name("fuzz_receive.py")
    # -rss_limit_mb=0: libFuzzer reads the peak RSS from getrusage, which Linux carries over execve from this
    # (large) pytest process; the run itself needs about 130 MB.
    # TMPDIR: the harness's series and corpus folders are made under tmp_path and go with it
    r = subprocess.run([sys.executable, str(harness), "-runs=600", "-seed=1", "-rss_limit_mb=0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp_path)})
    output = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "Instrumenting" not in line)
    assert r.returncode == 0, output[-4000:]
    assert "Done 600 runs" in r.stderr
