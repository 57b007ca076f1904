"""One MPRAGE series in, T1/T2/PD maps (NIfTI, DICOM, QC figure, provenance) out.

Stages: read and check (the acquisition protocol too: :mod:`pipeline.acquisition`, against the model's
trained ranges) -> convert (dicom2nifti) -> head pose (rigid + affine registration to MNI) -> resample
to the working grid -> brain mask (atlas) -> normalise (:mod:`pipeline.normalise`, as the package says)
-> seven U-Nets -> dictionary match -> maps back on the source grid -> write. Each stage is a function
of its inputs; this module only chains them, times them and makes the output appear all at once:
everything is written to a staging folder beside ``out_dir`` and moved in at the end, so a failure
leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from pipeline.acquisition import (
    ProtocolError,
    protocol_from_dicom,
    protocol_from_sidecar,
    protocol_with_overrides,
    sidecar_for,
)
from pipeline.contrasts import DEFAULT_CONTRASTS, Contrast, synthesise
from pipeline.convert import convert_series
from pipeline.dicom_series import MAX_VOXEL_MM, MIN_FRAMES, DicomSeries, SeriesRejected, read_series
from pipeline.geometry import covering_box, offset_affine, resample_to_grid
from pipeline.head_pose import WorkingSpace, place_head
from pipeline.model.fluid import apply_fluid
from pipeline.model.inference import features_for, network_input, synthesise_channels
from pipeline.model.package import ModelPackage, check_compatible
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.epg import resolve_device
from pipeline.mrf.matching import Matcher
from pipeline.mrf.sequence import Sequence
from pipeline.normalise import normalise
from pipeline.protocol import AcquisitionProtocol, out_of_range
from pipeline.qc_figure import qc_figure
from pipeline.quality import StudyVerdict, match_volume_with_quality, study_verdict
from pipeline.regions import (
    ATLAS_CITATION,
    ATLAS_NAME,
    RegionStats,
    patient_regions,
    region_statistics,
    write_region_tables,
)
from pipeline.summary_page import save_png, summary_page
from pipeline.volume_io import load_volume, save_volume

logger = logging.getLogger(__name__)

QUANTITIES = ("T1", "T2", "PD")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIFTI_THREADS = 2  # NIfTI files compressed at once, beside the DICOM writing
MIN_BRAIN_ML = 500.0  # an adult brain mask is 1,100-1,700 ml; far less means registration failed


@dataclass(frozen=True)
class ProcessOptions:
    """What to compute and write. ``device`` "auto" uses CUDA when present."""

    device: str = "auto"
    dicom: bool = True  # write DICOM results (DICOM input only)
    derived_series: bool = True  # viewer-friendly derived MR series beside the Parametric Maps
    pd_dicom: bool = False  # a PD Parametric Map too
    uid_root: str | None = None  # the organisational root of every UID created (default: pydicom's)
    keep_working: bool = False  # also write the working-grid volumes (input, mask, maps) under working/
    batch: int | None = None  # slices per forward pass; None: 1 on CPU, 16 on CUDA
    precision: str = "auto"  # float32, bfloat16, or auto: bfloat16 where the hardware has it natively
    backend: str = "auto"  # torch, onnxruntime, or auto: ONNX Runtime for float32 on CPU (model/inference.py)
    allow_out_of_range: bool = False  # process an acquisition outside the model's trained ranges (and say so)
    # Acquisition values given by the user (pipeline.acquisition.OVERRIDABLE; None: not given): they replace
    # what the header or sidecar says, or what it left to the family defaults.
    protocol_overrides: Mapping[str, float | str | None] = field(default_factory=dict)
    sidecar: Path | None = None  # NIfTI input: the BIDS sidecar (default: NAME.json beside NAME.nii.gz)
    # Synthetic contrasts computed from the maps (NIfTI synthetic_<name>.nii.gz; with derived_series also a
    # derived MR series each): the defaults of pipeline.contrasts, or () for none.
    contrasts: tuple[Contrast, ...] = DEFAULT_CONTRASTS
    # Anatomical regions (pipeline.regions): regions.csv/json and regions.nii.gz; with dicom, a Segmentation and a
    # TID 1500 measurement report.
    regions: bool = True
    # The summary page (QC panels and the regional table): summary.png and, with dicom, a Secondary Capture.
    summary: bool = False


@dataclass
class ProcessResult:
    """Where everything went, and what each stage cost."""

    out_dir: Path
    maps: dict[str, Path]
    dicom_files: list[Path]
    qc_figure: Path
    provenance: Path
    series_instance_uid: str | None
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> seconds, peak_rss_mb


def software_version() -> str:
    try:
        return metadata.version("synthmrf")
    except metadata.PackageNotFoundError:
        return "0+unknown"


_MATCHERS: dict[tuple[str, str], Matcher] = {}
_MATCHERS_LOCK = threading.Lock()


def _matcher(sequence: Sequence, device: str) -> Matcher:
    """One matcher per (sequence, device) and process; the dictionary and its clusters are cached on disk."""
    key = (sequence.hash(), device)
    with _MATCHERS_LOCK:
        if key not in _MATCHERS:
            _MATCHERS[key] = Matcher(load_or_build_dictionary(sequence, rank=4, device=device), device=device)
        return _MATCHERS[key]


class _Stages:
    def __init__(self) -> None:
        self.record: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.record[name] = {"seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1)}
        logger.info("stage %s: %.2f s (peak RSS %.0f MB)", name, seconds, peak)


def _read_nifti(path: Path, stages: _Stages) -> tuple[np.ndarray, np.ndarray]:
    with stages.stage("read"):
        volume, affine = load_volume(path)
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3 or np.iscomplexobj(volume):
        raise SeriesRejected(f"{path}: expected a real 3-D volume, got shape {volume.shape} {volume.dtype}")
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
    if min(volume.shape) < MIN_FRAMES or voxel_mm.max() > MAX_VOXEL_MM:  # the DICOM checks' limits
        raise SeriesRejected(f"{path}: not a 3D T1 volume (shape {volume.shape}, voxel "
                             f"{np.round(voxel_mm, 2).tolist()} mm)")
    return volume, affine


def _protocol(source: Path, series: DicomSeries | None, options: ProcessOptions) -> AcquisitionProtocol:
    """The acquisition: the DICOM header or the NIfTI's sidecar, then the user's overrides."""
    if series is not None and options.sidecar is not None:
        raise ValueError(f"sidecar: {options.sidecar} given for DICOM input {source} (the header says it all)")
    try:
        if series is not None:
            base: AcquisitionProtocol | None = protocol_from_dicom(series.header)
        else:
            sidecar = options.sidecar or sidecar_for(source)
            base = protocol_from_sidecar(sidecar) if sidecar is not None else None
        return protocol_with_overrides(base, **options.protocol_overrides)
    except ProtocolError as exc:
        raise SeriesRejected(f"{source}: {exc}") from exc


@dataclass(frozen=True)
class _OnSource:
    """The results on the source grid: maps (T1, T2, PD, Q), the brain mask, the region labels (or None)."""

    maps: dict[str, np.ndarray]
    mask: np.ndarray
    regions: np.ndarray | None = None


def _to_source(maps: dict[str, np.ndarray], mask: np.ndarray, space: WorkingSpace, shape: tuple[int, int, int],
               affine: np.ndarray) -> _OnSource:
    """Working-grid maps on the source grid: mask-weighted trilinear, so edges are not pulled toward zero.
    Only the source grid's box around the brain is sampled (outside it every sample is zero)."""
    box = covering_box(mask, space.affine, shape, affine)
    box_shape = tuple(s.stop - s.start for s in box)
    box_affine = offset_affine(affine, [s.start for s in box])
    weight = resample_to_grid(mask.astype(np.float32), space.affine, box_shape, box_affine)
    inside = np.zeros(shape, dtype=bool)
    inside[box] = weight > 0.5
    out = {}
    for name, values in maps.items():
        summed = resample_to_grid(values * mask, space.affine, box_shape, box_affine)
        out[name] = np.zeros(shape, dtype=np.float32)
        out[name][box] = np.where(inside[box], summed / np.maximum(weight, 1e-6), 0.0)
    return _OnSource(out, inside)


