"""Per-destination outputs: each destination gets the kinds of result it lists, and a destination that does not
accept a SOP class (a PACS without Parametric Map support) still gets everything else."""

from __future__ import annotations

from pathlib import Path

import pydicom
from node_support import FastResult, ResultSink, fast_processor, make_series, node_config, run_tool, wait_until
from pydicom.uid import ParametricMapStorage, generate_uid

from dicom_node.node import Node
from dicom_node.node.job_store import JobState
from pipeline.result_kinds import DERIVED_MAPS, PARAMETRIC_MAPS, QUALITY, SYNTHETIC_CONTRASTS, kind_of


def test_result_file_names_name_their_kind() -> None:
    assert kind_of("T1_map.dcm") == kind_of("PD_map.dcm") == PARAMETRIC_MAPS
    assert kind_of("T2_mr_0042.dcm") == DERIVED_MAPS
    assert kind_of("Q_mr_0001.dcm") == QUALITY
    assert kind_of("FLAIR_mr_0001.dcm") == kind_of("DIR_mr_0150.dcm") == SYNTHETIC_CONTRASTS
    assert kind_of("result.dcm") == "other"


def kinds_processor(input_dir: Path, out_dir: Path, *, model: str | None = None) -> FastResult:
    """The fast test result under the real writer's names: a (stand-in) Parametric Map, a derived map slice,
    a quality slice and a synthetic FLAIR slice."""
    [made] = fast_processor(input_dir, out_dir).dicom_files
    files = []
    for name in ("T1_map.dcm", "T1_mr_0001.dcm", "Q_mr_0001.dcm", "FLAIR_mr_0001.dcm"):
        ds = pydicom.dcmread(made)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = name
        if name.endswith("_map.dcm"):
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ParametricMapStorage
        ds.save_as(made.parent / name, enforce_file_format=True)
        files.append(made.parent / name)
    made.unlink()
    return FastResult(files)


def test_each_destination_gets_its_kinds_and_a_refused_sop_class_does_not_block_the_rest(tmp_path: Path) -> None:
    pacs = ResultSink(ae_title="PACS").start(refuse=[ParametricMapStorage])
    research = ResultSink(ae_title="RESEARCH").start()
    try:
        cfg = node_config(tmp_path / "node", destinations=[
            pacs.destination("pacs"), {**research.destination("research"), "outputs": [PARAMETRIC_MAPS]}])
        node = Node(cfg, processor=kinds_processor).start()
        try:
            series = make_series(tmp_path / "s", n=8, patient_id="OUT")
            assert run_tool(["storescu", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                             *map(str, series.files)]).returncode == 0
            [job] = wait_until(lambda: [j for j in node.store.jobs() if j.state is JobState.DELIVERED], 60,
                               what="the job to be delivered everywhere")
        finally:
            node.stop(drain=False)
        got = {sink.ae_title: sorted(r.series_description for r in sink.received) for sink in (pacs, research)}
        assert got == {"PACS": ["FLAIR_mr_0001.dcm", "Q_mr_0001.dcm", "T1_mr_0001.dcm"],
                       "RESEARCH": ["T1_map.dcm"]}
        detail = {d.destination: d.last_error for d in job.deliveries}
        assert detail["pacs"] == ("sent derived_maps 1, quality 1, synthetic_contrasts 1; refused by the "
                                  "destination: parametric_maps 1 (Parametric Map Storage not accepted by the peer)")
        assert detail["research"] == "sent parametric_maps 1"
    finally:
        pacs.stop()
        research.stop()
