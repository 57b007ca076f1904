"""Retro building blocks without a network: query keys and matching, the MPRAGE pre-filter on C-FIND
answers, run windows, cron expressions, configuration, the progress store's claims and run liveness,
association slots, retrieve outcomes, back-pressure, and the harvest's split."""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from retro_support import retro_config

from dicom_node.config import MprageSection, config_from_mapping
from dicom_node.retro.association import (
    ArchiveError,
    ArchiveSession,
    ArchiveUnavailableError,
    SourceSlots,
    archive_for,
    status_text,
)
from dicom_node.retro.config import RetroSection, SourceConfig, in_window, parse_window
from dicom_node.retro.harvest import harvest_key, patient_group
from dicom_node.retro.progress import ProgressStore, RunState, SeriesState
from dicom_node.retro.query import QueryError, find_studies, matches, parse_query, prefilter, redacted
from dicom_node.retro.retrieve import retrieve
from dicom_node.retro.runner import NodeView, PassRunner, PassSpec
from dicom_node.retro.schedules import (
    ScheduleError,
    ScheduleSpec,
    fires_at_most_hourly,
    parse_cron,
    repeats_wall_clock,
)
from training.harvested import split_of, write_manifest


def test_query_terms_are_split_by_level() -> None:
    q = parse_query(["Modality=MR", "StudyDate=20100101-20151231", "SeriesDescription=*MPRAGE*", "PatientID=P1"])
    assert dict(q.study) == {"StudyDate": "20100101-20151231", "PatientID": "P1", "ModalitiesInStudy": "MR"}
    assert dict(q.series) == {"Modality": "MR", "SeriesDescription": "*MPRAGE*"}


