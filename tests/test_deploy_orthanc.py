"""deploy/: Orthanc's Lua rule (deploy/orthanc/synthmrf-autoforward.lua) in a real Orthanc forwards a
stable MPRAGE series to the node, not a T2 series and not synthmrf's own results, and the node's
results land back in Orthanc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from node_support import Orthanc, fast_processor, free_port, make_series, node_config, run_tool, wait_until

from dicom_node.node import Node
from dicom_node.node.job_store import JobState

LUA = Path(__file__).resolve().parents[1] / "deploy" / "orthanc" / "synthmrf-autoforward.lua"


@pytest.fixture
def node_and_orthanc(tmp_path: Path) -> Iterator[tuple[Node, Orthanc]]:
    port = free_port()
    dest = {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": port}
    node = Node(node_config(tmp_path / "node", destinations=[dest]), processor=fast_processor).start()
    orthanc = Orthanc(tmp_path / "orthanc", node_port=node.port, dicom_port=port,
                      extra_config={"LuaScripts": [str(LUA)], "StableAge": 1})
    try:
        orthanc.start()
        yield node, orthanc
    finally:
        orthanc.stop()
        node.stop(drain=False)


def _store_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    r = run_tool(["storescu", "-aet", "SCANNER", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
                  *map(str, files)])
    assert r.returncode == 0, r.stderr


def test_lua_rule_forwards_mprage_only_and_results_come_back(node_and_orthanc: tuple[Node, Orthanc],
                                                             tmp_path: Path) -> None:
    node, orthanc = node_and_orthanc
    mprage = make_series(tmp_path / "mprage", n=40, patient_id="LUA001", seed=1)
    t2 = make_series(tmp_path / "t2", n=40, patient_id="LUA001", seed=2, mprage=False)
    _store_to_orthanc(orthanc, [*mprage.files, *t2.files])
    [result] = wait_until(orthanc.series_tags, 60, 0.2, "the result back in Orthanc")
    assert result["PatientID"] == "LUA001"
    # Orthanc holds the result before the node has the C-STORE response and marks the job delivered.
    wait_until(node.idle, 10, what="the node to be idle")
    jobs = node.store.jobs()
    assert [(j.series_uid, j.state) for j in jobs] == [(mprage.series_uid, JobState.DELIVERED)]

    # synthmrf's own results (Manufacturer synthmrf) stored into Orthanc are never forwarded back.
    ours = tmp_path / "ours"
    ours.mkdir()
    new_series = pydicom.uid.generate_uid()
    for path in mprage.files:
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "synthmrf"
        ds.SeriesInstanceUID = new_series
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(ours / path.name, enforce_file_format=True)
    _store_to_orthanc(orthanc, sorted(ours.iterdir()))
    wait_until(lambda: any(s["MainDicomTags"].get("SeriesInstanceUID") == new_series and s.get("IsStable")
                           for s in (orthanc.get(f"/series/{i}") for i in orthanc.get("/series"))),
               30, 0.2, "Orthanc to see the series as stable")
    # A negative observation needs a window: the Lua callback of a stable series runs asynchronously.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert f"forwarding series {new_series}" not in (orthanc.folder / "orthanc.log").read_text()
        assert node.spool.series_uids() == [mprage.series_uid]
        time.sleep(0.2)
    assert f"forwarding series {mprage.series_uid}" in (orthanc.folder / "orthanc.log").read_text()


def test_compose_node_configuration_loads() -> None:
    from dicom_node.config import load_config

    cfg = load_config(LUA.parents[1] / "synthmrf.toml", environ={})
    assert cfg.node.allowed_calling_aets == ["ORTHANC"]
    assert [(d.ae_title, d.host, d.port) for d in cfg.destinations] == [("ORTHANC", "orthanc", 4242)]
