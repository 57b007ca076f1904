"""A storage SCP that files what it receives under a folder: the C-MOVE/C-GET destination of retrospective
passes and harvests, and the demo's stand-in PACS. (The node's own listener, with its spool, limits and
series assembly, is :mod:`dicom_node.dimse.storage_scp`.)

Each instance goes to ``<folder>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, written to a temporary name,
fsynced and renamed before Success is answered. Every exception becomes a failure status and a log line;
the association never sees one. With a TLS context it speaks DICOM over TLS only, with the node
listener's server (handshake off the listening thread) and its AE-title-to-certificate binding.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import ssl
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicom_node.dimse import streamed_receive
from dicom_node.dimse.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from dicom_node.dimse.storage_scp import (
    TRANSFER_SYNTAXES,
    VERIFICATION,
    Listener,
    NodeAssociationServer,
    handle_accepted,
)
from dicom_node.uids import require_uid

logger = logging.getLogger(__name__)

Stored = Callable[[Path, Dataset], None]


def _file(event: Event, folder: Path) -> tuple[Path, Dataset]:
    ds = event.dataset
    ds.file_meta = event.file_meta
    series = require_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop = require_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    target_dir = folder / series
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{sop}.dcm"
    tmp = target_dir / f".{sop}.{uuid.uuid4().hex}.part"
    try:
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target, ds


def store_to_folder(event: Event, folder: Path, on_stored: Stored | None = None, min_free_bytes: int = 0) -> int:
    """C-STORE handler: write the instance to ``folder/<SeriesUID>/<SOPUID>.dcm``; return the status. Refused
    (Out of Resources) when it would leave less than ``min_free_bytes`` free."""
    try:
        if min_free_bytes and shutil.disk_usage(folder).free < min_free_bytes + 2 * 2**20:
            logger.error("refusing a received instance: less than %d MiB would remain free in %s",
                         min_free_bytes // 2**20, folder)
            return OUT_OF_RESOURCES
        path, ds = _file(event, folder)
    except OSError as exc:
        logger.error("storing a received instance failed: %s", exc)
        return OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE
    except ValueError as exc:
        logger.error("refusing a received instance: %s", exc)
        return CANNOT_UNDERSTAND
    except Exception:
        logger.exception("storing a received instance failed")
        return PROCESSING_FAILURE
    finally:
        streamed_receive.discard_temporary_file(event.request)
    if on_stored is not None:
        try:
            on_stored(path, ds)
        except Exception:
            logger.exception("after storing %s", path.name)
    return SUCCESS


class FolderSCP:
    """C-ECHO and C-STORE of ``sop_classes`` (default: every storage class) into ``folder``; ``on_stored`` is
    told of each instance written. ``allowed_calling_aets`` (empty: any), ``min_free_bytes``, ``ssl_context`` and
    ``tls_identities`` (calling AE title -> certificate name) as the node's listener."""

    def __init__(self, ae_title: str, folder: Path, *, sop_classes: Sequence[UID] | None = None,
                 on_stored: Stored | None = None, allowed_calling_aets: Sequence[str] = (),
                 min_free_bytes: int = 0, ssl_context: ssl.SSLContext | None = None,
                 tls_identities: Mapping[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.on_stored = on_stored
        self.min_free_bytes = min_free_bytes
        self.ssl_context = ssl_context
        self.tls_identities = dict(tls_identities or {})
        ae = AE(ae_title=ae_title)
        ae.require_calling_aet = list(allowed_calling_aets)
        ae.maximum_pdu_size = 0
        if sop_classes is None:
            ae.supported_contexts = AllStoragePresentationContexts
        else:
            for sop_class in sop_classes:
                ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION)
        self._ae = ae
        self._listener: Listener | None = None
        self._lock = threading.Lock()

    def _store(self, event: Event) -> int:
        return store_to_folder(event, self.folder, self.on_stored, self.min_free_bytes)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on (host, port); return the bound port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._store),
                               (evt.EVT_ACCEPTED, handle_accepted, [self.tls_identities])]
        server = self._ae.make_server((host, port), evt_handlers=handlers, ssl_context=self.ssl_context,
                                      server_class=NodeAssociationServer, handshake_timeout_s=self._ae.acse_timeout)
        listener = Listener(server, self._ae)
        with self._lock:
            self._listener = listener
        return listener.port

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop_accepting()
            for assoc in listener.active_associations:
                assoc.abort()

    def __enter__(self) -> FolderSCP:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