def process_series(source: str | Path, out_dir: str | Path, package: ModelPackage, *,
                   options: ProcessOptions = ProcessOptions()) -> ProcessResult:
    """Run the whole pipeline on one series folder (or NIfTI file) into ``out_dir``.

    Raises :class:`pipeline.dicom_series.SeriesRejected` for input that cannot be an MPRAGE volume, and
    for an acquisition outside the model's trained ranges unless ``options.allow_out_of_range``.
    """
    source, out_dir = Path(source), Path(out_dir)
    device = str(resolve_device(options.device))
    stages = _Stages()
    series = None
    if source.is_file() and source.name.endswith(NIFTI_SUFFIXES):
        volume, affine = _read_nifti(source, stages)
    else:
        with stages.stage("read"):
            series = read_series(source)
    protocol = _protocol(source, series, options)
    ood_reasons = out_of_range(protocol, package.protocol_ranges)
    if ood_reasons and not options.allow_out_of_range:
        raise SeriesRejected(f"{source}: acquisition outside what model {package.name} was trained on: "
                             f"{'; '.join(ood_reasons)}. Its maps would be unvalidated; to process it anyway (the "
                             "results are marked) use --allow-out-of-range (node: [pipeline] allow_out_of_range)")
    if ood_reasons:
        logger.warning("acquisition outside the trained ranges, processed as allowed: %s", "; ".join(ood_reasons))
    if series is not None:
        with stages.stage("convert"):
            volume, affine = convert_series(series), series.grid.ras_affine
    uid = series.series_instance_uid if series is not None else None
    logger.info("processing %s with model %s on %s", uid or source.name, package.name, device)

    with stages.stage("register"):
        space = place_head(volume, affine)
    with stages.stage("resample"):
        working = space.resample(volume, affine)
    with stages.stage("mask"):
        mask = space.mask
        brain_ml = float(mask.sum()) / 1000.0  # 1 mm voxels
        if brain_ml < MIN_BRAIN_ML:
            raise SeriesRejected(f"{source}: brain mask of {brain_ml:.0f} ml after registration (expected >= "
                                 f"{MIN_BRAIN_ML:.0f}): not a head T1 volume, or registration failed")
        try:
            normalised = normalise(working, mask, package.normalisation)
        except ValueError as exc:
            raise SeriesRejected(f"{source}: no signal inside the brain mask ({exc})") from exc
    synthesis = {"batch": options.batch, "device": device, "precision": options.precision,
                 "protocol": features_for(package, protocol), "backend": options.backend}
    with stages.stage("inference"):
        package.model.to(device)
        net_input = network_input(package, normalised, mask, protocol)
        channels = synthesise_channels(net_input, mask, package, **synthesis)  # type: ignore[arg-type]
    with stages.stage("match"):
        matcher = _matcher(package.sequence, device)
        check_compatible(package, matcher.dictionary)
        maps = match_volume_with_quality(from_channels(channels[mask]), mask, matcher)
    if package.fluid is not None:
        with stages.stage("fluid"):
            maps = apply_fluid(maps, channels, net_input, mask, package, matcher,
                               **synthesis)  # type: ignore[arg-type]
    del channels, net_input
    verdict = study_verdict(maps["Q"], mask, maps["T1"], maps["T2"], protocol_reasons=ood_reasons,
                            grid=matcher.dictionary.grid)
    if not verdict.ok:
        logger.warning("result flagged: %s", verdict.summary())
    with stages.stage("to_source"):
        on_source = _to_source(maps, mask, space, (volume.shape[0], volume.shape[1], volume.shape[2]), affine)
    if options.regions:
        with stages.stage("regions"):
            labels = patient_regions(space, on_source.maps["T1"], on_source.maps["T2"], on_source.mask, affine)
            on_source = replace(on_source, regions=labels)
    with stages.stage("write"):
        result = _write(out_dir, source, series, on_source, affine, space, working, mask, maps, package,
                        options, protocol, verdict)
    result.stages = stages.record
    _rewrite_stages(result)
    return result


