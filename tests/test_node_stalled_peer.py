"""A destination that accepts an association and then stops reading must not hang the sender: the send times
out after the network timeout and the instance is reported failed (the dispatcher then retries it later)."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from node_support import free_port
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.dimse.client import Peer, store_files


@pytest.fixture
def store_scp() -> Iterator[int]:
    """A plain pynetdicom storage SCP on a free port of 127.0.0.1 (accepts MR, answers Success)."""
    ae = AE("STALLSCP")
    ae.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server: ThreadedAssociationServer = ae.start_server(  # type: ignore[assignment]
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        yield port
    finally:
        server.shutdown()


def stalling_proxy(target_port: int, forward_bytes: int, stop: threading.Event) -> tuple[int, threading.Thread]:
    """A TCP relay to ``target_port`` that stops reading from its client after ``forward_bytes`` (the association
    set-up and a little of the data set pass; the peer's answers keep flowing back)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", target_port))
        forwarded = 0
        with listener, client, server:
            while not stop.is_set():
                readable, _, _ = select.select([client, server] if forwarded < forward_bytes else [server], [], [],
                                               0.1)
                for side in readable:
                    data = side.recv(65536)
                    if not data:
                        return
                    (server if side is client else client).sendall(data)
                    forwarded += len(data) if side is client else 0

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def large_mr(path: Path) -> Path:
    """A 32 MB MR instance: far more than the socket buffers between the sender and a relay that stopped."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 4096
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.ones((4096, 4096), np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_destination_that_stops_reading_fails_the_send_instead_of_hanging(store_scp: int, tmp_path: Path) -> None:
    stop = threading.Event()
    port, relay = stalling_proxy(store_scp, 256 * 1024, stop)
    instance = large_mr(tmp_path / "big.dcm")
    outcome: list[object] = []
    sender = threading.Thread(target=lambda: outcome.append(
        store_files([instance], Peer("STALLSCP", "127.0.0.1", port), "SENDER", connect_timeout_s=2,
                    dimse_timeout_s=2)), daemon=True)
    started = time.monotonic()
    sender.start()
    sender.join(60)
    hung = sender.is_alive()
    stop.set()
    relay.join(5)
    assert not hung, "the send to a destination that stopped reading never returned"
    [report] = outcome
    assert [f for f, _ in report.failed] == [instance] and not report.stored  # type: ignore[attr-defined]
    assert time.monotonic() - started < 30
