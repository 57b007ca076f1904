"""Helpers for the retro tests: an Orthanc archive preloaded with phantom studies, and a node config with sources.

Not a test module.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from node_support import Orthanc, mr_datasets, node_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.config import NodeConfig
from dicom_node.retro.config import RetroSection, SourceConfig

ARCHIVE_AET = "ARCHIVE"
NODE_AET = "SYNTHMRF"
HARVEST_AET = "SYNTHMRF_HARVEST"


class ArchiveOrthanc(Orthanc):
    """The archive: a real Orthanc (node_support.Orthanc) that knows several peers and answers C-FIND from
    its storage. Constructed as ``ArchiveOrthanc(folder, {AE title: (host, port)})``."""

    def __init__(self, folder: Path, modalities: Mapping[str, tuple[str, int]]) -> None:
        super().__init__(folder, node_port=0, ae_title=ARCHIVE_AET, extra_config={
            "Name": "synthmrf-retro-archive", "StorageAccessOnFind": "Always",
            "DicomModalities": {aet.lower(): [aet, host, port] for aet, (host, port) in modalities.items()}})
        self.modalities = modalities

    def start(self) -> ArchiveOrthanc:
        super().start()
        return self

    def upload(self, files: Sequence[Path]) -> None:
        for f in files:
            self.post("/instances", f.read_bytes())

    def series_by_description(self, description: str) -> list[dict[str, Any]]:
        """Series (with their main tags and instance count) whose SeriesDescription matches (Orthanc wildcards)."""
        found = self.post("/tools/find", {"Level": "Series", "Query": {"SeriesDescription": description},
                                          "Expand": True})
        return [s for s in found if isinstance(s, dict)]

    def source(self, name: str = "archive", **extra: object) -> SourceConfig:
        return SourceConfig.model_validate({"name": name, "ae_title": self.ae_title, "host": "127.0.0.1",
                                            "port": self.dicom_port, "find_timeout_s": 30,
                                            "retrieve_timeout_s": 60, "connect_timeout_s": 5, **extra})


@dataclass(frozen=True)
class ArchiveStudy:
    patient_id: str
    study_uid: str
    mprage_series_uid: str
    distractor_series_uids: list[str] = field(default_factory=list)


def clone_series(source_files: Sequence[Path], out: Path, *, patient_id: str, study_uid: str,
                 series_uid: str | None = None, images_in_acquisition: bool = True) -> list[Path]:
    """The series in ``source_files`` as a new patient/study/series (new SOP Instance UIDs), written to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for f in source_files:
        ds = pydicom.dcmread(f)
        ds.PatientID = patient_id
        ds.PatientName = f"SECRET^{patient_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if images_in_acquisition:
            ds.ImagesInAcquisition = len(source_files)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def distractors(out: Path, *, patient_id: str, study_uid: str, seed: int) -> tuple[list[Path], list[str]]:
    """A 3-slice localizer and a 2D T2 series in the study (neither is an MPRAGE)."""
    files: list[Path] = []
    uids = []
    for kind, n in (("localizer", 3), ("t2", 6)):
        datasets = mr_datasets(n, 32, patient_id=patient_id, seed=seed, mprage=False, study_uid=study_uid)
        for ds in datasets:
            if kind == "localizer":
                ds.SeriesDescription = ds.ProtocolName = "AAHead_Scout localizer"
                ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
                ds.MRAcquisitionType = "2D"
                ds.ScanningSequence = "GR"
                ds.SeriesNumber = 1
            else:
                ds.SeriesNumber = 5
        folder = out / f"{kind}-{datasets[0].SeriesInstanceUID}"
        folder.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        uids.append(str(datasets[0].SeriesInstanceUID))
    return files, uids


def make_archive_studies(mprage_files: Sequence[Path], out: Path, n: int, *, prefix: str = "RETRO"
                         ) -> tuple[list[ArchiveStudy], list[Path]]:
    """``n`` studies, each with a copy of the phantom MPRAGE series and two distractor series."""
    studies = []
    files: list[Path] = []
    for k in range(n):
        patient_id = f"{prefix}{k:03d}"
        study_uid = generate_uid()
        series_uid = generate_uid()
        files += clone_series(mprage_files, out / patient_id / "mprage", patient_id=patient_id, study_uid=study_uid,
                              series_uid=series_uid)
        extra, uids = distractors(out / patient_id, patient_id=patient_id, study_uid=study_uid, seed=k)
        files += extra
        studies.append(ArchiveStudy(patient_id, study_uid, series_uid, uids))
    return studies, files


def retro_config(storage: Path, *, node_port: int, sources: Sequence[SourceConfig],
                 destinations: Sequence[dict[str, object]] = (), retro: Mapping[str, object] | None = None,
                 **sections: dict[str, object]) -> NodeConfig:
    """A node test configuration (fast processor, loopback) with sources and a ``[retro]`` section."""
    base = node_config(storage, destinations=destinations, **sections)
    node = base.node.model_copy(update={"port": node_port, "ae_title": NODE_AET})
    return base.model_copy(update={"node": node, "sources": list(sources),
                                   "retro": RetroSection.model_validate(dict(retro or {}))})


def config_toml(cfg: NodeConfig, path: Path) -> Path:
    """Write ``cfg`` as a TOML file the CLI can read (only what differs from the defaults matters)."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    lines: list[str] = []

    def value(v: object) -> str:
        if isinstance(v, dict):  # an inline table (a list of them: [[pipeline.synthetic_contrasts]])
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    for section, body in data.items():
        if isinstance(body, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in body.items()]
            lines.append("")
    for section in ("destinations", "sources"):
        for entry in data.get(section, []):
            lines.append(f"[[{section}]]")
            lines += [f"{k} = {value(v)}" for k, v in entry.items()]
            lines.append("")
    path.write_text("\n".join(lines))
    return path


def series_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def dataset_of(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)
