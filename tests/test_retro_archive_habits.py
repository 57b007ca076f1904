"""An archive's habits, played by a pynetdicom Query/Retrieve SCP on loopback: slow pending responses,
silence past the timeout, partial C-MOVE failures (then a resume of the missing instances only), an
unknown move destination, and silence mid-series while the node stops. The node is real (in-process,
fast processor)."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from node_support import fast_processor, free_port, mr_datasets, wait_until
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import CTImageStorage, MRImageStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from retro_support import retro_config

from dicom_node.config import NodeConfig
from dicom_node.dimse.status import (
    SUBOPERATIONS_WARNING,
)
from dicom_node.node import Node
from dicom_node.retro.progress import ProgressStore, RunState, SeriesState
from dicom_node.retro.runner import NodeView, PassReport, PassRunner, PassSpec
from dicom_node.retro.schedules import RetroScheduler, ScheduleSpec

PENDING = 0xFF00  # PS3.4 C.4.1.1.4: matches / sub-operations continuing
SUCCESS = 0x0000


@dataclass
class FakeArchive:
    """One study with one 4-instance MPRAGE-like series; behaviour switches set by the test."""

    node_port: int
    datasets: list[Dataset] = field(default_factory=lambda: mr_datasets(4, 16, patient_id="HABIT1"))
    pending_gap_s: float = 0.0  # pause before each C-FIND response (an archive that takes its time)
    silent_s: float = 0.0  # pause before the first study-level response
    fail_every_other: bool = False  # C-MOVE sub-operations 2 and 4 fail (sent with a class the node was not offered)
    unknown_destination: bool = False
    stall_after: int | None = None  # C-MOVE: silent after this many sub-operations until `release` (then cancelled)
    release: threading.Event = field(default_factory=threading.Event)
    moved: list[str] = field(default_factory=list)
    port: int = 0
    _server: Any = None

    def _find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        ident = event.identifier
        level = str(ident.QueryRetrieveLevel)
        if level == "STUDY":
            time.sleep(self.silent_s)
        first = self.datasets[0]
        answers = []
        if level == "STUDY":
            answers = [{"StudyInstanceUID": first.StudyInstanceUID, "PatientID": first.PatientID,
                        "StudyDate": first.StudyDate, "ModalitiesInStudy": "MR"}]
        elif level == "SERIES":
            answers = [{"SeriesInstanceUID": first.SeriesInstanceUID, "Modality": "MR",
                        "SeriesDescription": first.SeriesDescription, "SeriesNumber": 3, "MRAcquisitionType": "3D",
                        "ScanningSequence": ["GR", "IR"], "NumberOfSeriesRelatedInstances": len(self.datasets)}]
        elif level == "IMAGE":
            answers = [{"SOPInstanceUID": ds.SOPInstanceUID} for ds in self.datasets]
        for values in answers:
            time.sleep(self.pending_gap_s)
            out = Dataset()
            out.QueryRetrieveLevel = level
            for k, v in values.items():
                setattr(out, k, v)
            yield PENDING, out
        time.sleep(self.pending_gap_s)
        yield SUCCESS, None

    def _move(self, event: Event) -> Iterator[Any]:
        if self.unknown_destination:
            yield None, None
            return
        yield "127.0.0.1", self.node_port
        ident = event.identifier
        selected = self.datasets
        if str(ident.QueryRetrieveLevel) == "IMAGE":
            value = ident.SOPInstanceUID
            wanted = {str(v) for v in (value if isinstance(value, MultiValue | list) else [value])}
            selected = [ds for ds in self.datasets if ds.SOPInstanceUID in wanted]
        yield len(selected)
        for i, ds in enumerate(selected):
            if i == self.stall_after:
                self.release.wait(10)
            if event.is_cancelled or i == self.stall_after:
                yield 0xFE00, None  # PS3.4 C.4.2.1.5: cancelled
                return
            self.moved.append(str(ds.SOPInstanceUID))
            if self.fail_every_other and i % 2 == 1:
                bad = copy.deepcopy(ds)
                bad.SOPClassUID = CTImageStorage  # no context on the sub-association: the sub-operation fails
                yield PENDING, bad
            else:
                yield PENDING, ds

    def start(self) -> FakeArchive:
        ae = AE("FAKEPACS")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(MRImageStorage)  # the storage sub-associations offer MR only
        self._server = ae.start_server(("127.0.0.1", 0), block=False,
                                       evt_handlers=[(evt.EVT_C_FIND, self._find), (evt.EVT_C_MOVE, self._move)])
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def fake(node_port: int) -> Iterator[FakeArchive]:
    archive = FakeArchive(node_port).start()
    try:
        yield archive
    finally:
        archive.release.set()
        archive.stop()


def config(tmp_path: Path, fake: FakeArchive, **source: object) -> NodeConfig:
    from dicom_node.retro.config import SourceConfig

    src = SourceConfig.model_validate({"name": "fake", "ae_title": "FAKEPACS", "host": "127.0.0.1", "port": fake.port,
                                       "connect_timeout_s": 2, **source})
    return retro_config(tmp_path / "node", node_port=fake.node_port, sources=[src], retro={"retry_after_s": 0},
                        series={"quiet_seconds": 5.0, "settle_seconds": 0.1})


def run_pass(cfg: NodeConfig, node: Node) -> tuple[PassRunner, Any]:
    progress = ProgressStore.open(cfg.node.storage_dir)
    runner = PassRunner(cfg, progress, NodeView(cfg, node.port))
    return runner, runner.run(PassSpec("fake", {"Modality": "MR"}))


def test_slow_pending_responses_are_fine_silence_is_a_clear_timeout(tmp_path: Path, fake: FakeArchive) -> None:
    fake.pending_gap_s = 0.3  # each response within find_timeout_s, the whole C-FIND longer than it
    cfg = config(tmp_path, fake, find_timeout_s=0.8)
    with Node(cfg, processor=fast_processor) as node:
        started = time.monotonic()
        runner, report = run_pass(cfg, node)
        assert time.monotonic() - started > 0.8
        assert report.state is RunState.FINISHED and len(report.fetched) == 1, report.summary()

        fake.silent_s = 2.0
        runner, silent = run_pass(cfg, node)
        assert silent.state is RunState.FAILED and silent.retry_later
        assert "no response within 0.8 s" in silent.message and "try again" in silent.message
        runner.progress.close()


def test_partial_failure_then_only_the_missing_instances(tmp_path: Path, fake: FakeArchive) -> None:
    fake.fail_every_other = True
    cfg = config(tmp_path, fake)
    uid = str(fake.datasets[0].SeriesInstanceUID)
    with Node(cfg, processor=fast_processor) as node:
        runner, report = run_pass(cfg, node)
        assert report.state is RunState.FINISHED and list(report.failed) == [uid]
        assert f"0x{SUBOPERATIONS_WARNING:04X} (warning: some sub-operations failed); 2 completed, 2 failed" \
            in report.failed[uid]
        record = runner.progress.series(uid)
        assert record is not None and record.state is SeriesState.FAILED and record.attempts == 1

        fake.fail_every_other = False
        fake.moved.clear()
        runner, again = run_pass(cfg, node)
        assert again.fetched == [uid] and again.instances == 2, again.summary()
        assert fake.moved == [str(ds.SOPInstanceUID) for ds in fake.datasets[1::2]]  # only the missing ones
        assert node.wait_idle(30)
        [job] = node.store.jobs()
        assert job.instances == 4  # processed once, whole
        runner.progress.close()


def test_unknown_move_destination_says_what_to_configure(tmp_path: Path, fake: FakeArchive) -> None:
    fake.unknown_destination = True
    cfg = config(tmp_path, fake)
    with Node(cfg, processor=fast_processor) as node:
        runner, report = run_pass(cfg, node)
        assert report.state is RunState.FAILED
        assert "does not know the move destination 'SYNTHMRF'" in report.message
        assert "add it (AE title, host, port of the node)" in report.message
        runner.progress.close()


def test_a_stop_aborts_the_series_in_flight_on_a_silent_archive(tmp_path: Path, fake: FakeArchive) -> None:
    """The archive goes silent mid-series (no pending responses to check a cancel on): stopping the scheduler
    aborts the association, so the stop takes its drain time, not retrieve_timeout_s; the series is resumed."""
    fake.stall_after = 1
    cfg = config(tmp_path, fake, retrieve_timeout_s=30)
    uid = str(fake.datasets[0].SeriesInstanceUID)
    spec = ScheduleSpec(name="nightly", source="fake", cron="0 1 * * *", query={"Modality": "MR"})
    with Node(cfg, processor=fast_processor) as node:
        scheduler = RetroScheduler(cfg, node.port).start()
        reports: list[PassReport | None] = []
        thread = threading.Thread(target=lambda: reports.append(scheduler.run_schedule(spec)))
        thread.start()
        progress = ProgressStore.open(cfg.node.storage_dir)
        assert wait_until(lambda: len(fake.moved) == 1 and progress.series(uid) is not None, 20, 0.05,
                          "the archive to fall silent mid-series")
        time.sleep(0.3)  # the retrieve now waits for the next response
        started = time.monotonic()
        scheduler.stop(timeout_s=0.5)
        took = time.monotonic() - started
        thread.join(10)
        assert not thread.is_alive() and took < 5.0, took
        [report] = reports
        assert report is not None and report.state is RunState.INTERRUPTED, report
        assert "cancelled mid-series" in report.message
        assert [s.series_uid for s in progress.interrupted()] == [uid]  # left 'retrieving' to be resumed
        progress.close()
        fake.release.set()  # the archive ends its side (its storage association to the node closes)