@pytest.mark.parametrize(("terms", "message"), [
    (["Modality"], "expected KEY=VALUE"),
    (["NoSuchKeyword=1"], "'NoSuchKeyword': not a DICOM keyword"),
    (["QueryRetrieveLevel=IMAGE"], "'QueryRetrieveLevel': not a DICOM keyword usable"),
    (["Modality=MR", "Modality=CT"], "'Modality': given twice"),
])
def test_bad_query_terms_are_named(terms: list[str], message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_query(terms)


def answer(**attrs: object) -> Dataset:
    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_patient_values_are_not_logged() -> None:
    assert redacted({"PatientName": "DOE^J*", "PatientID": "123", "StudyDate": "2012"}) == {
        "PatientName": "***", "PatientID": "***", "StudyDate": "2012"}


def test_matching_is_lenient_like_the_standard() -> None:
    ds = answer(SeriesDescription="t1_mprage_sag_p2_iso", StudyDate="20120315", SeriesInstanceUID="1.2.3",
                ModalitiesInStudy=["MR", "CT"])
    assert matches(ds, {"SeriesDescription": "*MPRAGE*"})  # case-insensitive wildcards
    assert not matches(ds, {"SeriesDescription": "*flair*"})
    assert matches(ds, {"StudyDate": "20100101-20151231"}) and not matches(ds, {"StudyDate": "20130101-"})
    assert matches(ds, {"SeriesInstanceUID": "1.2.4\\1.2.3"}) and not matches(ds, {"SeriesInstanceUID": "1.2.4"})
    assert matches(ds, {"ModalitiesInStudy": "CT"})  # any value of a multi-valued attribute
    assert matches(ds, {"ProtocolName": "*x*"})  # not returned by the archive: not held against it


RULES = MprageSection()


@pytest.mark.parametrize(("attrs", "accepted", "reason"), [
    ({"Modality": "MR", "SeriesDescription": "t1_mprage_sag", "MRAcquisitionType": "3D",
      "ScanningSequence": ["GR", "IR"], "InversionTime": "900"}, True, "MPRAGE-like"),
    ({"Modality": "MR", "SeriesDescription": "t1_mprage_sag"}, True, "not returned by the archive"),
    ({"Modality": "MR", "SeriesDescription": "t2_tse_tra", "MRAcquisitionType": "2D"}, False, "not a 3D acquisition"),
    ({"Modality": "MR", "SeriesDescription": "t2_tse_3d", "ScanningSequence": "SE", "MRAcquisitionType": "3D"},
     False, "not gradient echo"),
    ({"Modality": "MR", "SeriesDescription": "AAHead_Scout localizer"}, False, "exclude pattern"),
    ({"Modality": "MR", "SeriesDescription": "t1_mprage", "ImageType": ["DERIVED", "SECONDARY"]}, False,
     "image type DERIVED/SECONDARY is excluded"),
    ({"Modality": "CT", "SeriesDescription": "head"}, False, "modality CT is not MR"),
])
def test_prefilter_drops_only_what_the_answer_shows(attrs: dict[str, object], accepted: bool, reason: str) -> None:
    decision = prefilter(answer(**attrs), RULES)
    assert decision.accepted is accepted and reason in decision.reason


def test_windows() -> None:
    assert parse_window("20:00-06:30") == (datetime.time(20, 0), datetime.time(6, 30))
    night = "22:00-06:00"
    assert in_window(night, datetime.datetime(2024, 1, 1, 23, 0)) and in_window(night, datetime.datetime(2024, 1, 2, 5))
    assert not in_window(night, datetime.datetime(2024, 1, 1, 12, 0))
    assert in_window("08:00-17:00", datetime.datetime(2024, 1, 1, 8, 0)) and in_window(None, datetime.datetime.now())
    with pytest.raises(ValueError, match="expected 'HH:MM-HH:MM'"):
        parse_window("evenings")
    with pytest.raises(ValueError, match="not a time of day"):
        parse_window("25:00-06:00")


def test_cron_expressions() -> None:
    assert "minute='0'" in repr(parse_cron("0 2 * * *"))
    assert "second='*/5'" in repr(parse_cron("*/5 * * * * *"))
    with pytest.raises(ScheduleError, match="expected 5 fields"):
        parse_cron("* * *")
    with pytest.raises(ScheduleError, match="cron '0 25 \\* \\* \\*'"):
        parse_cron("0 25 * * *")
    with pytest.raises(ValidationError, match="not a DICOM keyword"):
        ScheduleSpec(name="x", source="a", cron="0 2 * * *", query={"Bogus": "1"})


def test_configuration_sections() -> None:
    cfg = config_from_mapping({"sources": [{"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104,
                                            "retrieve": "get", "max_associations": 2}],
                               "retro": {"window": "20:00-06:00", "max_studies_per_hour": 30}},
                              environ={"SYNTHMRF_RETRO__MAX_STUDIES_PER_RUN": "7"})
    assert cfg.sources[0].retrieve == "get" and cfg.sources[0].max_associations == 2
    assert (cfg.retro.window, cfg.retro.max_studies_per_hour, cfg.retro.max_studies_per_run) == ("20:00-06:00", 30, 7)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SourceConfig.model_validate({"name": "a", "ae_title": "A", "host": "h", "port": 1, "tls_verify": True})
    with pytest.raises(ValidationError, match="Input should be 'move' or 'get'"):
        SourceConfig(name="a", ae_title="A", host="h", port=1, retrieve="ftp")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="harvest_mrf_pattern: not a regular expression"):
        RetroSection(harvest_mrf_pattern="mrf(")


def test_status_text() -> None:
    assert status_text(0xA801) == "0xA801 (refused: move destination unknown)"
    assert status_text(0xC123) == "0xC123 (failed: unable to process)"
    assert status_text(None) == "no response (timeout or abort)"


