"""The DICOM listener: C-ECHO and C-STORE handlers (plain functions) and the AE that binds them.

A C-STORE is answered Success only after the instance is on disk (see ``spool``). Every handler has
one boundary that turns an exception into a named failure status and a log line; the association
never sees a Python exception, and a handler never waits for the pipeline.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessP14,
)
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import IngressSection, MprageSection, NodeSection
from dicom_node.dimse import fast_acceptor, streamed_receive
from dicom_node.dimse.status import OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from dicom_node.node.instances import (
    MR_IMAGE_STORAGE,
    InstanceInfo,
    InstanceRefusedError,
    file_meta_bytes,
    inspect_instance,
)
from dicom_node.node.series_identity import SeriesIdentities
from dicom_node.node.spool import Spool, SpoolFullError, StoredNotSyncedError, StoreOutcome

logger = logging.getLogger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")  # Verification SOP Class (PS3.4 Annex A)
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessP14, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K,
)
MAX_ERROR_COMMENT = 64  # (0000,0902) Error Comment is LO

def status(code: int, comment: str | None = None) -> Dataset:
    """A C-STORE/C-ECHO response status dataset, with an Error Comment for failures."""
    ds = Dataset()
    ds.Status = code
    if comment and code != SUCCESS:
        ds.ErrorComment = comment[:MAX_ERROR_COMMENT]
    return ds


# -- handlers ------------------------------------------------------------------------------------------------


StoreCounter = Callable[[str, int], None]


class Arrivals(Protocol):
    """Where the handler reports instances (the series assembler)."""

    def instance_stored(self, info: InstanceInfo) -> None:
        """A new instance is in the spool."""

    def instance_waiting(self, info: InstanceInfo) -> None:
        """A duplicate of an instance that is still in ``incoming/`` arrived."""

    def hold(self, series_uid: str) -> None:
        """Instances of the series were refused for want of space: wait for the sender to send them again."""

    def release_hold(self, series_uid: str) -> None:
        """The sender sent the series again without refusals."""


OUT_OF_SPACE = "out_of_resources"  # the outcome of an instance refused for want of space


class AssociationTally:
    """Per-association counts of C-STORE outcomes and the series stored, told once when the association ends
    (a log line; series cut short by a refusal for space are held for the sender's retry); each outcome is
    also passed to ``count`` (the metrics)."""

    def __init__(self, count: StoreCounter) -> None:
        self._count = count
        self._lock = threading.Lock()
        self._tallies: dict[int, Counter[str]] = {}
        self._series: dict[int, set[str]] = {}

    def record(self, assoc: Association, outcome: str, nbytes: int, series_uid: str | None = None) -> None:
        self._count(outcome, nbytes)
        with self._lock:
            self._tallies.setdefault(id(assoc), Counter())[outcome] += 1
            if series_uid is not None:
                self._series.setdefault(id(assoc), set()).add(series_uid)

    def pop(self, assoc: Association, arrivals: Arrivals | None = None) -> str:
        """The association's summary; tells ``arrivals`` to hold (refusals for space) or release its series."""
        with self._lock:
            tally = self._tallies.pop(id(assoc), Counter())
            series = self._series.pop(id(assoc), set())
        if arrivals is not None:
            for uid in sorted(series):
                (arrivals.hold if tally[OUT_OF_SPACE] else arrivals.release_hold)(uid)
        return ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items())) or "no instances"