def _provenance_doc(source: Path, series: DicomSeries | None, package: ModelPackage, space: WorkingSpace,
                    brain_ml: float, files: dict[str, object], protocol: AcquisitionProtocol,
                    verdict: StudyVerdict) -> dict[str, object]:
    return {
        "format": "synthmrf-result/1",
        "software": {"name": "synthmrf", "version": software_version(), "torch": torch.__version__},
        "model": {"name": str(package.manifest["name"]), "version": str(package.manifest["version"]),
                  "trained_on": package.trained_on,
                  **({"reading_note": package.reading_note} if package.reading_note else {}),
                  **({"fluid_network": {"name": package.fluid.package.name,
                                        "gate_t2_ms": list(package.fluid.gate_t2_ms),
                                        "trained_on": package.fluid.package.trained_on}} if package.fluid else {})},
        "sequence": {"name": package.sequence.name, "hash": package.sequence.hash()},
        "input": ({"kind": "dicom", "study_instance_uid": series.study_instance_uid,
                   "series_instance_uid": series.series_instance_uid,
                   "frame_of_reference_uid": series.frame_of_reference_uid, "frames": series.grid.n_frames}
                  if series is not None else {"kind": "nifti", "file": source.name}),
        "acquisition": protocol.to_dict(),
        "out_of_range": verdict.protocol_reasons,  # why the acquisition lies outside the trained ranges (allowed)
        "quality": verdict.to_dict(),
        "normalisation": package.normalisation,
        "working_grid": {"shape": list(space.shape), "affine_ras": np.round(space.affine, 6).tolist(),
                         "head_pose_template_to_patient": np.round(space.rigid, 6).tolist()},
        "brain_volume_ml": round(brain_ml, 1),
        "files": files,
    }


