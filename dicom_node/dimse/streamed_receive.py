"""C-STORE data sets stream to a file as they arrive instead of sitting whole in memory.

pynetdicom (``_config.STORE_RECV_CHUNKED_DATASET``) writes each received C-STORE data set, fragment by
fragment in the association's upper-layer thread, to a ``NamedTemporaryFile`` and gives the handler its
path. For the associations of an AE registered with :func:`enable`, that file is a :class:`ReceiveFile`:

- in the spool's ``tmp/`` folder, so the spool renames the finished file into place (no copy);
- with the node's own File Meta Information (it names the calling AE title): pynetdicom's preamble is
  skipped and its ``create_file_meta``/``write_file_meta_info`` calls are answered with ours (cheaper than
  building a pydicom data set per instance);
- bounded: once the data set passes ``max_bytes``, or the disk would fall below ``floor()`` bytes free,
  the rest is counted but not written, and the handler refuses the instance naming the limit.

A file whose association ends before the data set is complete is deleted (:func:`discard_unfinished`).
pynetdicom's switch is process-wide while an AE is registered: other SCPs in the process get ordinary
temporary files and read their data sets through ``event.dataset`` as before. pynetdicom deletes such a
file after an SCP's handler but not after a C-STORE sub-operation of a C-GET (received by the requestor):
that handler calls :func:`discard_temporary_file`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.filebase import DicomBytesIO
from pynetdicom import _config, dimse_messages

_NamedTemporaryFile = dimse_messages.NamedTemporaryFile  # type: ignore[attr-defined]
_pynetdicom_create_file_meta = dimse_messages.create_file_meta  # type: ignore[attr-defined]
_pydicom_write_file_meta_info = dimse_messages.write_file_meta_info  # type: ignore[attr-defined]

logger = logging.getLogger(__name__)

BUFFER_BYTES = 4 * 2**20  # received bytes are written to the file in chunks of about this size
SPACE_CHECK_BYTES = 16 * 2**20  # free space is checked again after at most this many bytes written
PREFIX = "recv-"  # the spool deletes leftovers of a crash (anything in tmp/ that is not a known partial write)

MetaFor = Callable[[str, str, str, str], bytes]  # (SOP class, SOP instance, transfer syntax, calling AE) -> header


@dataclass(frozen=True)
class Settings:
    folder: Path
    max_bytes: float
    floor: Callable[[], int]  # bytes that must stay free
    meta_for: MetaFor


_settings: dict[int, Settings] = {}  # id(AE) -> how its associations receive
_open: dict[int, set[ReceiveFile]] = {}  # id(association) -> its data sets still being received
_open_lock = threading.Lock()


class ReceiveFile:
    """The file one C-STORE data set is written to, with the attributes pynetdicom uses (``name``, ``write``,
    ``file.flush``, ``close``). Writes are gathered into ``BUFFER_BYTES`` chunks (pynetdicom flushes after
    every fragment: that flush does nothing here). ``refusal`` says why bytes were dropped; ``data_bytes``
    counts the data set as received."""

    def __init__(self, settings: Settings, owner: int) -> None:
        self.fd, self.name = tempfile.mkstemp(prefix=PREFIX, suffix=".part", dir=settings.folder)
        self.settings = settings
        self.owner = owner
        self.data_bytes = 0
        self.refusal: str | None = None
        self.out_of_space = False  # the refusal is for want of space (a retry may succeed)
        self._buffer = bytearray()
        self._written = 0
        self._next_space_check = 0
        self._in_header = True  # pynetdicom's preamble and "DICM" are skipped until begin() writes our header
        self.header_bytes = 0  # where the data set starts in the file
        self._closed = False
        with _open_lock:
            _open.setdefault(owner, set()).add(self)

    @property
    def file(self) -> ReceiveFile:
        return self

    def flush(self) -> None:
        """pynetdicom's flush after each fragment: the bytes stay in the buffer until it is full or closed."""

    def begin(self, header: bytes) -> None:
        """Write the preamble and File Meta Information; what is written after it is the data set."""
        self._buffer += header
        self.header_bytes = len(header)
        self._in_header = False

    def write(self, data: bytes) -> int:
        if self._in_header:
            return len(data)
        self.data_bytes += len(data)
        if self.refusal is None:
            self._buffer += data
            if self.data_bytes > self.settings.max_bytes:
                self._refuse(f"instance exceeds ingress.max_instance_mb {self.settings.max_bytes / 2**20:g}")
            elif len(self._buffer) >= BUFFER_BYTES:
                self._drain()
        return len(data)

    def _drain(self) -> None:
        """Write the buffer to the file; free space is checked before the room found at the last check is used."""
        if self.refusal is not None or not self._buffer:
            return
        if self._written + len(self._buffer) > self._next_space_check:
            st = os.statvfs(self.settings.folder)
            floor = self.settings.floor()
            headroom = st.f_bavail * st.f_frsize - floor  # what may be written before the floor is reached
            if headroom < len(self._buffer):
                self._refuse(f"storage full: less than the {floor // 2**20} MiB the node keeps free would remain",
                             space=True)
                return
            self._next_space_check = self._written + min(SPACE_CHECK_BYTES, headroom)  # checked before it is used
        try:
            with memoryview(self._buffer) as view:
                done = 0
                while done < len(view):
                    done += os.write(self.fd, view[done:])
            self._written += done
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._refuse("storage full: the disk filled while receiving", space=True)
        self._buffer.clear()

    def _refuse(self, why: str, space: bool = False) -> None:
        """Stop writing: free what was written, keep counting (the association carries on)."""
        self.refusal = why
        self.out_of_space = space
        self._buffer = bytearray()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)

    def close(self) -> None:
        """Write what is buffered and close (idempotent)."""
        if self._closed:
            return
        try:
            self._drain()
        finally:
            self._closed = True
            os.close(self.fd)
            with _open_lock:
                files = _open.get(self.owner)
                if files is not None:
                    files.discard(self)
                    if not files:
                        del _open[self.owner]