def test_claims_retries_and_dead_runs(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "progress.sqlite")
    a = store.start_run("pass", "pacs", {})
    b = store.start_run("pass", "pacs", {})
    assert store.claim("1.2.3", "1.2", "pacs", a) is not None
    assert store.claim("1.2.3", "1.2", "pacs", b) is None  # run a is alive (this process)
    store.finish_run(a, RunState.INTERRUPTED)
    assert [s.series_uid for s in store.interrupted()] == ["1.2.3"]
    claimed = store.claim("1.2.3", "1.2", "pacs", b)
    assert claimed is not None and claimed.attempts == 2
    assert store.failed("1.2.3", "boom", retry_after_s=3600, max_attempts=3) is SeriesState.FAILED
    assert store.claim("1.2.3", "1.2", "pacs", b) is None  # not due before retry_after_s
    assert store.claim("1.2.3", "1.2", "pacs", b, now=9e12) is not None
    assert store.failed("1.2.3", "boom", retry_after_s=0, max_attempts=3) is SeriesState.GAVE_UP
    assert store.retry("1.2.3") and store.claim("1.2.3", "1.2", "pacs", b) is not None

    other = ProgressStore(tmp_path / "progress.sqlite")
    c = other.start_run("pass", "pacs", {})
    assert store.reap_dead_runs() == 0  # c's lock is held (by another store of this process)
    other.close()  # a closed store's runs are over
    assert store.reap_dead_runs() == 1 and store.run(c).state is RunState.INTERRUPTED  # type: ignore[union-attr]
    assert store.run(b).state is RunState.RUNNING  # type: ignore[union-attr]
    store.close()


