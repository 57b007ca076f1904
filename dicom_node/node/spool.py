"""The durable spool: received instances on disk, grouped by series, claimed into numbered versions.

Layout under the storage folder (every name below ``series/`` is a validated UID or a fixed word)::

    tmp/  (or tmp/<node>/)                 partial writes; emptied at start
    series/<SeriesUID>/incoming/<SOPUID>.dcm  acknowledged instances not yet claimed
    series/<SeriesUID>/v0001/input/*.dcm      a claimed version: the series as it was processed
    series/<SeriesUID>/v0001/output/          what the processor wrote for that version
    series/<SeriesUID>/.v0002.claim/           a claim in progress (finished on the next start)

An instance is received into a file in ``tmp/`` (see :mod:`dicom_node.dimse.streamed_receive`), fsynced,
then renamed into ``incoming/``; only then is it acknowledged. The fsync makes the bytes and the temporary name durable
(ext4, XFS and btrfs commit a new file's directory entry with its fsync); if a crash loses the rename,
the next start finds the complete file in ``tmp/`` and rolls it forward (by the UIDs it holds).
``fsync_directories`` adds an fsync of ``incoming/`` after each rename (strict POSIX, about twice the
flushes per instance).
A *claim* renames ``incoming/`` into a new version and links the previous version's instances next to
it, so every version holds the whole series; the final rename of ``.vNNNN.claim`` to ``vNNNN`` is the
commit point. SOP Instance UIDs seen in any version or in ``incoming/`` are duplicates: they are
acknowledged and dropped (the first copy wins), for as long as the series is kept (see retention).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dicom_node.uids import require_uid

logger = logging.getLogger(__name__)

SUFFIX = ".dcm"
_VERSION = re.compile(r"v(\d{4,})")
_CLAIM = re.compile(r"\.v(\d{4,})\.claim")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class SpoolFullError(Exception):
    """Storing would leave less free space than the configured minimum, or the disk is full."""


class StoredNotSyncedError(Exception):
    """The instance was renamed into ``incoming/`` but fsyncing the folder failed: the file is kept (it
    counts as received, and a resend is a duplicate) but must not be acknowledged."""


class StoreOutcome(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Claim:
    """A version of a series, claimed from ``incoming/``: ``input`` holds the whole series."""

    series_uid: str
    version: int
    folder: Path
    new_instances: int
    total_instances: int

    @property
    def input_dir(self) -> Path:
        return self.folder / "input"

    @property
    def output_dir(self) -> Path:
        return self.folder / "output"


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_durable(path: Path) -> None:
    """Create ``path`` (and missing parents) and fsync each parent whose listing changed."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        fsync_dir(folder.parent)