def handle_store(event: Event, spool: Spool, arrivals: Arrivals, identities: SeriesIdentities,
                 tally: AssociationTally, limits: IngressSection | None = None,
                 rules: MprageSection | None = None) -> Dataset:
    """EVT_C_STORE: check the data set received into a file, move it into the spool durably, tell the series
    assembler; return the status.

    Every instance that ends up in ``incoming/`` is reported, also when it could not be acknowledged, and
    so is a duplicate of one still there: a series in the spool is never left untracked. Valid instances the
    node has no use for (``[ingress]`` keep_non_mr / keep_non_candidates) are acknowledged and not kept.
    """
    calling = event.assoc.requestor.ae_title
    request = cast(C_STORE, event.request)
    sop_uid = request.AffectedSOPInstanceUID
    limits = limits or IngressSection()
    received = streamed_receive.received_file(request)
    try:
        if received is None:
            raise RuntimeError("the data set was not received into a file (streamed_receive not enabled)")
        received.close()
        if received.out_of_space:
            raise SpoolFullError(received.refusal)
        if received.refusal is not None:
            raise InstanceRefusedError(OUT_OF_RESOURCES, received.refusal)
        info = inspect_instance(event, Path(received.name), received.header_bytes, limits, rules)
        size = received.data_bytes
        if info.discard:
            logger.debug("discarded %s of series %s from %s: %s", info.sop_instance_uid, info.series_instance_uid,
                         calling, info.discard, extra={"sop_uid": info.sop_instance_uid})
            tally.record(event.assoc, "discarded", size)
            return status(SUCCESS)
        if (not spool.is_duplicate(info.series_instance_uid, info.sop_instance_uid)
                and spool.instance_count(info.series_instance_uid) >= limits.max_instances_per_series):
            raise InstanceRefusedError(OUT_OF_RESOURCES, f"series already holds ingress.max_instances_per_series "
                                                         f"{limits.max_instances_per_series} instances")
        outcome = spool.store_file(info.series_instance_uid, info.sop_instance_uid, received.name)
        if outcome is StoreOutcome.STORED:
            identities.check(info)
            arrivals.instance_stored(info)
        elif spool.is_waiting(info.series_instance_uid, info.sop_instance_uid):
            arrivals.instance_waiting(info)
        logger.debug("%s %s of series %s from %s", outcome.value, info.sop_instance_uid, info.series_instance_uid,
                     calling, extra={"sop_uid": info.sop_instance_uid, "series_uid": info.series_instance_uid})
        tally.record(event.assoc, outcome.value, size, info.series_instance_uid)
        return status(SUCCESS)
    except InstanceRefusedError as exc:
        logger.warning("refused instance %s from %s: %s (status 0x%04X)", sop_uid, calling, exc.reason, exc.status,
                       extra={"sop_uid": str(sop_uid), "calling_aet": calling})
        tally.record(event.assoc, "refused", 0)
        return status(exc.status, exc.reason)
    except StoredNotSyncedError as exc:
        arrivals.instance_stored(info)  # kept: the resend will be a duplicate
        logger.error("instance %s from %s kept but not acknowledged: %s", sop_uid, calling, exc,
                     extra={"sop_uid": str(sop_uid), "calling_aet": calling})
        tally.record(event.assoc, "error", 0)
        return status(PROCESSING_FAILURE, "storage error")
    except SpoolFullError as exc:
        logger.error("out of resources, refused instance %s from %s: %s", sop_uid, calling, exc,
                     extra={"sop_uid": str(sop_uid), "calling_aet": calling})
        tally.record(event.assoc, OUT_OF_SPACE, 0)
        return status(OUT_OF_RESOURCES, "storage full")
    except Exception:
        logger.exception("failed to store instance %s from %s", sop_uid, calling,
                         extra={"sop_uid": str(sop_uid), "calling_aet": calling})
        tally.record(event.assoc, "error", 0)
        return status(PROCESSING_FAILURE, "internal error")


def handle_echo(event: Event) -> int:
    """EVT_C_ECHO: the node is alive."""
    return SUCCESS