def test_two_stores_never_both_claim_an_interrupted_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI pass and the scheduler of 'serve' race for one interrupted series: exactly one gets it."""
    first = ProgressStore(tmp_path / "progress.sqlite")
    second = ProgressStore(tmp_path / "progress.sqlite")
    gone = first.start_run("pass", "pacs", {})
    first.claim("1.2.3", "1.2", "pacs", gone)
    first.finish_run(gone, RunState.INTERRUPTED)
    runs = {first: first.start_run("pass", "pacs", {}), second: second.start_run("pass", "pacs", {})}
    alive = ProgressStore._alive

    def slow_alive(self: ProgressStore, *args: Any) -> bool:  # widen the window between check and update
        time.sleep(0.2)
        return alive(self, *args)

    monkeypatch.setattr(ProgressStore, "_alive", slow_alive)
    barrier = threading.Barrier(2)
    claims: dict[int, object] = {}

    def claim(store: ProgressStore) -> None:
        barrier.wait()
        claims[runs[store]] = store.claim("1.2.3", "1.2", "pacs", runs[store])

    threads = [threading.Thread(target=claim, args=(s,)) for s in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [run for run, got in claims.items() if got is not None]
    assert len(won) == 1, claims
    record = first.series("1.2.3")
    assert record is not None and record.run_id == won[0] and record.attempts == 2
    first.close()
    second.close()


HOLD_RUN = """
import sys
from pathlib import Path
from dicom_node.retro.progress import ProgressStore
store = ProgressStore(Path(sys.argv[1]))
print(store.start_run("pass", "pacs", {}), flush=True)
sys.stdin.read()
"""


def test_a_run_is_alive_while_its_process_holds_its_lock(tmp_path: Path) -> None:
    """Not by (host, pid): another container's hostname does not make a live run dead, and a reused PID
    does not keep a dead run alive."""
    store = ProgressStore(tmp_path / "progress.sqlite")
    child = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(store.path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    run_id = int(child.stdout.readline())
    store.claim("1.2.3", "1.2", "pacs", run_id)
    with store._tx() as db:  # as recorded by a process in another container
        db.execute("UPDATE runs SET host = 'other-container' WHERE id = ?", (run_id,))
    assert store.reap_dead_runs() == 0 and store.interrupted() == []
    assert (tmp_path / "locks" / f"run-{run_id}.lock").is_file()

    child.stdin.close()  # the process ends without finishing its run; the OS releases its lock
    child.wait(10)
    with store._tx() as db:  # its PID now belongs to a live process (ours), on this host
        db.execute("UPDATE runs SET host = ?, pid = ? WHERE id = ?", (store._host, os.getppid(), run_id))
    assert [s.series_uid for s in store.interrupted()] == ["1.2.3"]
    assert store.reap_dead_runs() == 1 and store.run(run_id).state is RunState.INTERRUPTED  # type: ignore[union-attr]
    assert not (tmp_path / "locks" / f"run-{run_id}.lock").exists()
    store.close()


def test_a_series_whose_retrieval_is_unfinished_is_held_for_a_while(tmp_path: Path) -> None:
    store = ProgressStore(tmp_path / "progress.sqlite")
    run = store.start_run("pass", "pacs", {})
    assert store.incomplete_retrieval("1.2.3", 60) is None  # never retrieved: sent prospectively
    store.claim("1.2.3", "1.2", "pacs", run, expected=176)
    store.record_progress("1.2.3", 40, 0)
    assert "under way or was interrupted (40 of 176 instances)" in (store.incomplete_retrieval("1.2.3", 60) or "")
    later = time.time() + 61
    assert store.incomplete_retrieval("1.2.3", 60, now=later) is None  # held 60 s after the last activity
    store.failed("1.2.3", "0xA702 out of resources", retry_after_s=600, max_attempts=3)
    assert "failed after 40 of 176 instances (0xA702" in (store.incomplete_retrieval("1.2.3", 60) or "")
    store.claim("1.2.3", "1.2", "pacs", run, now=9e12)
    store.retrieved("1.2.3", 176)
    assert store.incomplete_retrieval("1.2.3", 60) is None
    store.failed("1.2.3", "boom", retry_after_s=0, max_attempts=1)  # gave up: process what there is
    assert store.incomplete_retrieval("1.2.3", 60) is None
    store.close()


def test_one_association_slot_per_source(tmp_path: Path) -> None:
    slots = SourceSlots(tmp_path, SourceConfig(name="pacs", ae_title="A", host="h", port=1))
    stop = threading.Event()
    with slots.slot():
        stop.set()
        with pytest.raises(ArchiveError, match="stopped while waiting for a free association"), slots.slot(stop):
            pass
    with slots.slot(stop) as n:  # free again
        assert n == 0


def test_split_is_stable_and_uses_every_part() -> None:
    assert {split_of(f"sub-{i:03d}", 0) for i in range(200)} == {"train", "val", "test"}
    assert split_of("sub-001", 0) == split_of("sub-001", 0)


def test_waiting_for_an_association_slot_is_bounded_and_logged_once(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    slots = SourceSlots(tmp_path, SourceConfig(name="pacs", ae_title="A", host="h", port=1, slot_wait_s=0.4))
    checks: list[float] = []

    class WindowClosedError(Exception):
        pass

    def check() -> None:  # the pass's run window closes during the wait
        checks.append(time.monotonic())
        if len(checks) == 3:
            raise WindowClosedError

    caplog.set_level(logging.DEBUG, logger="dicom_node.retro.association")
    with slots.slot():
        with pytest.raises(WindowClosedError), slots.slot(check=check, poll_s=0.05):
            pass
        started = time.monotonic()
        with pytest.raises(ArchiveUnavailableError, match=r"all 1 association slots stayed busy for 0\.4 s"), \
                slots.slot(poll_s=0.05):
            pass
        assert 0.4 <= time.monotonic() - started < 2.0
    waits = [r for r in caplog.records if "association slots are busy" in r.getMessage()]
    assert [r.levelno for r in waits] == [logging.WARNING] * 2  # once per wait, not once per poll


class FakeAssociation:
    """Plays back DIMSE responses for one C-FIND or C-MOVE, keeping the identifier sent."""

    def __init__(self, responses: list[tuple[Dataset, Dataset | None]]) -> None:
        self.responses = responses
        self.sent: list[Dataset] = []
        self.dimse_timeout: float | None = None
        self.is_established = True

    def send_c_find(self, identifier: Dataset, model: object) -> Iterator[tuple[Dataset, Dataset | None]]:
        self.sent.append(identifier)
        return iter(self.responses)

    def send_c_move(self, identifier: Dataset, destination: str, model: object
                    ) -> Iterator[tuple[Dataset, Dataset | None]]:
        self.sent.append(identifier)
        return iter(self.responses)


def status(code: int, **counts: int) -> Dataset:
    ds = Dataset()
    ds.Status = code
    for name, n in counts.items():
        setattr(ds, f"NumberOf{name}Suboperations", n)
    return ds


ARCHIVE = archive_for(SourceConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=1), "SYNTHMRF")


@pytest.mark.parametrize(("final", "failed_uids", "ok", "said"), [
    (status(0xB000), ["1.2.3.4.2"], False, "the archive did not say how many sub-operations failed"),
    (status(0xB000), None, False, "the archive did not say how many"),
    (status(0x0000, Completed=3, Failed=0, Warning=0), ["1.2.3.4.2"], False, "1 instances listed as failed"),
    (status(0xB000, Completed=3, Failed=1, Warning=0), ["1.2.3.4.2"], False, "1 failed"),
    (status(0xB000, Completed=4, Failed=0, Warning=1), None, True, "4 completed, 0 failed, 1 warning"),
    (status(0x0000, Completed=4, Failed=0, Warning=0), None, True, "4 completed"),
])
def test_a_retrieve_is_complete_only_when_the_archive_shows_it(final: Dataset, failed_uids: list[str] | None,
                                                               ok: bool, said: str) -> None:
    found = None
    if failed_uids is not None:
        found = Dataset()
        found.FailedSOPInstanceUIDList = failed_uids
    assoc = FakeAssociation([(status(0xFF00, Completed=2, Failed=0, Warning=0, Remaining=2), None), (final, found)])
    result = retrieve(assoc, ARCHIVE, "1.2.3", "1.2.3.4", method="move")  # type: ignore[arg-type]
    assert result.ok is ok and said in result.describe(), result.describe()


def test_non_ascii_query_values_are_sent_as_utf8() -> None:
    assoc = FakeAssociation([(status(0x0000), None)])
    find_studies(assoc, ARCHIVE, parse_query(["StudyDescription=Tête IRM*"]))  # type: ignore[arg-type]
    [sent] = assoc.sent
    assert sent.SpecificCharacterSet == "ISO_IR 192"
    assert "Tête IRM*".encode() in encode(sent, True, True)  # type: ignore[operator]
    ascii_only = FakeAssociation([(status(0x0000), None)])
    find_studies(ascii_only, ARCHIVE, parse_query(["StudyDescription=Head*"]))  # type: ignore[arg-type]
    assert "SpecificCharacterSet" not in ascii_only.sent[0]


def test_series_held_for_a_later_pass_do_not_stall_the_passes(tmp_path: Path) -> None:
    """A partly failed or interrupted series waits in the node for a later pass: it must not count as queued,
    or such series fill max_queued_jobs and every later pass (the ones that would finish them) waits forever."""
    source = SourceConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)
    cfg = retro_config(tmp_path / "node", node_port=1, sources=[source], retro={"max_queued_jobs": 1})
    storage = Path(cfg.node.storage_dir)
    for uid in ("1.2.3.1", "1.2.3.2"):  # instances of each in the node's spool, the series still 'arriving'
        incoming = storage / "series" / uid / "incoming"
        incoming.mkdir(parents=True)
        (incoming / f"{uid}.7.dcm").write_bytes(b"")
    progress = ProgressStore.open(storage)
    run = progress.start_run("pass", "pacs", {})
    progress.claim("1.2.3.1", "1.2", "pacs", run)
    progress.failed("1.2.3.1", "0xB000: 2 of 4 failed", retry_after_s=600, max_attempts=3)
    progress.claim("1.2.3.2", "1.2", "pacs", run)
    progress.finish_run(run, RunState.INTERRUPTED)  # 1.2.3.2 interrupted mid-series
    view = NodeView(cfg)
    assert view.busy() == 2 and view.busy(progress.held_series(cfg.retro.hold_incomplete_s)) == 0
    stop = threading.Event()
    stop.set()  # a pass that waited for the queue would end here with 'stop requested'
    runner = PassRunner(cfg, progress, view, stop=stop)
    session = ArchiveSession(archive_for(source, "SYNTHMRF"), SourceSlots(tmp_path / "locks", source), stop, None)
    runner._wait_turn(PassSpec("pacs"), source, session, None)  # returns: nothing is queued
    view.close()
    progress.close()


def test_the_hour_repeated_when_daylight_saving_time_ends_fires_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        edt = datetime.datetime(2024, 11, 3, 5, 30, tzinfo=datetime.UTC).timestamp()  # 01:30 EDT
        est = edt + 3600  # 01:30 EST, the same wall clock an hour later
        assert repeats_wall_clock(edt, est)
        assert not repeats_wall_clock(edt - 3600, edt)  # 00:30 EDT -> 01:30 EDT: an hourly cron as usual
        assert not repeats_wall_clock(edt + 900, est)  # 01:45 EDT -> 01:30 EST: not the same time of day
        assert not repeats_wall_clock(est - 86400, est)  # yesterday's run
        summer = datetime.datetime(2024, 7, 1, 5, 30, tzinfo=datetime.UTC).timestamp()
        assert not repeats_wall_clock(summer, summer + 3600)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert fires_at_most_hourly("30 1 * * *") and fires_at_most_hourly("0 * * * *")
    assert fires_at_most_hourly("15 30 1 * * *")
    assert not fires_at_most_hourly("*/20 * * * *") and not fires_at_most_hourly("0,30 1 * * *")
    assert not fires_at_most_hourly("*/5 30 1 * * *")


def subject(out: Path, sid: str, group: str) -> None:
    folder = out / sid
    folder.mkdir(parents=True)
    (folder / "subject.json").write_text(json.dumps({
        "id": sid, "group": group, "source": "pacs", "study_instance_uid": "1.2." + sid[-3:],
        "sequence_hash": "a" * 64, "rank": 4, "mrf_grid": {"shape": [4, 4, 4], "affine_ras": []}}))


def splits(out: Path) -> dict[str, str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {sid: part for part, ids in manifest["split"].items() for sid in ids}


def test_the_split_keeps_a_patient_together_and_never_moves_a_subject(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    salt = "5" * 32
    groups = [patient_group(f"VOL{k:03d}", "", salt) for k in range(200)]
    test_group = next(g for g in groups if split_of(g, 0) == "test")
    # a volunteer scanned twice: the two studies hash apart, the volunteer's group decides
    ids = [f"sub-{k:03d}" for k in range(200)]
    a = next(i for i in ids if split_of(i, 0) == "train")
    b = next(i for i in ids if split_of(i, 0) != "train")
    subject(out, a, test_group)
    subject(out, b, test_group)
    write_manifest(out, 0)
    first = splits(out)
    assert first[a] == first[b] == "train"  # the only group: put in train (training needs one)

    for k, g in enumerate(groups[:60]):  # later harvests fill every part by hash
        subject(out, f"sub-new{k:03d}", g)
    write_manifest(out, 0)
    later = splits(out)
    assert later[a] == later[b] == "train"  # recorded: never moved to test, where its hash points
    assert {later[f"sub-new{k:03d}"] for k in range(60)} == {"train", "val", "test"}
    assert all(later[f"sub-new{k:03d}"] == ("train" if g == test_group else split_of(g, 0))
               for k, g in enumerate(groups[:60]))  # new subjects of a known group join it
    assert patient_group("VOL001", "", salt) != patient_group("VOL001", "", "6" * 32)
    key = harvest_key(tmp_path / "node")
    assert key == harvest_key(tmp_path / "node") and len(key) == 64  # made once, then read
    assert (tmp_path / "node" / "retro" / "harvest.key").stat().st_mode & 0o777 == 0o600
    assert key not in (out / "manifest.json").read_text()
    assert "VOL" not in (out / "manifest.json").read_text()