def _write_all(fd: int, parts: list[bytes | memoryview], size: int) -> None:
    """``writev`` until all ``size`` bytes of ``parts`` are written."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    written = 0
    while views:
        n = os.writev(fd, views)
        written += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    if written != size:
        raise OSError(errno.EIO, f"wrote {written} of {size} bytes")


def version_name(version: int) -> str:
    return f"v{version:04d}"


class Spool:
    """The spool folder of a node. Thread-safe. Several nodes may share it (each with its own ``tmp_name``) when
    the job store's series locks order their claims (backend 'postgres'); else one node per folder."""

    def __init__(self, root: Path, min_free_bytes: int = 0, fsync_directories: bool = False,
                 tmp_name: str = "", reserve: Callable[[], int] = lambda: 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self.reserve = reserve  # bytes promised to work in hand (results of received series), kept free too
        self.fsync_directories = fsync_directories
        # tmp/ (one node per folder), or tmp/<name>/ per node when several nodes share the folder
        self.tmp_dir = self.root / "tmp" / tmp_name if tmp_name else self.root / "tmp"
        self.series_root = self.root / "series"
        self._tmp, self._series = str(self.tmp_dir), str(self.series_root)
        self._lock = threading.Lock()  # incoming/ and the known SOP Instance UIDs
        self._versions_lock = threading.Lock()  # a claim linking a version's files vs. retention deleting it
        self._known: dict[str, set[str]] = {}
        self._incoming_bytes: dict[str, int] = {}  # series -> bytes in incoming/ (counted at prepare, then kept)
        self._unsynced: set[tuple[str, str]] = set()  # (series, SOP) in incoming/ whose folder fsync failed
        self._counter = itertools.count()

    # -- start-up -------------------------------------------------------------------------------------------

    def prepare(self, complete_uids: Callable[[Path], tuple[str, str] | None] = lambda path: None) -> int:
        """Create the folders and settle what a crash left in ``tmp/``; return how many were rolled forward.

        A leftover file that ``complete_uids`` reads as a whole instance (series and SOP Instance UID) was
        fsynced, possibly acknowledged, before its rename was lost: it is moved into place. Anything else
        in ``tmp/`` is a partial write and is deleted.
        """
        _mkdir_durable(self.tmp_dir)
        _mkdir_durable(self.series_root)
        rolled = 0
        for leftover in sorted(self.tmp_dir.iterdir()):
            uids = complete_uids(leftover) if leftover.is_file() else None
            if uids is not None:
                try:
                    series, sop = require_uid(uids[0], "SeriesInstanceUID"), require_uid(uids[1], "SOPInstanceUID")
                    outcome = self._place(series, sop, leftover)
                except ValueError:
                    outcome = StoreOutcome.DUPLICATE
                if outcome is StoreOutcome.STORED:
                    rolled += 1
                    logger.warning("rolled forward %s of series %s (its rename was lost in a crash)", uids[1],
                                   uids[0], extra={"series_uid": uids[0], "sop_uid": uids[1]})
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        with self._lock:
            for series in self.series_uids():
                incoming = self.series_root / series / "incoming"
                if incoming.is_dir():
                    self._incoming_bytes[series] = sum(f.stat().st_size for f in os.scandir(incoming))
        return rolled

    def finish_interrupted_claims(self, series_uids: Iterable[str] | None = None) -> list[Claim]:
        """Complete claims a crash or an error interrupted (their ``incoming/`` was already moved) and return
        them; of every series, or of ``series_uids``."""
        done = []
        for series in self.series_uids() if series_uids is None else series_uids:
            folder = self.series_dir(series)
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                m = _CLAIM.fullmatch(entry.name)
                if not m:
                    continue
                if not (entry / "input").is_dir():
                    shutil.rmtree(entry)  # crashed before incoming/ was moved: nothing was claimed
                    continue
                done.append(self._commit_claim(series, int(m.group(1)), entry))
                logger.warning("series %s: finished the interrupted claim of version %s", series, m.group(1),
                               extra={"series_uid": series})
        return done

    # -- receiving ------------------------------------------------------------------------------------------

    def series_dir(self, series_uid: str) -> Path:
        return self.series_root / require_uid(series_uid, "SeriesInstanceUID")

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def required_free_bytes(self) -> int:
        """What must stay free: the minimum plus the space promised to the results of work in hand."""
        return self.min_free_bytes + self.reserve()

    def incoming_bytes(self) -> int:
        """Bytes received and not yet claimed, over every series."""
        with self._lock:
            return sum(self._incoming_bytes.values())

    def check_space(self, nbytes: int) -> None:
        """Raise :class:`SpoolFullError` if writing ``nbytes`` would leave less than :meth:`required_free_bytes`."""
        free = self.free_bytes()
        required = self.required_free_bytes()
        if free - nbytes < required:
            raise SpoolFullError(f"{free // 2**20} MiB free, {nbytes} bytes to store, {required // 2**20} MiB kept "
                                 f"free (minimum {self.min_free_bytes // 2**20} MiB, the rest for results)")

    def _known_for(self, series_uid: str) -> set[str]:
        """SOP Instance UIDs already held for the series (call with the lock held)."""
        known = self._known.get(series_uid)
        if known is None:
            known = set()
            folder = self.series_root / series_uid
            if folder.is_dir():
                for sub in [folder / "incoming", *(p / "input" for p in folder.iterdir() if p.name != "incoming")]:
                    if sub.is_dir():
                        known.update(f.name[:-len(SUFFIX)] for f in os.scandir(sub) if f.name.endswith(SUFFIX))
            self._known[series_uid] = known
        return known

    def instance_count(self, series_uid: str) -> int:
        """How many distinct instances the series holds (arriving and in every version)."""
        with self._lock:
            return len(self._known_for(series_uid))

    def is_duplicate(self, series_uid: str, sop_uid: str) -> bool:
        with self._lock:
            return sop_uid in self._known_for(series_uid)

    def store_file(self, series_uid: str, sop_uid: str, path: str | Path) -> StoreOutcome:
        """Move a received DICOM file from ``tmp/`` into the series' ``incoming/``, durably.

        Returns DUPLICATE, deleting the file, if the series already holds that SOP Instance UID. The caller has
        kept the free-space floor while the file was written (:meth:`check_space`; the streamed receive checks
        as it writes). :class:`SpoolFullError` (the file is left to the caller) if the fsync meets a full disk;
        :class:`StoredNotSyncedError` when the instance is in ``incoming/`` but the folder's fsync
        (``fsync_directories``) failed. The file is fsynced before the rename: from then on a crash
        cannot lose it (``prepare`` rolls a complete leftover forward).
        """
        series_uid = require_uid(series_uid, "SeriesInstanceUID")
        sop_uid = require_uid(sop_uid, "SOPInstanceUID")
        if self.is_duplicate(series_uid, sop_uid):
            self._sync_unsynced(series_uid, sop_uid)
            os.unlink(path)
            return StoreOutcome.DUPLICATE
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise SpoolFullError(f"disk full while syncing a received instance ({exc.strerror})") from exc
            raise
        finally:
            os.close(fd)
        return self._place(series_uid, sop_uid, path)

    def store(self, series_uid: str, sop_uid: str, data: bytes | Sequence[bytes | memoryview]) -> StoreOutcome:
        """Write one instance from memory (DICOM file bytes, or parts written in order) and store it as
        :meth:`store_file` does; :class:`SpoolFullError` also when the bytes would not fit."""
        series_uid = require_uid(series_uid, "SeriesInstanceUID")
        sop_uid = require_uid(sop_uid, "SOPInstanceUID")
        if self.is_duplicate(series_uid, sop_uid):
            self._sync_unsynced(series_uid, sop_uid)
            return StoreOutcome.DUPLICATE
        parts: list[bytes | memoryview] = [data] if isinstance(data, bytes) else list(data)
        size = sum(len(p) for p in parts)
        self.check_space(size)
        tmp = os.path.join(self._tmp, f"{series_uid}_{sop_uid}.{next(self._counter)}.part")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _write_all(fd, parts, size)
            finally:
                os.close(fd)
            return self.store_file(series_uid, sop_uid, tmp)
        except OSError as exc:  # before the rename (StoredNotSyncedError comes after it)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in _NO_SPACE:
                raise SpoolFullError(f"disk full while writing {size} bytes ({exc.strerror})") from exc
            raise
        except SpoolFullError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _place(self, series_uid: str, sop_uid: str, tmp: str | Path) -> StoreOutcome:
        """Rename a fsynced file from ``tmp/`` into the series' ``incoming/`` unless it is a duplicate."""
        incoming = os.path.join(self._series, series_uid, "incoming")
        with self._lock:
            known = self._known_for(series_uid)
            if sop_uid in known:
                os.unlink(tmp)
                return StoreOutcome.DUPLICATE
            if not os.path.isdir(incoming):
                _mkdir_durable(Path(incoming))
            size = os.path.getsize(tmp)
            os.rename(tmp, os.path.join(incoming, sop_uid + SUFFIX))
            known.add(sop_uid)
            self._incoming_bytes[series_uid] = self._incoming_bytes.get(series_uid, 0) + size
            if self.fsync_directories:
                try:
                    fsync_dir(Path(incoming))
                except OSError as exc:
                    self._unsynced.add((series_uid, sop_uid))
                    raise StoredNotSyncedError(f"series {series_uid}: fsync of incoming/ failed after the rename "
                                               f"({exc.strerror})") from exc
        return StoreOutcome.STORED

    def _sync_unsynced(self, series_uid: str, sop_uid: str) -> None:
        """A duplicate of an instance whose folder fsync failed is acknowledged only once that fsync succeeds:
        try it again (:class:`StoredNotSyncedError` if it fails again)."""
        with self._lock:
            if (series_uid, sop_uid) not in self._unsynced:
                return
            incoming = self.series_dir(series_uid) / "incoming"
            if (incoming / (sop_uid + SUFFIX)).exists():  # otherwise a claim has taken it, durably
                try:
                    fsync_dir(incoming)
                except OSError as exc:
                    raise StoredNotSyncedError(f"series {series_uid}: fsync of incoming/ failed again "
                                               f"({exc.strerror})") from exc
            self._unsynced = {key for key in self._unsynced if key[0] != series_uid}  # one fsync covers them all

    def is_waiting(self, series_uid: str, sop_uid: str) -> bool:
        """True if the instance is in the series' ``incoming/`` (received, not yet claimed)."""
        return (self.series_dir(series_uid) / "incoming" / (require_uid(sop_uid, "SOPInstanceUID") + SUFFIX)).exists()

    # -- series and versions ----------------------------------------------------------------------------------

    def series_uids(self) -> list[str]:
        if not self.series_root.is_dir():
            return []
        return sorted(p.name for p in self.series_root.iterdir() if p.is_dir())

    def incoming_files(self, series_uid: str) -> list[Path]:
        incoming = self.series_dir(series_uid) / "incoming"
        if not incoming.is_dir():
            return []
        return sorted(p for p in incoming.iterdir() if p.name.endswith(SUFFIX))

    def versions(self, series_uid: str) -> list[int]:
        folder = self.series_dir(series_uid)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.fullmatch(p.name)))

    def version_dir(self, series_uid: str, version: int) -> Path:
        return self.series_dir(series_uid) / version_name(version)

    def input_bytes(self, series_uid: str, version: int) -> int:
        """Bytes of a claimed version's input (0 if it is gone)."""
        folder = self.version_dir(series_uid, version) / "input"
        try:
            return sum(f.stat().st_size for f in os.scandir(folder))
        except OSError:
            return 0

    def claim_of(self, series_uid: str, version: int) -> Claim:
        folder = self.version_dir(series_uid, version)
        n = sum(1 for p in (folder / "input").iterdir() if p.name.endswith(SUFFIX))
        return Claim(series_uid, version, folder, n, n)

    def claim(self, series_uid: str, at_least: int = 1) -> Claim | None:
        """Move the series' incoming instances into a new version (with the earlier ones); None if none.

        The version number is one more than any in the folder and at least ``at_least`` (the job store
        remembers versions whose folders retention has deleted).
        """
        folder = self.series_dir(series_uid)
        with self._lock:
            incoming = folder / "incoming"
            if not incoming.is_dir() or not any(incoming.iterdir()):
                return None
            taken = {int(m.group(1)) for p in folder.iterdir()
                     if (m := _VERSION.fullmatch(p.name) or _CLAIM.fullmatch(p.name))}
            version = max(max(taken, default=0) + 1, at_least)
            staging = folder / f".{version_name(version)}.claim"
            staging.mkdir()
            new = sum(1 for _ in incoming.iterdir())
            os.rename(incoming, staging / "input")
            self._incoming_bytes.pop(series_uid, None)
        claim = self._commit_claim(series_uid, version, staging)
        return Claim(series_uid, version, claim.folder, new, claim.total_instances)

    def _commit_claim(self, series_uid: str, version: int, staging: Path) -> Claim:
        folder = staging.parent
        inputs = staging / "input"
        with self._versions_lock:  # retention cannot delete the previous version while its files are linked
            earlier = [v for v in self.versions(series_uid) if v < version]
            if earlier:
                previous = folder / version_name(earlier[-1]) / "input"
                for f in previous.iterdir():
                    target = inputs / f.name
                    if not target.exists():
                        os.link(f, target)
        fsync_dir(inputs)
        fsync_dir(staging)
        final = folder / version_name(version)
        os.rename(staging, final)
        fsync_dir(folder)
        n = sum(1 for p in (final / "input").iterdir() if p.name.endswith(SUFFIX))
        return Claim(series_uid, version, final, n, n)

    # -- retention ------------------------------------------------------------------------------------------------

    def purge_version(self, series_uid: str, version: int) -> None:
        """Delete one version folder; the series folder goes with its last version and no incoming."""
        folder = self.series_dir(series_uid)
        with self._versions_lock, self._lock:
            shutil.rmtree(folder / version_name(version), ignore_errors=True)
            self._known.pop(series_uid, None)
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