def _write(out_dir: Path, source: Path, series: DicomSeries | None, results: _OnSource, affine: np.ndarray,
           space: WorkingSpace, working: np.ndarray, mask: np.ndarray, maps: dict[str, np.ndarray],
           package: ModelPackage, options: ProcessOptions, protocol: AcquisitionProtocol,
           verdict: StudyVerdict) -> ProcessResult:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    # The NIfTI files are compressed by threads (zlib lets go of the GIL) while this one builds the DICOM results.
    nifti = ThreadPoolExecutor(NIFTI_THREADS)
    saved: list[Future[Path]] = []
    try:
        on_source = results.maps
        written: dict[str, str] = {}
        for q in (*QUANTITIES, "Q"):
            saved.append(nifti.submit(save_volume, staging / f"{q}.nii.gz", on_source[q], affine))
            written[q] = f"{q}.nii.gz"
        synthetic = [(c, synthesise(c, on_source["T1"], on_source["T2"], on_source["PD"])) for c in options.contrasts]
        for contrast, values in synthetic:
            saved.append(nifti.submit(save_volume, staging / f"synthetic_{contrast.name}.nii.gz", values, affine))
        region_stats: list[RegionStats] = []
        region_files: dict[str, object] = {}
        if results.regions is not None:
            region_stats = region_statistics(results.regions, on_source, affine)
            merged = region_statistics(results.regions, on_source, affine, merged=True)
            tables = write_region_tables(region_stats, merged, staging)
            save_volume(staging / "regions.nii.gz", results.regions.astype(np.int16), affine)
            region_files = {"tables": [t.name for t in tables], "labels": "regions.nii.gz", "atlas": ATLAS_NAME,
                            "citation": ATLAS_CITATION, "regions": len(region_stats)}
        if options.keep_working:
            for name, values in (("mprage", working), ("brain_mask", mask.astype(np.float32)), *maps.items()):
                save_volume(staging / "working" / f"{name}.nii.gz", values, space.affine)
        title = (f"series {series.series_instance_uid}" if series is not None else source.name) + \
            f" | model {package.name}"
        qc_figure(staging / "qc.png", working, {q: maps[q] for q in QUANTITIES}, mask, title=title,
                  quality=maps["Q"], verdict=verdict)
        page = None
        if options.summary:
            page = summary_page(staging / "qc.png", region_stats, model_label=package.name, verdict=verdict,
                                reading_note=package.reading_note)
            save_png(staging / "summary.png", page)
        dicom_files: list[str] = []
        if series is not None and options.dicom:
            region_dicom = (results.regions, region_stats) if results.regions is not None and region_stats else None
            dicom_files = _write_dicom(series, on_source, staging / "dicom", package, options, verdict, synthetic,
                                       region_dicom, page)
        contrasts = {c.name: {"file": f"synthetic_{c.name}.nii.gz", "imitates": c.description, "signal": c.equation}
                     for c in options.contrasts}
        doc = _provenance_doc(source, series, package, space, float(mask.sum()) / 1000.0,
                              {"maps": written, "synthetic_contrasts": contrasts, "regions": region_files,
                               "qc_figure": "qc.png", "dicom": dicom_files}, protocol, verdict)
        (staging / "provenance.json").write_text(json.dumps(doc, indent=1))
        for future in saved:
            future.result()
        _publish(staging, out_dir)
    except BaseException:
        nifti.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        nifti.shutdown(wait=True)
    return ProcessResult(out_dir, {q: out_dir / name for q, name in written.items()},
                         [out_dir / "dicom" / name for name in dicom_files], out_dir / "qc.png",
                         out_dir / "provenance.json", series.series_instance_uid if series is not None else None)


