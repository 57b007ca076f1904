"""Retrospective query/retrieve over TLS: an archive that requires our client certificate (mutual TLS)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import ca_signed, make_series, node_config
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.dimse.client import AssociationError, Peer, echo, store_files
from dicom_node.retro.association import ArchiveUnavailableError, archive_for, associate
from dicom_node.retro.config import SourceConfig
from dicom_node.retro.harvest import harvest_scp
from dicom_node.retro.query import find_studies, parse_query

TlsArchive = tuple[int, Path, dict[str, tuple[Path, Path]], list[str]]  # port, CA, certificates, callers seen


@pytest.fixture
def tls_archive(tmp_path: Path) -> Iterator[TlsArchive]:
    """A C-FIND SCP over TLS that requires a client certificate from the test CA; it records who called."""
    ca, certs = ca_signed(tmp_path, ["127.0.0.1", "synthmrf-node.example"])
    callers: list[str] = []

    def on_find(event: Event) -> Iterator[tuple[int, Dataset | None]]:
        cert = event.assoc.dul.socket.socket.getpeercert()  # type: ignore[union-attr]
        callers.append(dict(x[0] for x in cert["subject"])["commonName"])
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = "1.2.3.4"
        ds.PatientID = "TLS1"
        ds.StudyDate = "20240101"
        yield 0xFF00, ds
        yield 0x0000, None

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert, server_key = certs["127.0.0.1"]
    ctx.load_cert_chain(str(server_cert), str(server_key))
    ctx.load_verify_locations(str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE("ARCHIVE")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server: ThreadedAssociationServer = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx,
                                                         evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        yield int(server.server_address[1]), ca, certs, callers
    finally:
        server.shutdown()


def test_retro_queries_an_archive_that_requires_our_certificate(tls_archive: TlsArchive) -> None:
    port, ca, certs, callers = tls_archive
    cert, key = certs["synthmrf-node.example"]
    source = SourceConfig(name="secure", ae_title="ARCHIVE", host="127.0.0.1", port=port, tls=True, tls_ca=ca,
                          tls_cert=cert, tls_key=key, connect_timeout_s=5)
    archive = archive_for(source, "SYNTHMRF")
    with associate(archive) as assoc:
        [study] = find_studies(assoc, archive, parse_query({"PatientID": "TLS*"}))
    assert study.StudyInstanceUID == "1.2.3.4" and callers == ["synthmrf-node.example"]
    without_cert = archive_for(source.model_copy(update={"tls_cert": None, "tls_key": None}), "SYNTHMRF")
    with pytest.raises(ArchiveUnavailableError), associate(without_cert):
        pass
    plain = archive_for(source.model_copy(update={"tls": False}), "SYNTHMRF")
    with pytest.raises(ArchiveUnavailableError), associate(plain):
        pass


def test_the_harvest_scp_speaks_tls_and_binds_the_archive_to_its_certificate(tmp_path: Path) -> None:
    """The C-MOVE destination of a harvest uses the node's TLS settings: the archive's AE title with the
    archive's certificate stores; the same AE title with another valid certificate, a client without a
    certificate and a plain client are refused."""
    ca, certs = ca_signed(tmp_path, ["127.0.0.1", "archive.example", "impostor.example"])
    cert, key = certs["127.0.0.1"]
    node = node_config(tmp_path / "n", node={"tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ca),
                                              "tls_identities": {"ARCHIVE": "archive.example"}}).node
    series = make_series(tmp_path / "s", n=2, patient_id="HTLS")
    folder = tmp_path / "harvested"
    with harvest_scp("SYNTHMRF_HARVEST", "127.0.0.1", 0, folder, allowed_calling_aets=["ARCHIVE"], tls=node) as port:
        def peer(name: str | None) -> Peer:
            c, k = certs[name] if name else (None, None)
            return Peer("SYNTHMRF_HARVEST", "127.0.0.1", port, tls=True, tls_ca=ca, tls_cert=c, tls_key=k)

        assert store_files(series.files, peer("archive.example"), "ARCHIVE").ok
        with pytest.raises(AssociationError):
            echo(peer("impostor.example"), "ARCHIVE", timeout_s=3)
        with pytest.raises((AssociationError, OSError)):
            echo(peer(None), "ARCHIVE", timeout_s=3)
        with pytest.raises((AssociationError, OSError)):
            echo(Peer("SYNTHMRF_HARVEST", "127.0.0.1", port), "ARCHIVE", timeout_s=3)
    assert len(list(folder.rglob("*.dcm"))) == 2
