"""The node: receive (the DIMSE storage SCP), spool, assemble series, jobs (the job store), dispatch, retention.

:class:`Node` (``node.service``) puts the stages together; ``synthmrf serve`` runs one. The names below are
loaded on first use, so a worker process importing ``node.job_store`` does not load the whole node.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Node", "NodeLock", "NodeLockedError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("dicom_node.node.service"), name)
    raise AttributeError(f"module 'dicom_node.node' has no attribute {name!r}")