def handle_connection_open(event: Event, read_timeout_s: float) -> None:
    """EVT_CONN_OPEN: no Nagle delay on the small C-STORE responses; a read waits at most ``read_timeout_s``
    (a peer gone silent in the middle of a PDU would otherwise hold its thread and its association slot
    forever) and TCP keepalive probes an idle peer."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.settimeout(read_timeout_s)


def certificate_names(cert: Mapping[str, Any]) -> set[str]:
    """The names a peer certificate (``SSLSocket.getpeercert()``) vouches for: subject CNs and DNS/IP SANs."""
    names = {value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")}
    return names


def handle_accepted(event: Event, identities: Mapping[str, str] | None = None) -> None:
    """EVT_ACCEPTED: log it; abort at once when the calling AE title is bound to a certificate name
    (``node.tls_identities``) that the caller's certificate does not carry (before any DIMSE message)."""
    r = event.assoc.requestor
    expected = (identities or {}).get(r.ae_title)
    if expected is not None:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
        names = certificate_names(cert) if cert else set()
        if expected not in names:
            logger.warning("association from %s at %s:%s refused: its certificate (%s) is not the one bound to that "
                           "AE title (node.tls_identities)", r.ae_title, r.address, r.port,
                           ", ".join(sorted(names)) or "none", extra={"calling_aet": r.ae_title})
            event.assoc.abort()
            return
    logger.info("association from %s at %s:%s accepted", r.ae_title, r.address, r.port)


# (Result Source, Diagnostic) of the A-ASSOCIATE-RJ pynetdicom's acceptor sends (PS3.8 9.3.4)
_REJECTIONS = {
    (1, 3): "calling AE title not allowed (node.allowed_calling_aets)",
    (1, 7): "called AE title not ours",
    (2, 1): "user identity not accepted",
    (3, 1): "temporary congestion",
}


def rejection_reason(event: Event) -> str:
    """Why the acceptor rejected the association, from the A-ASSOCIATE-RJ it sent."""
    rj = event.assoc.acceptor.primitive
    key = (int(rj.result_source or 0), int(rj.diagnostic or 0)) if rj is not None else (0, 0)
    if key == (3, 2):
        return f"association limit reached (node.max_associations = {event.assoc.ae.maximum_associations})"
    return _REJECTIONS.get(key, f"result source {key[0]}, diagnostic {key[1]}")


def handle_rejected(event: Event) -> None:
    r = event.assoc.requestor
    logger.warning("association from %s at %s:%s rejected: %s", r.ae_title, r.address, r.port,
                   rejection_reason(event), extra={"calling_aet": r.ae_title})


def handle_connection_closed(event: Event) -> None:
    """EVT_CONN_CLOSE: delete what an association that ended in the middle of a data set had received of it."""
    if n := streamed_receive.discard_unfinished(event.assoc):
        logger.warning("association from %s ended during a C-STORE: %d partly received instance(s) deleted",
                       event.assoc.requestor.ae_title, n, extra={"calling_aet": event.assoc.requestor.ae_title})


def handle_released(event: Event, tally: AssociationTally, arrivals: Arrivals | None = None) -> None:
    logger.info("association from %s released: %s", event.assoc.requestor.ae_title, tally.pop(event.assoc, arrivals),
                extra={"calling_aet": event.assoc.requestor.ae_title})


def handle_aborted(event: Event, tally: AssociationTally, arrivals: Arrivals | None = None) -> None:
    logger.warning("association from %s aborted: %s", event.assoc.requestor.ae_title,
                   tally.pop(event.assoc, arrivals), extra={"calling_aet": event.assoc.requestor.ae_title})


# -- the listener -------------------------------------------------------------------------------------------------


