"""The clinical outputs end to end: a phantom MPRAGE sent to the node with the real pipeline and shipped model,
a real Orthanc as the PACS and a second destination that refuses Parametric Maps. What arrives is checked from
the received objects alone: the regional means of the SR equal the T1/T2 Parametric Maps averaged over the
Segmentation's segments."""

from __future__ import annotations

import io
import shutil
import subprocess
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from node_support import Orthanc, ResultSink, node_config, run_tool, wait_until
from pydicom.sr.codedict import codes
from pydicom.uid import ParametricMapStorage

from dicom_node.config import PipelineSection
from dicom_node.node import Node
from dicom_node.node.job_store import JobState
from dicom_node.workers.pipeline_processor import PipelineProcessor
from pipeline.model.package import SHIPPED_DIR
from training.phantom.dataset import make_dataset
from training.phantom.subject import PhantomOptions


def _download(orthanc: Orthanc, modality_or_description: dict[str, str]) -> list[pydicom.Dataset]:
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": modality_or_description})
    out = []
    for instance in found:
        url = f"http://127.0.0.1:{orthanc.http_port}/instances/{instance}/file"
        with urllib.request.urlopen(url, timeout=30) as r:
            out.append(pydicom.dcmread(io.BytesIO(r.read())))
    return out


def _frames_by_position(ds: pydicom.Dataset) -> list[tuple[tuple[float, ...], int]]:
    return [(tuple(np.round([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], 3)), i)
            for i, f in enumerate(ds.PerFrameFunctionalGroupsSequence)]


def _dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy is required (apt-get install dicom3tools)"
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    check = subprocess.run([tool, str(path)], capture_output=True, text=True)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.slow
def test_regions_report_segmentation_and_contrasts_reach_the_pacs(tmp_path: Path) -> None:
    make_dataset(1, tmp_path / "phantom", seed=21, options=PhantomOptions(downsample=2, mrf=False), progress=False)
    files = sorted((tmp_path / "phantom" / "sub-001" / "mprage_dicom").iterdir())
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    no_pm = ResultSink(ae_title="NOPM").start(refuse=[ParametricMapStorage])
    orthanc = Orthanc(tmp_path / "orthanc", node_port=1).start()  # it never calls the node
    try:
        package = next(p for p in sorted(SHIPPED_DIR.iterdir()) if p.is_dir())
        cfg = node_config(tmp_path / "node", destinations=[orthanc.destination("pacs"), no_pm.destination("nopm")])
        node = Node(cfg, processor=PipelineProcessor(PipelineSection(model=str(package),
                                                                     models_dir=tmp_path / "models"))).start()
        try:
            assert run_tool(["storescu", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                             *map(str, files)]).returncode == 0
            [job] = wait_until(lambda: [j for j in node.store.jobs() if j.state is JobState.DELIVERED], 900, 1.0,
                               what="the job to be delivered to both destinations")
        finally:
            node.stop(drain=False)

        # Orthanc has everything, in the source study, valid.
        [seg_ds] = _download(orthanc, {"Modality": "SEG"})
        [sr_ds] = _download(orthanc, {"Modality": "SR"})
        [t1_ds] = _download(orthanc, {"SeriesDescription": "synthMRF T1 map [ms]"})
        [t2_ds] = _download(orthanc, {"SeriesDescription": "synthMRF T2 map [ms]"})
        flair = orthanc.post("/tools/find", {"Level": "Instance",
                                             "Query": {"SeriesDescription": "synthMRF synthetic FLAIR*"}})
        assert len(flair) == len(files)
        for ds in (seg_ds, sr_ds, t1_ds):
            assert (ds.StudyInstanceUID, ds.PatientID) == (source.StudyInstanceUID, source.PatientID)
            assert _dciodvfy_errors(ds, tmp_path) == [], ds.Modality
        assert seg_ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert seg_ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID

        # Recompute each region's mean T1/T2 from the received maps and segments alone.
        seg_pixels = seg_ds.pixel_array.reshape(-1, seg_ds.Rows, seg_ds.Columns)
        maps = {q: (ds.pixel_array.reshape(-1, ds.Rows, ds.Columns), dict(_frames_by_position(ds)))
                for q, ds in (("T1", t1_ds), ("T2", t2_ds))}
        sums: dict[int, dict[str, list[float]]] = {}
        for (position, i), item in zip(_frames_by_position(seg_ds), seg_ds.PerFrameFunctionalGroupsSequence,
                                       strict=True):
            number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            inside = seg_pixels[i] > 0
            for q, (frames, index) in maps.items():
                entry = sums.setdefault(number, {}).setdefault(q, [0.0, 0.0])
                entry[0] += float(frames[index[position]][inside].astype(np.float64).sum())
                entry[1] += float(inside.sum())
        report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds).content
        groups = report.get_volumetric_roi_measurement_groups()
        assert len(groups) == len(seg_ds.SegmentSequence) >= 30
        for group in groups:
            (number,) = group.referenced_segment[0].referenced_segment_numbers
            assert group.referenced_segment[0].value[1] == seg_ds.SOPInstanceUID
            for q, concept in (("T1", codes.DCM.T1), ("T2", codes.DCM.T2)):
                [mean] = [m for m in group.get_measurements(name=concept) if m.derivation == codes.SCT.Mean]
                total, count = sums[number][q]
                assert mean.value == pytest.approx(total / count, rel=1e-5), (group.tracking_identifier, q)

        # The destination without Parametric Map support got the rest.
        got = {r.series_description for r in no_pm.received}
        assert {seg_ds.SeriesDescription, sr_ds.SeriesDescription} <= got
        assert "synthMRF T1 map [ms]" not in got and "synthMRF T1 map [ms] (MR image)" in got
        assert any("FLAIR" in d for d in got)
        nopm = next(d for d in job.deliveries if d.destination == "nopm")
        assert "refused" in nopm.last_error and "parametric_maps" in nopm.last_error
    finally:
        orthanc.stop()
        no_pm.stop()
