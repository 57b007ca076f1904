"""Write the result series of one source series: a Parametric Map and a derived MR series per quantity, the
quality series and the synthetic contrasts (derived MR series marked as computed, not acquired).

The inputs are checked before anything is built. Each series is written under hidden names in ``out_dir`` as
soon as it is built, and flushed to disk while the next is built; only once every file is built and flushed are
they renamed into place. If anything fails, every file this call wrote is removed again, so a fresh ``out_dir``
is left without a partial result. File
names are deterministic (``T1_map.dcm``, ``T1_mr_0001.dcm``, ``Q_mr_0001.dcm``, ...): writing again
replaces the files of an earlier result one by one (stage into a fresh folder where the old result must
survive a failure).

A study flagged out of range (``warnings``) is marked in every result instance: SeriesDescription starts
with "OUT OF RANGE: ", ImageComments names the reasons and DerivationDescription says it was flagged (the
SR report, which has neither, has the reasons as a comment in its content).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from pydicom.dataset import Dataset

from pipeline.contrasts import MAX_CONTRASTS, Contrast
from pipeline.dicom_output.derived_series import build_derived_series, encoded_file
from pipeline.dicom_output.parametric_map import build_parametric_map
from pipeline.dicom_output.provenance import CONTRAST_COMMENT, QUALITY_COMMENT, Provenance, flag_result
from pipeline.dicom_output.quantities import (
    CONTRAST_SCALE,
    QUALITY,
    QUANTITIES,
    REGIONS_SEG_OFFSET,
    REGIONS_SR_OFFSET,
    contrast_spec,
    map_frames,
    offset_series_number,
    quantity_spec,
    result_series_number,
)
from pipeline.dicom_output.region_report import build_region_report, check_region_stats
from pipeline.dicom_output.segmentation import build_segmentation, label_frames
from pipeline.dicom_output.source import read_source_headers
from pipeline.dicom_series import DicomSeries
from pipeline.result_kinds import REGION_REPORT_FILE_NAME, SEGMENTATION_FILE_NAME

if TYPE_CHECKING:  # pipeline.regions brings nibabel, scipy and the atlas code: not at import time
    from pipeline.regions import RegionStats

logger = logging.getLogger(__name__)

FSYNC_WORKERS = 8  # flushes in flight at once (write_datasets)
_T = TypeVar("_T")


def _region_files(series: DicomSeries, labels: np.ndarray, region_stats: Sequence[RegionStats],
                  provenance: Provenance, uid_root: str | None, warnings: Sequence[str]) -> tuple[bytes, bytes]:
    """The regions' Segmentation and the SR report that references it, flagged with ``warnings`` (if any) and
    encoded as files (bytes pass between processes far faster than datasets)."""
    seg = build_segmentation(series, labels, [s.region for s in region_stats], provenance, uid_root=uid_root,
                             series_number=offset_series_number(series, REGIONS_SEG_OFFSET))
    sr = build_region_report(series, seg, region_stats, provenance, uid_root=uid_root,
                             series_number=offset_series_number(series, REGIONS_SR_OFFSET))
    if warnings:
        flag_result(seg, warnings)
        flag_result(sr, warnings)
    return encoded_file(seg), encoded_file(sr)


def _beside(pool: ProcessPoolExecutor | None, function: Callable[..., _T], *args: object) -> Future[_T]:
    """``function(*args)`` in ``pool``'s process (while this one goes on), or here and now without a pool."""
    if pool is not None:
        return pool.submit(function, *args)
    done: Future[_T] = Future()
    done.set_result(function(*args))
    return done


def map_file_name(quantity: str) -> str:
    return f"{quantity}_map.dcm"


def derived_file_name(quantity: str, instance_number: int) -> str:
    return f"{quantity}_mr_{instance_number:04d}.dcm"