def _write_dicom(series: DicomSeries, maps: dict[str, np.ndarray], folder: Path, package: ModelPackage,
                 options: ProcessOptions, verdict: StudyVerdict, synthetic: list[tuple[Contrast, np.ndarray]],
                 regions: tuple[np.ndarray, list[RegionStats]] | None, page: np.ndarray | None) -> list[str]:
    """Parametric Maps and derived series (with the quality series and the synthetic contrasts), the regions'
    Segmentation and SR report, the summary ``page`` as a Secondary Capture; a flagged study is marked in all."""
    from pipeline.dicom_output import Provenance, write_result_series

    provenance = Provenance(str(package.manifest["name"]), str(package.manifest["version"]),
                            package.sequence.hash(), software_version(), package.reading_note)
    quantities = ("T1", "T2", "PD") if options.pd_dicom else ("T1", "T2")
    paths = write_result_series(series, maps, folder, provenance, derived=options.derived_series,
                                quantities=quantities, quality=maps["Q"] if options.derived_series else None,
                                warnings=verdict.reasons, uid_root=options.uid_root,
                                contrasts=synthetic if options.derived_series else (), regions=regions)
    if page is not None:
        from pipeline.dicom_output.provenance import flag_result
        from pipeline.dicom_output.quantities import SUMMARY_OFFSET, offset_series_number
        from pipeline.dicom_output.summary import build_summary
        from pipeline.dicom_output.writer import write_datasets
        from pipeline.result_kinds import SUMMARY_FILE_NAME

        sc = build_summary(series, page, provenance, series_number=offset_series_number(series, SUMMARY_OFFSET),
                           uid_root=options.uid_root)
        if verdict.reasons:
            flag_result(sc, verdict.reasons)
        paths += write_datasets([(folder / SUMMARY_FILE_NAME, sc)])
    return [str(p.relative_to(folder)) for p in paths]


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged results into ``out_dir``, replacing earlier results of the same names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in sorted(staging.iterdir()):
        target = out_dir / item.name
        if target.is_dir() and not target.is_symlink():
            old = out_dir / f".{item.name}.old-{os.getpid()}"
            target.rename(old)
            item.rename(target)
            shutil.rmtree(old)
        else:
            item.replace(target)
    staging.rmdir()


def _rewrite_stages(result: ProcessResult) -> None:
    """Add the stage timings to the provenance sidecar (known only once writing has finished)."""
    doc = json.loads(result.provenance.read_text())
    doc["stages"] = result.stages
    tmp = result.provenance.with_name(".provenance.json.partial")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(result.provenance)
