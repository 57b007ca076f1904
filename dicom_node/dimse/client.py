"""Talking to other AEs as an SCU: C-ECHO and C-STORE of files (used by dispatch, ``echo`` and ``send``)."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from dicom_node.dimse.reactor_pause import use_for_requestors
from dicom_node.dimse.status import STORE_WARNINGS, SUCCESS

logger = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 Annex A)
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


@dataclass(frozen=True)
class Peer:
    """Where to connect: AE title, host, port, and optional TLS."""

    ae_title: str
    host: str
    port: int
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # our client certificate (PEM chain) for mutual TLS, with tls_key
    tls_key: Path | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class StoreReport:
    """What a C-STORE run did: files stored and files that failed, with the reason."""

    stored: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[Path, str]] = field(default_factory=list)  # SOP class not accepted by the peer: final

    @property
    def ok(self) -> bool:
        return not self.failed


class AssociationError(ConnectionError):
    """The peer could not be reached or refused the association; the message says which."""


def client_tls(peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``peer`` (None without TLS): its CA, and our certificate if configured."""
    if not peer.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(peer.tls_ca) if peer.tls_ca else None)
    if peer.tls_cert is not None:
        ctx.load_cert_chain(str(peer.tls_cert), str(peer.tls_key) if peer.tls_key else None)
    return ctx, peer.host


def _connection_open(event: Event, timeout_s: float) -> None:
    """EVT_CONN_OPEN: send each PDU at once (no Nagle delay); a send or read that waits more than ``timeout_s``
    (a peer that stopped reading, or stalls in the middle of a PDU) ends the association instead of hanging its
    thread (pynetdicom clears the socket's timeout once connected); keepalive finds a peer that vanished."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(timeout_s)


def connection_handler(ae: AE) -> tuple[evt.EventType, Callable[..., None], list[object]]:
    """The EVT_CONN_OPEN handler every association we request uses (see ``_connection_open``), bounded by the
    AE's ``network_timeout``."""
    return evt.EVT_CONN_OPEN, _connection_open, [ae.network_timeout]


def _associate(ae: AE, peer: Peer) -> Association:
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=client_tls(peer),
                         evt_handlers=[connection_handler(ae)])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no connection"
        raise AssociationError(f"association with {peer} failed: {why}")
    return assoc


def _ae(calling_ae_title: str, connect_timeout_s: float, dimse_timeout_s: float) -> AE:
    use_for_requestors()
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = connect_timeout_s
    ae.acse_timeout = connect_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = max(dimse_timeout_s, connect_timeout_s)
    return ae


def echo(peer: Peer, calling_ae_title: str, timeout_s: float = 10.0) -> int:
    """C-ECHO ``peer``; the status code (0x0000 success); :class:`AssociationError` if unreachable."""
    ae = _ae(calling_ae_title, timeout_s, timeout_s)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, peer)
    try:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise AssociationError(f"C-ECHO to {peer}: no response (timeout or abort)")
        return int(rsp.Status)
    finally:
        if assoc.is_established:
            assoc.release()


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, and every file under folders named (recursively), sorted; hidden files skipped."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _syntaxes(ts: UID) -> list[UID]:
    """Transfer syntaxes to offer for a file: its own, and for uncompressed data both little-endian ones."""
    if ts.is_compressed:
        return [ts]
    return list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def store_files(files: Sequence[Path], peer: Peer, calling_ae_title: str, connect_timeout_s: float = 10.0,
                dimse_timeout_s: float = 60.0) -> StoreReport:
    """C-STORE ``files`` to ``peer`` over as few associations as the contexts allow.

    Files that are not DICOM are skipped; files of a SOP class the peer's association does not accept are
    ``refused`` (not tried); :class:`AssociationError` if the peer cannot be reached.
    """
    report = StoreReport()
    headers: dict[Path, tuple[UID, UID]] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            headers[f] = (UID(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, KeyError, OSError, ValueError) as exc:
            report.skipped.append((f, f"not a DICOM file ({type(exc).__name__})"))
    keys = list(dict.fromkeys(headers.values()))
    for chunk in (keys[i:i + MAX_CONTEXTS] for i in range(0, len(keys), MAX_CONTEXTS)):
        ae = _ae(calling_ae_title, connect_timeout_s, dimse_timeout_s)
        for sop_class, ts in chunk:
            ae.add_requested_context(sop_class, _syntaxes(ts))
        wanted = set(chunk)
        assoc = _associate(ae, peer)
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for f, key in headers.items():
                if key not in wanted:
                    continue
                if str(key[0]) not in accepted:
                    report.refused.append((f, f"{key[0].name} not accepted by the peer"))
                    continue
                if not assoc.is_established:
                    report.failed.append((f, "association lost"))
                    continue
                try:
                    rsp = assoc.send_c_store(f)
                except Exception as exc:  # pynetdicom raises ValueError/AttributeError for unsendable data
                    report.failed.append((f, f"{type(exc).__name__}: {exc}"))
                    continue
                code = int(rsp.Status) if "Status" in rsp else None
                if code is None:
                    report.failed.append((f, "no response (timeout or abort)"))
                elif code == SUCCESS or code in STORE_WARNINGS:
                    report.stored.append(f)
                else:
                    comment = str(rsp.get("ErrorComment", "")).strip()
                    report.failed.append((f, f"status 0x{code:04X}{': ' + comment if comment else ''}"))
        finally:
            if assoc.is_established:
                assoc.release()
    return report
