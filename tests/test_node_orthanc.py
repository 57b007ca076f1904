"""A real Orthanc as the destination and dcmtk storescu/echoscu as the clients, all on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import Orthanc, Series, fast_processor, free_port, make_series, node_config, run_tool, wait_until

from dicom_node.node import Node
from dicom_node.node.job_store import DeliveryState, JobState


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return make_series(tmp_path_factory.mktemp("mprage"), n=40, patient_id="ORTH001", seed=5)


@pytest.fixture
def orthanc_port() -> int:
    return free_port()


@pytest.fixture
def node(tmp_path: Path, orthanc_port: int) -> Iterator[Node]:
    dest = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}
    cfg = node_config(tmp_path / "node", destinations=[dest], dispatch={"max_attempts": 50})
    node = Node(cfg, processor=fast_processor).start()
    yield node
    node.stop(drain=False)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[list[Orthanc]]:
    started: list[Orthanc] = []
    yield started
    for o in started:
        o.stop()


def start_orthanc(started: list[Orthanc], folder: Path, node: Node, port: int) -> Orthanc:
    o = Orthanc(folder, node_port=node.port, dicom_port=port)
    started.append(o)
    return o.start()


def storescu(node: Node, files: list[Path]) -> None:
    r = run_tool(["storescu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port),
                  *map(str, files)])
    assert r.returncode == 0, r.stderr


def test_series_in_maps_back_in_orthanc(node: Node, series: Series, tmp_path: Path, orthanc_port: int,
                                        orthanc_factory: list[Orthanc]) -> None:
    orthanc = start_orthanc(orthanc_factory, tmp_path / "orthanc", node, orthanc_port)
    r = run_tool(["echoscu", "-aet", "MODALITY", "-aec", "SYNTHMRF", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr
    storescu(node, series.files)
    [tags] = wait_until(orthanc.series_tags, 30, 0.2, "the result in Orthanc")
    assert tags["PatientID"] == series.patient_id
    assert tags["StudyInstanceUID"] == series.study_uid
    assert tags["FrameOfReferenceUID"] == series.frame_of_reference_uid
    assert tags["SeriesInstanceUID"] != series.series_uid
    assert tags["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == series.series_uid
    assert tags["_instances"] == 1
    assert len(orthanc.get("/studies")) == 1  # the result went into the source study
    wait_until(node.idle, 10, what="the node to be idle")
    [job] = node.store.jobs()
    assert job.state is JobState.DELIVERED


def test_destination_down_then_back(node: Node, series: Series, tmp_path: Path, orthanc_port: int,
                                    orthanc_factory: list[Orthanc]) -> None:
    storescu(node, series.files)

    def failed_twice() -> bool:
        jobs = node.store.jobs()
        return bool(jobs and jobs[0].deliveries and jobs[0].deliveries[0].attempts >= 2)

    wait_until(failed_twice, 30, what="two failed delivery attempts")
    [job] = node.store.jobs()
    [delivery] = job.deliveries
    assert job.state is JobState.PROCESSED
    assert delivery.state in (DeliveryState.PENDING, DeliveryState.SENDING)
    assert "association with ORTHANC@127.0.0.1" in delivery.last_error
    orthanc = start_orthanc(orthanc_factory, tmp_path / "orthanc", node, orthanc_port)
    [tags] = wait_until(orthanc.series_tags, 30, 0.2, "the result in Orthanc after it came back")
    assert tags["StudyInstanceUID"] == series.study_uid
    wait_until(node.idle, 10, what="the node to be idle")
    [job] = node.store.jobs()
    assert job.state is JobState.DELIVERED and job.deliveries[0].state is DeliveryState.SENT
