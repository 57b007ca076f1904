"""Associations with an archive: named DIMSE statuses, errors that say which archive and what, and
per-source association slots shared by every synthmrf process on the machine.

A *slot* is an ``flock`` on ``<storage_dir>/retro/locks/<source>.<n>.lock`` (n < max_associations):
an association to a source is opened only while its holder has a slot, so ``max_associations = 1``
means one association at a time to that archive, whether the pass runs in ``synthmrf serve`` or on
the command line. The OS releases the lock of a process that dies.

Every Query/Retrieve association of synthmrf is made here (``_ae``), so this is where pynetdicom is
told not to log C-FIND/C-MOVE/C-GET identifiers: it logs them at INFO by default, PatientID and
PatientName included.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node.dimse.client import Peer, client_tls, connection_handler
from dicom_node.dimse.reactor_pause import use_for_requestors
from dicom_node.dimse.status import STATUS_NAMES, UNABLE_TO_PROCESS_FIRST, UNABLE_TO_PROCESS_LAST
from dicom_node.dimse.storage_scp import TRANSFER_SYNTAXES
from dicom_node.retro.config import SourceConfig

logger = logging.getLogger(__name__)


# Storage SOP classes we accept on a C-GET association (SCP role): MR images and the MRF Parametric Maps
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.4")
PARAMETRIC_MAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.30")
SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
GET_STORAGE_CLASSES = (MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_MR_IMAGE_STORAGE,
                       PARAMETRIC_MAP_STORAGE, SECONDARY_CAPTURE_IMAGE_STORAGE)

FIND_MODEL = StudyRootQueryRetrieveInformationModelFind
MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove
GET_MODEL = StudyRootQueryRetrieveInformationModelGet

StoreHandler = Callable[[Event], int]


def status_text(code: int | None) -> str:
    """A status code as ``0xA801 (refused: move destination unknown)``."""
    if code is None:
        return "no response (timeout or abort)"
    if UNABLE_TO_PROCESS_FIRST <= code <= UNABLE_TO_PROCESS_LAST:
        return f"0x{code:04X} (failed: unable to process)"
    return f"0x{code:04X} ({STATUS_NAMES.get(code, 'unknown status')})"


class ArchiveError(Exception):
    """Talking to an archive failed; the message names the source and what happened."""


class ArchiveUnavailableError(ArchiveError):
    """The archive could not be reached, refused the association, or went away: try again later."""


@dataclass(frozen=True)
class Archive:
    """A source with the AE titles we use towards it."""

    source: SourceConfig
    calling_ae_title: str
    move_destination: str

    def __str__(self) -> str:
        s = self.source
        return f"source {s.name!r} ({s.ae_title}@{s.host}:{s.port})"


def archive_for(source: SourceConfig, node_ae_title: str) -> Archive:
    return Archive(source, source.calling_ae_title or node_ae_title, source.move_destination or node_ae_title)


class SourceSlots:
    """Association slots of one source: at most ``max_associations`` holders on this machine."""

    def __init__(self, lock_dir: Path, source: SourceConfig) -> None:
        self.lock_dir = Path(lock_dir)
        self.source = source

    def _take(self) -> tuple[int, int] | None:
        """(slot number, locked descriptor) of a free slot, or None."""
        for n in range(self.source.max_associations):
            fd = os.open(self.lock_dir / f"{self.source.name}.{n}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return n, fd
        return None

    @contextmanager
    def slot(self, stop: threading.Event | None = None, *, check: Callable[[], None] | None = None,
             max_wait_s: float | None = None, poll_s: float = 0.2) -> Iterator[int]:
        """Hold a free slot, waiting for one (polled, logged once at WARNING). While waiting, ``check()``
        may raise to give up (a run window that closed), a set ``stop`` raises :class:`ArchiveError`, and
        after ``max_wait_s`` (default: the source's ``slot_wait_s``) :class:`ArchiveUnavailableError`."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        wait_s = self.source.slot_wait_s if max_wait_s is None else max_wait_s
        deadline = time.monotonic() + wait_s
        warned = False
        while (taken := self._take()) is None:
            if not warned:
                logger.warning("source %s: all %d association slots are busy (other passes or harvests); waiting "
                               "up to %g s", self.source.name, self.source.max_associations, wait_s)
                warned = True
            if check is not None:
                check()
            if time.monotonic() >= deadline:
                raise ArchiveUnavailableError(
                    f"source {self.source.name!r}: all {self.source.max_associations} association slots stayed busy "
                    f"for {wait_s:g} s (other passes or harvests hold them); try again later")
            if stop is None:
                time.sleep(poll_s)
            elif stop.wait(poll_s):
                raise ArchiveError(f"source {self.source.name!r}: stopped while waiting for a free association")
        n, fd = taken
        try:
            yield n
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _ae(archive: Archive, dimse_timeout_s: float) -> AE:
    # pynetdicom logs C-FIND/C-MOVE/C-GET identifiers (PatientID, PatientName) at INFO unless told otherwise
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    s = archive.source
    use_for_requestors()
    ae = AE(ae_title=archive.calling_ae_title)
    ae.connection_timeout = s.connect_timeout_s
    ae.acse_timeout = s.connect_timeout_s
    ae.dimse_timeout = dimse_timeout_s
    ae.network_timeout = max(dimse_timeout_s, s.connect_timeout_s)
    ae.maximum_pdu_size = 0  # accept any PDU size the archive sends
    return ae


def _why_not_established(source: SourceConfig) -> str:
    """pynetdicom reports a refused TCP connection as an abort; tell the two apart with a plain connect."""
    try:
        with socket.create_connection((source.host, source.port), timeout=source.connect_timeout_s):
            pass
    except OSError as exc:
        return f"cannot connect ({exc.strerror or type(exc).__name__}): is the archive running and the address right?"
    return "association aborted by the archive (or no answer within connect_timeout_s)"


@contextmanager
def associate(archive: Archive, *, get_handler: StoreHandler | None = None,
              storage_classes: Sequence[UID] = GET_STORAGE_CLASSES) -> Iterator[Association]:
    """An association offering C-FIND and C-MOVE (and, with ``get_handler``, C-GET with SCP role for
    ``storage_classes``, each C-STORE sub-operation handed to ``get_handler``); released at the end,
    aborted if the block raised. :class:`ArchiveUnavailableError` if it cannot be established."""
    s = archive.source
    ae = _ae(archive, max(s.find_timeout_s, s.retrieve_timeout_s))
    ae.add_requested_context(FIND_MODEL)
    ae.add_requested_context(MOVE_MODEL)
    roles = []
    handlers: list[tuple[evt.EventType, object] | tuple[evt.EventType, object, list[object]]] = [
        connection_handler(ae)]
    if get_handler is not None:
        ae.add_requested_context(GET_MODEL)
        for sop_class in storage_classes:
            ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
            roles.append(build_role(sop_class, scp_role=True))
        handlers.append((evt.EVT_C_STORE, get_handler))
    try:
        tls = client_tls(Peer(s.ae_title, s.host, s.port, s.tls, s.tls_ca, s.tls_cert, s.tls_key))
        assoc = ae.associate(s.host, s.port, ae_title=s.ae_title, ext_neg=roles or None,  # type: ignore[arg-type]
                             evt_handlers=handlers, tls_args=tls)  # type: ignore[arg-type]
    except (OSError, ssl.SSLError) as exc:  # name resolution, TLS set-up: failures before any DICOM is spoken
        raise ArchiveUnavailableError(f"{archive}: cannot connect ({exc})") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected (is our AE title " f"{archive.calling_ae_title!r} known to the archive?)"
        else:
            why = _why_not_established(s)
        raise ArchiveUnavailableError(f"{archive}: {why}")
    ok = False
    try:
        yield assoc
        ok = True
    finally:
        if assoc.is_established:
            if ok:
                assoc.release()
            else:
                assoc.abort()


class ArchiveSession:
    """An association to the archive opened on demand (holding a source slot), closed for long waits;
    with ``get_dir``, C-GET sub-operations are filed there (``dimse.folder_scp.store_to_folder``). ``check`` is
    called while waiting for a slot and may raise to give up (see :meth:`SourceSlots.slot`)."""

    def __init__(self, archive: Archive, slots: SourceSlots, stop: threading.Event, get_dir: Path | None, *,
                 check: Callable[[], None] | None = None) -> None:
        self.archive = archive
        self.slots = slots
        self.stop = stop
        self.get_dir = get_dir
        self.check = check
        self._stack: ExitStack | None = None
        self._assoc: Association | None = None
        self._aborted = False
        self.last_study_start: float | None = None  # the rate limit's clock within the pass
        self.node_checked = False  # the node answered C-ECHO during this session's pass

    def assoc(self) -> Association:
        if self._aborted:
            raise ArchiveUnavailableError(f"{self.archive}: the association was aborted by a stop")
        if self._assoc is not None and self._assoc.is_established:
            return self._assoc
        self.close()
        stack = ExitStack()
        try:
            stack.enter_context(self.slots.slot(self.stop, check=self.check))
            handler = None
            if self.get_dir is not None:
                from dicom_node.dimse.folder_scp import store_to_folder

                folder = self.get_dir

                def handler(event: Event) -> int:
                    return store_to_folder(event, folder)
            self._assoc = stack.enter_context(associate(self.archive, get_handler=handler))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        if self._aborted:  # aborted while this association was being set up
            self.abort()
        return self._assoc

    def abort(self) -> None:
        """From another thread (a stop): abort the open association, so that a C-FIND, C-MOVE or C-GET
        waiting on it returns at once (as if the archive had gone), and open no other."""
        self._aborted = True
        assoc = self._assoc
        if assoc is None:
            return
        if assoc.is_established:
            assoc.abort()
        assoc.dimse.msg_queue.put((None, None))  # wake the waiting thread, as pynetdicom does for a peer's abort

    def close(self, error: bool = False) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            if error and self._assoc is not None and self._assoc.is_established:
                self._assoc.abort()
            self._assoc = None
            stack.close()