def _receiving_settings() -> tuple[Settings | None, Any]:
    """The settings of the AE whose association this upper-layer (DUL) thread serves (pynetdicom decodes in
    that thread, which knows its association), and the association."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    return (_settings.get(id(assoc.ae)) if assoc is not None else None), assoc


def _temporary_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``NamedTemporaryFile`` in pynetdicom's C-STORE decoding."""
    settings, assoc = _receiving_settings()
    if settings is None:
        return _NamedTemporaryFile(*args, **kwargs)
    return ReceiveFile(settings, id(assoc))


def _create_file_meta(**kwargs: Any) -> Any:
    """Stands in for pynetdicom's ``create_file_meta``: our File Meta Information, as bytes, for a streamed data
    set (pynetdicom's, as a data set, otherwise or when ours cannot be made)."""
    settings, assoc = _receiving_settings()
    if settings is not None:
        try:
            return settings.meta_for(str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]),
                                     str(kwargs["transfer_syntax"]), assoc.requestor.ae_title)
        except Exception:  # a malformed command: pynetdicom's header is written; the handler refuses it
            pass
    return _pynetdicom_create_file_meta(**kwargs)


def _write_file_meta_info(fp: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
    """Stands in for pydicom's ``write_file_meta_info`` in pynetdicom's C-STORE decoding."""
    if not isinstance(fp, ReceiveFile):
        _pydicom_write_file_meta_info(fp, meta, *args, **kwargs)
        return
    if isinstance(meta, bytes):
        fp.begin(meta)
        return
    encoded = DicomBytesIO()
    _pydicom_write_file_meta_info(encoded, meta, *args, **kwargs)
    fp.begin(b"\0" * 128 + b"DICM" + encoded.getvalue())


def enable(ae: Any, folder: Path, max_bytes: float, floor: Callable[[], int], meta_for: MetaFor) -> None:
    """Stream every C-STORE data set that ``ae``'s associations receive into ``folder`` (see the module
    docstring); until :func:`disable`."""
    _settings[id(ae)] = Settings(Path(folder), float(max_bytes), floor, meta_for)
    dimse_messages.NamedTemporaryFile = _temporary_file  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined,assignment]
    _config.STORE_RECV_CHUNKED_DATASET = True


def disable(ae: Any) -> None:
    """Forget ``ae``'s settings; with the last AE gone, pynetdicom receives data sets in memory again."""
    _settings.pop(id(ae), None)
    if not _settings:
        _config.STORE_RECV_CHUNKED_DATASET = False


def discard_temporary_file(request: Any) -> None:
    """Close and delete the ordinary temporary file (not a :class:`ReceiveFile`) a C-STORE data set was
    received into, once the handler has read it."""
    f = getattr(request, "_dataset_file", None)
    if f is None or isinstance(f, ReceiveFile):
        return
    with contextlib.suppress(OSError):
        f.close()
    with contextlib.suppress(OSError):
        os.unlink(f.name)


def received_file(request: Any) -> ReceiveFile | None:
    """The :class:`ReceiveFile` of a C-STORE request (None if it was received otherwise)."""
    f = getattr(request, "_dataset_file", None)
    return f if isinstance(f, ReceiveFile) else None


def discard_unfinished(assoc: Any) -> int:
    """Delete the files of data sets the association did not finish sending; return how many."""
    with _open_lock:
        files = _open.pop(id(assoc), set())
    for f in files:
        f.refusal = f.refusal or "association ended"
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            os.unlink(f.name)
    return len(files)
