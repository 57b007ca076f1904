"""Arrays cached on disk as ``.npz``: read back whole or not at all, written atomically; a cache that cannot be
read or written costs time (a warning and a recomputation), never a failure."""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def read_cached(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays ``keys`` of ``path``, or None when it is absent or unreadable (truncated, empty, a key
    missing: logged, and the caller recomputes)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: np.asarray(stored[key]) for key in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring unreadable cache %s (%s)", path, exc)
        return None


def write_cached(path: Path, arrays: Mapping[str, Any]) -> bool:
    """Write ``arrays`` to ``path`` through a hidden per-process temporary file, so a reader sees the whole file
    or none; False (logged) when the folder is not writable or the disk is full."""
    partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(partial, **arrays)
        os.replace(partial, path)
    except OSError as exc:
        logger.warning("cannot cache %s (%s)", path, exc)
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        return False
    return True