def write_dataset_atomic(ds: Dataset | bytes, path: Path) -> None:
    """Write ``ds`` (or a file it was encoded to) as a DICOM file at ``path`` via a hidden temporary file in the same
    folder: ``path`` holds the whole file or none. Not flushed to disk (:func:`write_datasets` flushes many files at
    once)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(ds if isinstance(ds, bytes) else encoded_file(ds))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedFiles:
    """Datasets written under hidden names beside their paths and flushed to disk concurrently (a flush one after
    the other would wait for a journal commit each), then renamed into place by :meth:`commit`, all or none: used
    as a context manager, whatever was staged or committed is removed again if the block fails."""

    def __init__(self) -> None:
        self._token = secrets.token_hex(4)
        self._staged: dict[Path, Path] = {}  # path -> its hidden name
        self._flushes: list[Future[None]] = []
        self._committed: list[Path] = []
        self._pool = ThreadPoolExecutor(FSYNC_WORKERS)

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._pool.shutdown(wait=True)
        if exc_type is not None:
            for path in (*self._staged.values(), *self._committed):
                path.unlink(missing_ok=True)

    def add(self, files: Sequence[tuple[Path, Dataset | bytes]]) -> None:
        """Write each dataset (or encoded file) under a hidden name beside its path (folders existing) and start
        flushing it."""
        for path, ds in files:
            if path in self._staged:
                raise ValueError(f"{path}: staged twice")
            stage = path.with_name(f".{path.name}.{self._token}.staged")
            self._staged[path] = stage
            write_dataset_atomic(ds, stage)
            self._flushes.append(self._pool.submit(_fsync, stage))

    def commit(self, order: Sequence[Path] | None = None) -> list[Path]:
        """Once every file is flushed, rename each to its path (in ``order``: every staged path once; default, as
        staged); the paths."""
        order = list(self._staged) if order is None else list(order)
        if sorted(order) != sorted(self._staged):
            raise ValueError("order: must name every staged path once")
        for future in self._flushes:
            future.result()
        for path in order:
            os.replace(self._staged[path], path)
            del self._staged[path]
            self._committed.append(path)
        return order


def write_datasets(files: Sequence[tuple[Path, Dataset]]) -> list[Path]:
    """Write each dataset at its path (folders existing), all or none (:class:`StagedFiles`); the paths, in order."""
    with StagedFiles() as staged:
        staged.add(files)
        return staged.commit()


def write_result_series(series: DicomSeries, maps: Mapping[str, np.ndarray], out_dir: Path, provenance: Provenance,
                        *, derived: bool = True, quantities: Sequence[str] = ("T1", "T2"),
                        quality: np.ndarray | None = None, warnings: Sequence[str] = (),
                        uid_root: str | None = None,
                        contrasts: Sequence[tuple[Contrast, np.ndarray]] = (),
                        regions: tuple[np.ndarray, Sequence[RegionStats]] | None = None) -> list[Path]:
    """Write ``quantities`` of ``maps`` ((i, j, k) volumes on ``series.grid``) into ``out_dir``; the paths.

    Per quantity: one Parametric Map (series number source x 100 + k) and, with ``derived``, one classic
    MR series (source x 100 + 10 + k), each a new series in the source study. A ``quality`` map (Q in
    [0, 1], :mod:`pipeline.quality`) adds a classic MR series of its own (source x 100 + 14). ``warnings``:
    the reasons the study is flagged out of range (see the module docstring); none, not flagged. ``uid_root``:
    the organisational root of every UID created (default: pydicom's). ``contrasts``: synthetic contrasts and
    their images (:func:`pipeline.contrasts.synthesise`, on ``series.grid``), one classic MR series each
    (source x 100 + 15 + i; pixel values: signal x 1000), described as "synthetic ..., not acquired".
    ``regions``: a label volume (integer, on ``series.grid``: 0 or a Region.label) and the statistics of each
    region in it (:mod:`pipeline.regions`, over exactly its voxels); written as a Segmentation (source x 100 +
    30, ``SEG_regions.dcm``) and its TID 1500 SR report (+ 31, ``SR_regions.dcm``), after the Parametric Maps.
    """
    if isinstance(quantities, str) or not quantities:
        raise ValueError(f"quantities: expected a non-empty sequence of names, got {quantities!r}")
    if isinstance(warnings, str) or not all(isinstance(w, str) and w.strip() for w in warnings):
        raise ValueError(f"warnings: expected a sequence of non-empty reasons, got {warnings!r}")
    specs = [quantity_spec(q, "quantities") for q in quantities]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"quantities: duplicates in {list(quantities)}")
    missing = [s.name for s in specs if s.name not in maps]
    if missing:
        raise ValueError(f"maps: no volume for {missing}; it has {sorted(maps)}")
    for spec in specs:
        map_frames(maps[spec.name], series.grid, f"maps[{spec.name!r}]")
    if len(contrasts) > MAX_CONTRASTS or len({c.name for c, _ in contrasts}) != len(contrasts):
        raise ValueError(f"contrasts: at most {MAX_CONTRASTS}, names unique; got {[c.name for c, _ in contrasts]}")
    reserved = {*QUANTITIES, QUALITY.name} & {c.name for c, _ in contrasts}
    if reserved:
        raise ValueError(f"contrasts: names {sorted(reserved)} are taken by the maps")
    for contrast, values in contrasts:
        map_frames(values, series.grid, f"contrasts[{contrast.name!r}]")
    if quality is not None:
        frames = map_frames(quality, series.grid, "quality")
        slack = QUALITY.derived_slope / 2  # float rounding of a resampled map: stored as 0 or 1000 all the same
        if frames.min() < -slack or frames.max() > 1 + slack:
            raise ValueError(f"quality: values must be in [0, 1], got {frames.min():g}..{frames.max():g}")
    if regions is not None:
        if not isinstance(regions, tuple) or len(regions) != 2:
            raise TypeError(f"regions: expected a tuple (labels, stats), got {type(regions).__name__}")
        labels, region_stats = regions
        _, voxels = label_frames(labels, series, argument="regions[0]")
        check_region_stats(region_stats, voxels, "regions[1]")
    out_dir = Path(out_dir)
    headers = read_source_headers(series)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The Parametric Maps come first in the returned list (and so in what the node sends): they are the
    # result; the Segmentation and SR, then the derived images, hundreds of files, follow.
    first: list[Path] = []
    derived_paths: list[Path] = []
    # The Segmentation and its SR (highdicom, pure Python: about 2 s for 37 regions, and 0.8 s to encode) are
    # built and encoded in a forked process while this one builds the maps and derived series and writes the
    # derived series: a second core does them.
    fork = regions is not None and "fork" in multiprocessing.get_all_start_methods()
    with (ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) if fork else nullcontext() as pool,
          StagedFiles() as staged):
        region_files = None if regions is None else _beside(pool, _region_files, series, labels, region_stats,
                                                            provenance, uid_root, tuple(warnings))

        def stage_derived(name: str, images: Sequence[Dataset], comment: str | None = None) -> None:
            """Mark and stage one derived series (files written and flushing while the next is built)."""
            for im in images:
                if comment is not None:
                    im.ImageComments = comment
                if warnings:
                    flag_result(im, warnings)
            named = [(out_dir / derived_file_name(name, int(im.InstanceNumber)), im) for im in images]
            staged.add(named)
            derived_paths.extend(path for path, _ in named)

        for spec in specs:
            values = maps[spec.name]
            pm = build_parametric_map(series, values, spec.name, provenance, source_images=headers,
                                      series_number=result_series_number(series, spec, derived=False),
                                      uid_root=uid_root)
            if warnings:
                flag_result(pm, warnings)
            first.append(out_dir / map_file_name(spec.name))
            staged.add([(first[-1], pm)])
            if derived:
                stage_derived(spec.name, build_derived_series(
                    series, values, spec.name, provenance, uid_root=uid_root,
                    series_number=result_series_number(series, spec, derived=True)))
        if quality is not None:
            stage_derived(QUALITY.name, build_derived_series(
                series, quality, QUALITY, provenance, uid_root=uid_root,
                series_number=result_series_number(series, QUALITY, derived=True)), QUALITY_COMMENT)
        for index, (contrast, signal) in enumerate(contrasts):
            values = np.asarray(signal, dtype=np.float32) * CONTRAST_SCALE
            spec = contrast_spec(contrast, index, values)
            stage_derived(spec.name, build_derived_series(
                series, values, spec, provenance, uid_root=uid_root,
                series_number=result_series_number(series, spec, derived=True),
                series_description=f"synthMRF synthetic {contrast.name}, not acquired",
                derivation=provenance.contrast_derivation(contrast)), CONTRAST_COMMENT)
        if region_files is not None:
            seg, sr = region_files.result()
            regional = [(out_dir / SEGMENTATION_FILE_NAME, seg), (out_dir / REGION_REPORT_FILE_NAME, sr)]
            staged.add(regional)
            first += [path for path, _ in regional]
        written = staged.commit([*first, *derived_paths])
    logger.info("wrote %d files of %d result series for series %s into %s", len(written),
                len(first) + len({path.name.rsplit("_", 1)[0] for path in derived_paths}), series.series_instance_uid,
                out_dir)
    return written
