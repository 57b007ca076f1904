"""Event-driven association reactors for the listener (pynetdicom 3.0).

pynetdicom's acceptor runs two polling loops per association: the upper-layer (DUL) thread sleeps
1 ms whenever it finds nothing to do, and the association thread sleeps 1 ms on every turn. A
C-STORE waits for up to three of those sleeps (data in, message complete, response out); on two
cores that halves the ingest rate. The subclasses here keep pynetdicom's logic and state machine and
replace the sleeps with waits that end as soon as there is work:

- the DUL thread waits in ``select`` on the peer's socket and on a wake-up socket that is poked when
  the association puts a primitive on its outgoing queue;
- the association thread waits on an event set whenever a DIMSE message or an ACSE primitive
  arrives on its queues;
- the socket reads a PDU with a few large ``recv`` calls instead of one per 4 KiB.

Both waits are bounded (``IDLE_WAIT_S``), so timers (ARTIM, network timeout) and kill flags are
checked as before. The reactors mirror pynetdicom 3.0's ``DULServiceProvider.run_reactor`` and
``Association._run_reactor``; :func:`supported` gates them on that version, and with any other
version (or ``node.event_driven = false``) the stock classes are used.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.dimse.reactor_pause import PauseSafeAssociation

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.02  # longest a reactor waits before re-checking timers and flags
RECV_CHUNK = 256 * 1024  # bytes per recv() call (pynetdicom reads 4 KiB at a time: 32 calls per 128 KiB PDU)
PDU_SLACK = 64 * 1024  # over maximum_pdu_size: room for an association request with many contexts
MODE_ACCEPTOR = "acceptor"


def supported() -> bool:
    """True for the pynetdicom versions whose reactors these subclasses mirror."""
    return pynetdicom.__version__.startswith("3.0.")


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``wake()`` after every put."""

    def __init__(self, wake: Any) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class BulkRecvSocket(AssociationSocket):
    """An association socket that reads a PDU with a few large ``recv`` calls instead of 4 KiB ones, and bounds
    what a peer can make one read cost: a declared PDU length over the AE's ``maximum_pdu_size`` (plus
    ``PDU_SLACK``, which an association request may use) and a PDU that takes longer than the network timeout to
    arrive (a peer trickling bytes) each end the connection (pynetdicom: transport closed) before it is read."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = cast(socket.socket, self.socket)
        ae = self.assoc.ae
        if ae.maximum_pdu_size and nr_bytes > ae.maximum_pdu_size + PDU_SLACK:
            logger.warning("association from %s: a PDU of %d bytes declared, over node.max_pdu (%d): connection "
                           "closed", self.assoc.requestor.ae_title or "?", nr_bytes, ae.maximum_pdu_size)
            raise OSError(f"PDU of {nr_bytes} bytes declared, over the {ae.maximum_pdu_size}-byte maximum")
        deadline = None if ae.network_timeout is None else time.monotonic() + ae.network_timeout
        data = bytearray()
        while len(data) < nr_bytes:
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("association from %s: a %d-byte PDU did not arrive within the network timeout "
                               "(%g s): connection closed", self.assoc.requestor.ae_title or "?", nr_bytes,
                               ae.network_timeout)
                raise OSError(f"PDU of {nr_bytes} bytes not received within {ae.network_timeout} s")
            chunk = sock.recv(min(nr_bytes - len(data), RECV_CHUNK))
            if not chunk:
                break  # the peer closed: the caller sees a short PDU
            data += chunk
        return data


class EventDrivenDUL(DULServiceProvider):
    """The DUL reactor, waiting in ``select`` instead of sleeping."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self.to_provider_queue = _WakingQueue(self._poke)

    def _poke(self) -> None:
        with contextlib.suppress(OSError):  # full (already poked) or closed (the reactor ended)
            self._wake_send.send(b"\0")

    def _wait_for_work(self) -> None:
        waitables: list[Any] = [self._wake_recv]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes are buffered: select would not see them
            if sock.fileno() >= 0:
                waitables.append(sock)
        try:
            ready, _, _ = select.select(waitables, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket closed under us: check the state machine again
            return
        if self._wake_recv in ready:
            try:
                while self._wake_recv.recv(4096):
                    pass
            except OSError:
                pass

    def receive_pdu(self, wait: bool = False, timeout: float | None = None) -> Any:
        """pynetdicom's ``receive_pdu``, except that a wait ends as soon as the connection has closed.

        pynetdicom's acceptor waits the whole ACSE timeout for an association request even when the peer has
        already gone (a port check, a scanner that gave up): the connection would hold its association slot,
        and its place under ``node.max_connections``, for that long.
        """
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = IDLE_WAIT_S * 5 if deadline is None else min(IDLE_WAIT_S * 5, deadline - time.monotonic())
            primitive = super().receive_pdu(wait=True, timeout=max(left, 0.0))
            if primitive is not None:
                return primitive
            if self._connection_closed() or (deadline is not None and time.monotonic() >= deadline):
                return super().receive_pdu(wait=False)  # one last look: the closing may have queued something

    def _connection_closed(self) -> bool:
        sock = self.socket
        return sock is None or sock.socket is None or not sock._is_connected or not self.is_alive()

    def run_reactor(self) -> None:
        """pynetdicom 3.0's DUL loop, with :meth:`_wait_for_work` where it slept."""
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    logger.error("exception in the DUL reactor, aborting the association: %s", exc)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    cast(AssociationSocket, self.socket).send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    self._wait_for_work()
                    continue
                self.state_machine.do_action(event)
        finally:
            self._wake_send.close()
            self._wake_recv.close()


class EventDrivenAssociation(PauseSafeAssociation):
    """An acceptor association whose reactor waits for messages instead of sleeping."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self._work = threading.Event()
        self.dul = EventDrivenDUL(self)
        self.dul.to_user_queue = _WakingQueue(self._work.set)
        self.dimse.msg_queue = _WakingQueue(self._work.set)

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop, waiting on ``_work`` where it slept."""
        self._is_paused = False
        while not self._kill:
            self._work.wait(IDLE_WAIT_S)
            self._work.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._work.set()  # there may be more
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.warning("network timeout: closing the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """The server's per-connection handler, creating :class:`EventDrivenAssociation` acceptors.

    Mirrors pynetdicom 3.0's ``RequestHandler._create_association``.
    """

    def _create_association(self) -> Association:
        assoc = EventDrivenAssociation(self.ae, MODE_ACCEPTOR)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BulkRecvSocket(assoc, client_socket=cast(socket.socket, self.request)))
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        handlers: Any = self.server._handlers
        for event in handlers:
            if event.is_intervention and handlers[event]:
                assoc.bind(event, *handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
