"""The durable spool: UID-checked paths, durable writes, duplicates, free-space floor, claims and versions."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from dicom_node.node import spool as spool_module
from dicom_node.node.spool import Spool, SpoolFullError, StoredNotSyncedError, StoreOutcome
from dicom_node.uids import InvalidUIDError, is_uid, require_uid

SERIES = "1.2.826.0.1.3680043.8.498.1"
DATA = b"\x00" * 128 + b"DICM" + b"payload" * 100


def spool_at(tmp_path: Path, min_free_bytes: int = 0) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_bytes)
    spool.prepare()
    return spool


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("value", ["1.2.3", "1.2.840.10008.5.1.4.1.1.4", "1.02.3", "0", "9" * 64])
def test_uids_accepted(value: str) -> None:
    assert is_uid(value)
    assert require_uid(value + "\x00", "SeriesInstanceUID") == value


@pytest.mark.parametrize("value", ["", "../../etc/passwd", "1.2/../../3", "1..2", ".1.2", "1.2.", "1.2.3a", "1 .2",
                                   "9" * 65, "/abs", "1.2\\3", None])
def test_uids_refused_with_the_attribute_named(value: str | None) -> None:
    assert not is_uid(value)
    with pytest.raises(InvalidUIDError, match=r"SeriesInstanceUID: not a valid UID"):
        require_uid(value, "SeriesInstanceUID")


def test_store_is_durable_and_named_by_uids(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.STORED
    path = spool.series_root / SERIES / "incoming" / "1.2.3.4.dcm"
    assert path.read_bytes() == DATA
    assert list(spool.tmp_dir.iterdir()) == []  # the temporary name is gone


def test_strict_mode_also_syncs_the_folder(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0, fsync_directories=True)
    spool.prepare()
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.STORED
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.DUPLICATE
    assert list(spool.tmp_dir.iterdir()) == []


def test_store_refuses_path_traversal_from_header_values(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    with pytest.raises(InvalidUIDError, match=r"SeriesInstanceUID: not a valid UID.*'\.\./\.\./x'"):
        spool.store("../../x", "1.2.3", DATA)
    with pytest.raises(InvalidUIDError, match=r"SOPInstanceUID: not a valid UID"):
        spool.store(SERIES, "1.2/../../../evil", DATA)
    assert all_files(tmp_path) == []


def test_duplicates_are_detected_in_incoming_and_in_claimed_versions_after_restart(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.STORED
    assert spool.store(SERIES, "1.2.3.4", b"other bytes") is StoreOutcome.DUPLICATE
    claim = spool.claim(SERIES)
    assert claim is not None and claim.version == 1
    restarted = spool_at(tmp_path)  # a new process: dedup comes from the folders
    assert restarted.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.DUPLICATE
    assert restarted.claim(SERIES) is None
    assert (claim.input_dir / "1.2.3.4.dcm").read_bytes() == DATA


def test_free_space_floor_refuses_and_writes_nothing(tmp_path: Path) -> None:
    spool = spool_at(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(SpoolFullError, match=r"MiB free, .* bytes to store, .* MiB kept free \(minimum"):
        spool.store(SERIES, "1.2.3.4", DATA)
    assert all_files(tmp_path / "spool") == []


def test_partial_writes_are_cleared_and_whole_ones_rolled_forward_at_start(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    (spool.tmp_dir / f"{SERIES}_1.2.3.4.0.part").write_bytes(b"half")  # cut short by the crash
    (spool.tmp_dir / f"{SERIES}_1.2.3.5.1.part").write_bytes(DATA)  # fsynced, but the rename was lost
    (spool.tmp_dir / "stray").write_bytes(b"?")
    checked = []

    def complete_uids(path: Path) -> tuple[str, str] | None:
        checked.append(path.name)
        return (SERIES, "1.2.3.5") if path.read_bytes() == DATA else None

    assert spool.prepare(complete_uids) == 1
    assert len(checked) == 3
    assert list(spool.tmp_dir.iterdir()) == []
    assert [p.name for p in spool.incoming_files(SERIES)] == ["1.2.3.5.dcm"]
    assert spool.store(SERIES, "1.2.3.5", DATA) is StoreOutcome.DUPLICATE


def test_claims_make_versions_that_hold_the_whole_series(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    for i in range(3):
        spool.store(SERIES, f"1.2.3.{i}", DATA)
    first = spool.claim(SERIES)
    assert first is not None and (first.version, first.new_instances, first.total_instances) == (1, 3, 3)
    assert spool.claim(SERIES) is None  # nothing new
    spool.store(SERIES, "1.2.3.9", DATA)  # a late instance
    second = spool.claim(SERIES)
    assert second is not None and (second.version, second.new_instances, second.total_instances) == (2, 1, 4)
    assert sorted(p.name for p in second.input_dir.iterdir()) == [f"1.2.3.{i}.dcm" for i in (0, 1, 2, 9)]
    assert os.stat(second.input_dir / "1.2.3.0.dcm").st_ino == os.stat(first.input_dir / "1.2.3.0.dcm").st_ino
    assert spool.versions(SERIES) == [1, 2]
    spool.store(SERIES, "1.2.3.10", DATA)
    third = spool.claim(SERIES, at_least=7)  # the job store remembers purged versions
    assert third is not None and third.version == 7


def test_interrupted_claim_is_finished_at_start(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.store(SERIES, "1.2.3.1", DATA)
    folder = spool.series_dir(SERIES)
    staging = folder / ".v0001.claim"
    staging.mkdir()
    os.rename(folder / "incoming", staging / "input")  # the crash came right after this rename
    (folder / ".v0002.claim").mkdir()  # and an empty one from a crash right after mkdir
    restarted = spool_at(tmp_path)
    done = restarted.finish_interrupted_claims()
    assert [(c.series_uid, c.version, c.total_instances) for c in done] == [(SERIES, 1, 1)]
    assert restarted.versions(SERIES) == [1]
    assert not (folder / ".v0002.claim").exists()


def test_purge_removes_the_version_and_then_the_series(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.store(SERIES, "1.2.3.1", DATA)
    spool.claim(SERIES)
    spool.purge_version(SERIES, 1)
    assert not spool.series_dir(SERIES).exists()
    assert spool.store(SERIES, "1.2.3.1", DATA) is StoreOutcome.STORED  # dedup ends with the folder


def test_parts_are_written_in_order(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    big = bytes(range(256)) * 4000
    assert spool.store(SERIES, "1.2.3.7", (b"head", memoryview(big), b"", b"tail")) is StoreOutcome.STORED
    assert (spool.series_root / SERIES / "incoming" / "1.2.3.7.dcm").read_bytes() == b"head" + big + b"tail"


def test_retention_cannot_delete_a_version_while_a_claim_links_its_files(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spool = spool_at(tmp_path)
    for i in range(3):
        spool.store(SERIES, f"1.2.3.{i}", DATA)
    assert spool.claim(SERIES) is not None
    spool.store(SERIES, "1.2.3.9", DATA)  # a late instance: version 2 links version 1's files
    link = os.link
    purge: list[threading.Thread] = []

    def link_while_purging(src: str | Path, dst: str | Path) -> None:
        if not purge:  # retention purges version 1 in the middle of the linking
            purge.append(threading.Thread(target=spool.purge_version, args=(SERIES, 1)))
            purge[0].start()
            purge[0].join(0.2)
        link(src, dst)

    monkeypatch.setattr(os, "link", link_while_purging)
    second = spool.claim(SERIES)
    purge[0].join(5)
    assert second is not None and (second.version, second.total_instances) == (2, 4)
    assert sorted(p.name for p in second.input_dir.iterdir()) == [f"1.2.3.{i}.dcm" for i in (0, 1, 2, 9)]
    assert spool.versions(SERIES) == [2]


def test_an_instance_kept_when_the_folder_sync_failed_is_a_duplicate_later(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool", 0, fsync_directories=True)
    spool.prepare()
    real = spool_module.fsync_dir

    def failing(path: Path) -> None:
        if path.name == "incoming":
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", failing)
    with pytest.raises(StoredNotSyncedError, match=r"fsync of incoming/ failed after the rename"):
        spool.store(SERIES, "1.2.3.4", DATA)
    assert spool.is_waiting(SERIES, "1.2.3.4")
    assert (spool.series_root / SERIES / "incoming" / "1.2.3.4.dcm").read_bytes() == DATA
    assert list(spool.tmp_dir.iterdir()) == []
    with pytest.raises(StoredNotSyncedError, match=r"failed again"):  # the resend: still not durable, no ack
        spool.store(SERIES, "1.2.3.4", DATA)
    monkeypatch.setattr(spool_module, "fsync_dir", real)
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.DUPLICATE  # the folder synced this time
    monkeypatch.setattr(spool_module, "fsync_dir", failing)
    assert spool.store(SERIES, "1.2.3.4", DATA) is StoreOutcome.DUPLICATE  # known durable: no second fsync
