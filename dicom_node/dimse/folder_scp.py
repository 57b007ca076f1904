"""A storage SCP that files what it receives under a folder: the C-MOVE/C-GET destination of retrospective
passes and harvests, and the demo's stand-in PACS. (The node's own listener, with its spool, limits and
series assembly, is :mod:`dicom_node.dimse.storage_scp`.)

Each instance goes to ``<folder>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, written to a temporary name,
fsynced and renamed before Success is answered. Every exception becomes a failure status and a log line;
the association never sees one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.dimse.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS
from dicom_node.dimse.storage_scp import TRANSFER_SYNTAXES, VERIFICATION
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
    if on_stored is not None:
        try:
            on_stored(path, ds)
        except Exception:
            logger.exception("after storing %s", path.name)
    return SUCCESS


class FolderSCP:
    """C-ECHO and C-STORE of ``sop_classes`` (default: every storage class) into ``folder``; ``on_stored`` is
    told of each instance written. ``allowed_calling_aets`` (empty: any) and ``min_free_bytes`` as the node's."""

    def __init__(self, ae_title: str, folder: Path, *, sop_classes: Sequence[UID] | None = None,
                 on_stored: Stored | None = None, allowed_calling_aets: Sequence[str] = (),
                 min_free_bytes: int = 0) -> None:
        self.folder = Path(folder)
        self.on_stored = on_stored
        self.min_free_bytes = min_free_bytes
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
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _store(self, event: Event) -> int:
        return store_to_folder(event, self.folder, self.on_stored, self.min_free_bytes)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on (host, port); return the bound port."""
        self.folder.mkdir(parents=True, exist_ok=True)
        server = self._ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        if server is None or server.socket is None:
            raise RuntimeError(f"storage SCP {self._ae.ae_title}: did not start")
        with self._lock:
            self._server = server
        return int(server.socket.getsockname()[1])

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> FolderSCP:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
