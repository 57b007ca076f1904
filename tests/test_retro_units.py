"""Retro building blocks without a network: query keys and matching, the MPRAGE pre-filter on C-FIND
answers, run windows, cron expressions, configuration, the progress store's claims, association slots."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset

from dicom_node.config import MprageSection, config_from_mapping
from dicom_node.retro.association import ArchiveError, SourceSlots, status_text
from dicom_node.retro.config import RetroSection, SourceConfig, in_window, parse_window
from dicom_node.retro.harvest import split_of
from dicom_node.retro.progress import ProgressStore, RunState, SeriesState
from dicom_node.retro.query import QueryError, matches, parse_query, prefilter, redacted
from dicom_node.retro.schedules import ScheduleError, ScheduleSpec, parse_cron


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
        SourceConfig.model_validate({"name": "a", "ae_title": "A", "host": "h", "port": 1, "tls": True})
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

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    other = ProgressStore(tmp_path / "progress.sqlite")
    c = other.start_run("pass", "pacs", {})
    other.close()
    with store._tx() as db:  # pretend run c belonged to the process that has exited
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", (int(dead.stdout), c))
    assert store.reap_dead_runs() == 1 and store.run(c).state is RunState.INTERRUPTED  # type: ignore[union-attr]
    assert store.run(b).state is RunState.RUNNING  # type: ignore[union-attr]
    store.close()
    assert os.getpid() != int(dead.stdout)


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
