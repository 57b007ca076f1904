"""The processor interface: what a job calls to turn a series folder into result DICOM files.

A processor is a function ``(input_dir: Path, out_dir: Path, *, model: str | None) -> result`` whose
result has ``dicom_files`` (the DICOM objects to send); the configuration may also name a class,
which is instantiated with the ``[pipeline]`` section (the default, ``PipelineProcessor``, is one).
It raises ``SeriesRejected`` (a ValueError subclass from ``pipeline.dicom_series``) for input that
cannot be an MPRAGE volume: such a job is marked rejected and not retried. Any other exception is a
processing failure (retried).

The configured processor is named ``module:function`` and imported when the first job runs, so the
node starts (and answers C-ECHO and C-STORE) without importing torch or the model.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Any, Protocol

from dicom_node.config import PipelineSection


class ProcessResult(Protocol):
    """What the node reads from a processor's result."""

    @property
    def dicom_files(self) -> list[Path]: ...


class Processor(Protocol):
    def __call__(self, input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult: ...


class ProcessorError(ValueError):
    """The configured processor cannot be imported; the message names it."""


def import_processor(spec: str) -> Processor:
    """Import ``module:function``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProcessorError(f"pipeline.processor {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ProcessorError(f"pipeline.processor {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn  # type: ignore[no-any-return]


class LazyProcessor:
    """The processor named by ``settings.processor``, imported on the first call (thread-safe).

    A function is used as is; a class is instantiated with ``settings`` (the ``[pipeline]`` section).
    """

    def __init__(self, settings: PipelineSection) -> None:
        self.settings = settings
        self._fn: Processor | None = None
        self._lock = threading.Lock()

    def __call__(self, input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult:
        with self._lock:
            if self._fn is None:
                target: Any = import_processor(self.settings.processor)
                self._fn = target(self.settings) if isinstance(target, type) else target
            fn = self._fn
        return fn(input_dir, out_dir, model=model)


def rejection_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "not an MPRAGE": pipeline.dicom_series.SeriesRejected."""
    from pipeline.dicom_series import SeriesRejected

    return (SeriesRejected,)