def ssl_context_for(cfg: NodeSection) -> ssl.SSLContext | None:
    """A server TLS context from the node's certificate and key, or None when TLS is off."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
    if cfg.tls_ca is not None:
        ctx.load_verify_locations(str(cfg.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_ae(cfg: NodeSection) -> AE:
    """The application entity: contexts, allow-list, limits and timeouts from ``cfg``."""
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(VERIFICATION, DEFAULT_TRANSFER_SYNTAXES)
    classes = [UID(cx.abstract_syntax) for cx in StoragePresentationContexts if cx.abstract_syntax]
    if not cfg.accept_non_mr:
        classes = []
    for sop_class in [*sorted(MR_IMAGE_STORAGE), *(c for c in classes if c not in MR_IMAGE_STORAGE)]:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.require_calling_aet = list(cfg.allowed_calling_aets)
    ae.require_called_aet = True
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.max_pdu
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    return ae


MAX_TRACKED_PEERS = 10_000  # addresses whose refused connections are counted (for sparse logging)


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the listener thread, and open
    connections capped in all and per peer address.

    pynetdicom 3.0 wraps each accepted socket with the handshake done at once, in the one thread that
    accepts connections and without a timeout: a peer that connects and sends nothing stops every
    later association. Here the listener only wraps the socket; the handshake runs in the connection's
    own thread and gives up after ``handshake_timeout_s``.

    pynetdicom bounds associations, but only once a connection's association request has been read: until then
    (up to the ACSE timeout) every connection holds a thread. A connection is counted from its accept until its
    association thread ends; one over ``max_connections`` or ``max_connections_per_peer`` is closed at once.
    """

    daemon_threads = True  # a handshake in progress delays neither stopping nor exiting
    block_on_close = False

    def __init__(self, *args: Any, handshake_timeout_s: float = 30.0, max_connections: int = 64,
                 max_connections_per_peer: int = 8, on_refused: Callable[[str], None] | None = None,
                 **kwargs: Any) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.on_refused = on_refused  # called with the limit's name for every connection closed at accept
        self._connections_lock = threading.Lock()
        self._starting: dict[int, str] = {}  # accepted connections whose association thread has not started yet
        self._refused: Counter[str] = Counter()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = cast(socket.socket, self.socket).accept()
        if self.ssl_context:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def open_connections(self) -> list[str]:
        """The peer address of every open connection: associations running, and connections not yet handed to one."""
        with self._connections_lock:  # first: a connection handed over meanwhile is then seen twice, not missed
            starting = dict(self._starting)
        running = self.active_associations
        for assoc in running:  # ... and counted once: a running association drops its own connection from `starting`
            starting.pop(id(getattr(assoc.dul.socket, "socket", None)), None)
        return [a.requestor.address_info.address for a in running if a.requestor.address_info] + \
            list(starting.values())

    def verify_request(self, request: socket.socket | tuple[bytes, socket.socket],
                       client_address: tuple[str, int] | str) -> bool:
        try:
            return self._admit(request, client_address)
        except Exception:  # socketserver calls this outside its own guard: an error here would stop the listener
            logger.exception("connection from %s: the connection limits could not be checked; admitted",
                             client_address)
            return True

    def _admit(self, request: object, client_address: tuple[str, int] | str) -> bool:
        """Whether a new connection stays open under the caps (counted from here on if so)."""
        peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        peers = self.open_connections()
        if len(peers) >= self.max_connections:
            key, limit = "max_connections", (f"{len(peers)} connections open "
                                             f"(node.max_connections = {self.max_connections})")
        elif peers.count(peer) >= self.max_connections_per_peer:
            key, limit = "max_connections_per_peer", (
                f"{peers.count(peer)} connections open from this address "
                f"(node.max_connections_per_peer = {self.max_connections_per_peer})")
        else:
            with self._connections_lock:
                self._starting[id(request)] = peer
            return True
        with self._connections_lock:
            if peer not in self._refused and len(self._refused) >= MAX_TRACKED_PEERS:
                self._refused.clear()  # many addresses (IPv6): forget the counts rather than grow without bound
            self._refused[peer] += 1
            refused = self._refused[peer]
        if self.on_refused is not None:
            self.on_refused(key)
        if refused & (refused - 1) == 0:  # the 1st, 2nd, 4th, 8th ... refusal per peer: a flood cannot flood the log
            logger.warning("connection from %s closed: %s; %d refused from this address since start", peer, limit,
                           refused)
        return False

    def process_request(self, request: socket.socket | tuple[bytes, socket.socket],
                        client_address: tuple[str, int] | str) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._started(request)
            raise

    def process_request_thread(self, request: socket.socket | tuple[bytes, socket.socket],
                               client_address: tuple[str, int] | str) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout_s)
                    request.do_handshake()
                except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                    logger.warning("TLS handshake with %s failed: %s", client_address, exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._started(request)

    def _started(self, request: object) -> None:
        """The connection is now counted by its association thread (or is closed)."""
        with self._connections_lock:
            self._starting.pop(id(request), None)


class Listener:
    """The running C-ECHO/C-STORE server: its port, its associations, and stopping it."""

    def __init__(self, server: ThreadedAssociationServer, ae: AE) -> None:
        self.server = server
        self.ae = ae
        self._thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="dicom-listener",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def active_associations(self) -> list[Association]:
        return list(self.server.active_associations)

    def stop_accepting(self) -> None:
        """Close the listening socket; associations already running continue."""
        socketserver.BaseServer.shutdown(self.server)
        self.server.server_close()
        self._thread.join(5.0)

    def close(self) -> None:
        """After the last association has ended: forget the AE's receive settings."""
        streamed_receive.disable(self.ae)


def _unbind_debug_loggers(server: Any) -> None:
    """Drop pynetdicom's per-PDU/per-message debug log handlers (they take the AE-wide lock each time);
    the node logs associations and instances itself."""
    from pynetdicom import _handlers

    for event, handler in ((evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
                           (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
                           (evt.EVT_DIMSE_RECV, _handlers.standard_dimse_recv_handler),
                           (evt.EVT_DIMSE_SENT, _handlers.standard_dimse_sent_handler)):
        if any(h[0] is handler for h in server.get_handlers(event)):
            server.unbind(event, handler)


def start_listener(cfg: NodeSection, spool: Spool, arrivals: Arrivals, identities: SeriesIdentities,
                   count: StoreCounter, limits: IngressSection | None = None,
                   rules: MprageSection | None = None,
                   count_refused_connection: Callable[[str], None] | None = None) -> Listener:
    """Start the C-ECHO/C-STORE SCP on ``cfg.host:cfg.port`` in background threads (``limits`` and ``rules``:
    what it accepts and keeps, see :func:`handle_store`; ``count_refused_connection``: told the limit's name for
    every connection closed at accept)."""
    ae = make_ae(cfg)
    tally = AssociationTally(count)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [spool, arrivals, identities, tally, limits, rules]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_CONN_OPEN, handle_connection_open, [cfg.network_timeout_s]),
        (evt.EVT_ACCEPTED, handle_accepted, [dict(cfg.tls_identities)]),
        (evt.EVT_REJECTED, handle_rejected),
        (evt.EVT_RELEASED, handle_released, [tally, arrivals]),
        (evt.EVT_ABORTED, handle_aborted, [tally, arrivals]),
        (evt.EVT_CONN_CLOSE, handle_connection_closed),
    ]
    event_driven = cfg.event_driven and fast_acceptor.supported()
    if cfg.event_driven and not event_driven:
        logger.warning("pynetdicom %s: event-driven reactors are written for 3.0; using the stock (polling) ones",
                       pynetdicom.__version__)
    server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers, ssl_context=ssl_context_for(cfg),
                            server_class=NodeAssociationServer, handshake_timeout_s=cfg.acse_timeout_s,
                            max_connections=cfg.max_connections, max_connections_per_peer=cfg.max_connections_per_peer,
                            on_refused=count_refused_connection,
                            request_handler=fast_acceptor.EventDrivenRequestHandler if event_driven else None)
    _unbind_debug_loggers(server)
    lim = limits or IngressSection()
    streamed_receive.enable(ae, spool.tmp_dir, lim.max_instance_mb * 2**20, spool.required_free_bytes,
                            file_meta_bytes)
    listener = Listener(server, ae)
    logger.info("listening as %s on %s:%d%s", cfg.ae_title, cfg.host, listener.port,
                "" if event_driven else " (polling reactors)")
    return listener
