"""The header walk that bounds what pydicom builds: checked against pydicom's own reading of the same bytes."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import pytest
from node_support import mr_datasets
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.node.header_elements import HeaderTooLargeError, count_elements

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


def pydicom_count(ds: Dataset) -> int:
    """Elements, items and delimiters as pydicom read them (its flags keep which lengths were undefined)."""
    n = 0
    for elem in ds:
        n += 1
        if elem.VR == "SQ":
            n += int(elem.is_undefined_length)
            for item in elem.value:
                n += 1 + pydicom_count(item) + int(item.is_undefined_length_sequence_item)
    return n


def data_set_bytes(ds: Dataset, syntax: str) -> bytes:
    """The data set alone (no preamble, no File Meta Information), encoded in ``syntax``."""
    out = DicomBytesIO()
    out.is_implicit_VR = syntax == ImplicitVRLittleEndian
    out.is_little_endian = syntax != ExplicitVRBigEndian
    write_dataset(out, ds)
    return out.getvalue()


def nested_mr(undefined: bool) -> Dataset:
    """An MR image with sequences two levels deep, lengths undefined or defined, an empty sequence and an empty item."""
    ds = mr_datasets(1, 8, patient_id="WALK")[0]
    del ds.file_meta
    inner = [Dataset() for _ in range(3)]
    for i, item in enumerate(inner):
        item.FrameAcquisitionNumber = i
        item.CodeValue = f"C{i}"
    frames = []
    for i in range(5):
        frame = Dataset()
        frame.FrameContentSequence = Sequence([inner[i % 3]])
        frame.PlanePositionSequence = Sequence([Dataset()])
        frame.PlanePositionSequence[0].ImagePositionPatient = [0, 0, i]
        frame.ReferencedImageSequence = Sequence([])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    for elem in [ds["PerFrameFunctionalGroupsSequence"], ds["SharedFunctionalGroupsSequence"],
                 *(f[k] for f in frames for k in ("FrameContentSequence", "PlanePositionSequence"))]:
        elem.is_undefined_length = undefined
        for item in elem.value:
            item.is_undefined_length_sequence_item = undefined
    return ds


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("undefined", [True, False])
def test_the_count_matches_pydicoms_reading(syntax: str, undefined: bool) -> None:
    raw = data_set_bytes(nested_mr(undefined), syntax)
    implicit, little = syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian
    reference = read_dataset(io.BytesIO(raw), implicit, little)
    counted = count_elements(io.BytesIO(raw), len(raw), implicit_vr=implicit, little_endian=little, limit=10**6)
    assert counted == pydicom_count(reference)
    assert counted > 60  # the sequences were entered, not skipped


def test_a_private_sequence_is_entered_in_implicit_vr_and_a_value_that_only_looks_like_one_is_skipped() -> None:
    ds = Dataset()
    ds.PatientID = "P"
    block = ds.private_block(0x0029, "SYNTHMRF TEST", create=True)
    block.add_new(0x10, "SQ", Sequence([Dataset() for _ in range(4)]))  # unknown to the dictionary
    # an OB value whose bytes begin like an item (FFFE,E000) and then are not one
    block.add_new(0x11, "OB", b"\xfe\xff\x00\xe0" + b"\x04\x00\x00\x00" + b"\x01\x02\x03\x04" + b"\x99" * 20)
    block.add_new(0x12, "LO", "after")
    for item in ds[0x00291010].value:
        item.PatientAge = "040Y"
    raw = data_set_bytes(ds, ImplicitVRLittleEndian)
    fp = io.BytesIO(raw)
    counted = count_elements(fp, len(raw), implicit_vr=True, little_endian=True, limit=10**6)
    # PatientID, the private creator, the sequence with its 4 items of one element each, (0029,1012): 12; the OB
    # value adds the few elements read before its bytes stop making sense; the walk resumes after it
    assert 12 < counted < 12 + 5
    assert fp.tell() == len(raw)  # (0029,1012), after the look-alike, was reached


def test_a_header_of_many_tiny_items_is_stopped_at_the_limit_without_reading_the_rest() -> None:
    ds = Dataset()
    ds.PatientID = "BOMB"
    ds.ReferencedImageSequence = Sequence([Dataset() for _ in range(200_000)])
    raw = data_set_bytes(ds, ExplicitVRLittleEndian)  # 1.6 MB
    fp = io.BytesIO(raw)
    start = time.process_time()
    with pytest.raises(HeaderTooLargeError, match="more than 50,000 elements and items"):
        count_elements(fp, len(raw), implicit_vr=False, little_endian=True, limit=50_000)
    assert fp.tell() < len(raw) // 3  # stopped early: the walk costs what the limit allows, not what the file holds
    assert time.process_time() - start < 5  # a loose bound (about 0.1 s): catches a walk gone quadratic
    assert count_elements(io.BytesIO(raw), len(raw), implicit_vr=False, little_endian=True, limit=500_000) == \
        1 + 1 + 200_000  # PatientID, the sequence and its items (of defined length: no delimiters)


def test_an_enhanced_mr_header_of_400_frames_is_far_under_the_default_limit() -> None:
    from dicom_node.config import IngressSection

    ds = nested_mr(undefined=True)
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame.copy() for _ in range(400)])
    raw = data_set_bytes(ds, ExplicitVRLittleEndian)
    counted = count_elements(io.BytesIO(raw), len(raw), implicit_vr=False, little_endian=True, limit=10**7)
    assert counted < 20_000 and 10 * counted < IngressSection().max_header_elements


@pytest.mark.parametrize("cut", [3, 17, 101, 0.6])
def test_truncated_or_garbage_bytes_end_the_walk_quietly(cut: float) -> None:
    # no exception and no loop: every element counted consumed at least its 8-byte header (the last one maybe cut)
    raw = data_set_bytes(nested_mr(undefined=True), ExplicitVRLittleEndian)
    end = int(len(raw) * cut) if cut < 1 else int(cut)
    whole = count_elements(io.BytesIO(raw), len(raw), implicit_vr=False, little_endian=True, limit=10**6)
    cut_short = count_elements(io.BytesIO(raw[:end]), end, implicit_vr=False, little_endian=True, limit=10**6)
    assert cut_short <= min(whole, end // 8 + 1)
    garbage = bytes(range(256)) * 64
    for implicit in (False, True):
        n = count_elements(io.BytesIO(garbage), len(garbage), implicit_vr=implicit, little_endian=True, limit=10**6)
        assert 1 <= n <= len(garbage) // 8 + 1


def test_a_file_on_disk(tmp_path: Path) -> None:
    ds = nested_mr(undefined=False)
    path = tmp_path / "a.dcm"
    path.write_bytes(data_set_bytes(ds, ExplicitVRLittleEndian))
    with path.open("rb") as fp:
        assert count_elements(fp, path.stat().st_size, implicit_vr=False, little_endian=True, limit=10**6) == \
            pydicom_count(read_dataset(io.BytesIO(path.read_bytes()), False, True))


def test_structure_lost_with_no_known_length_to_resume_after_bounds_the_rest() -> None:
    # an element where an item belongs, in a sequence of undefined length: pydicom reads the rest of the file as
    # that sequence (and parses every item after it) before it fails; the walk cannot follow, so the bytes left
    # must be too few to hold more than the limit
    lost = Dataset()
    lost.OtherPatientIDsSequence = Sequence([Dataset()])
    lost["OtherPatientIDsSequence"].is_undefined_length = True
    stray = Dataset()
    stray.PatientID = "P"
    sequence = data_set_bytes(lost, ExplicitVRLittleEndian)
    tail = Dataset()
    tail.ReferencedImageSequence = Sequence([Dataset() for _ in range(60_000)])
    raw = sequence[:12] + data_set_bytes(stray, ExplicitVRLittleEndian) + sequence[12:] + \
        data_set_bytes(tail, ExplicitVRLittleEndian)
    with pytest.raises(HeaderTooLargeError, match=r"header structure lost at byte \d+ .* more than 50,000"):
        count_elements(io.BytesIO(raw), len(raw), implicit_vr=False, little_endian=True, limit=50_000)
    small = raw[:200]  # the same loss with little after it: left to pydicom to judge
    assert count_elements(io.BytesIO(small), len(small), implicit_vr=False, little_endian=True, limit=50_000) < 10


def _explicit(tag: int, vr: bytes, value: bytes = b"", length: int | None = None) -> bytes:
    """One explicit VR little endian element, encoded by hand (hostile layouts pydicom's writer will not make)."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + b"\0\0" + struct.pack("<L", n) + value
    return head + struct.pack("<H", n) + value


def _walk_or_refuse(raw: bytes, implicit: bool, limit: int) -> int | None:
    try:
        return count_elements(io.BytesIO(raw), len(raw), implicit_vr=implicit, little_endian=True, limit=limit)
    except HeaderTooLargeError:
        return None


HEAD = _explicit(0x00080016, b"UI", b"1.2\0") + _explicit(0x00080018, b"UI", b"1.3\0")
TINY = b"".join(_explicit(0x00110000 + i, b"LO") for i in range(60_000))  # 8 bytes each: 60,000 elements


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("layout", ["after pixel data", "a VR that is not letters", "implicit VR that is explicit"])
def test_the_walk_takes_pydicoms_decisions_where_a_hostile_layout_would_hide_elements(layout: str) -> None:
    # each layout once hid 60,000 elements from the walk (a review found them): pydicom builds them all
    implicit = False
    if layout == "after pixel data":  # pydicom reads on after the top-level pixel data
        raw = HEAD + _explicit(0x7FE00010, b"OB", b"\0\0") + TINY
    elif layout == "a VR that is not letters":  # pydicom reads the 4 bytes after the tag as an implicit length (12)
        hidden = struct.pack("<HHL", 0x0009, 0x0010, 12) + struct.pack("<HH", 0x0009, 0x0011) + b"OB\0\0" + \
            struct.pack("<L", len(TINY))
        raw = HEAD + hidden + TINY
    else:  # an implicit VR transfer syntax, but the first element looks explicit: pydicom reads it all explicit
        implicit = True
        first = _explicit(0x00080016, b"UI", b"1.2.840.10008")
        raw = first + b"\0" * (0x000D4955 - 13) + TINY  # read as implicit, 'UI' + length would skip to the end
    built = len(read_dataset(io.BytesIO(raw), implicit, True, defer_size=64 * 1024))
    assert built > 60_000
    assert _walk_or_refuse(raw, implicit, 50_000) is None


@pytest.mark.filterwarnings("ignore")
def test_explicit_items_in_an_undefined_length_un_sequence_are_read_as_pydicom_reads_them() -> None:
    # seen in real files: UN of undefined length whose items are explicit VR; pydicom reads it cleanly
    raw = (HEAD + _explicit(0x00090010, b"LO", b"ACME") + _explicit(0x00091001, b"UN", length=0xFFFFFFFF)
           + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + _explicit(0x00100010, b"PN", b"ABCD")
           + struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
           + _explicit(0x00280010, b"US", b"\0\x04") + _explicit(0x7FE00010, b"OW", b"\0" * 4_000_000))
    ds = read_dataset(io.BytesIO(raw), False, True, defer_size=64 * 1024)
    assert len(ds[0x00091001].value) == 1
    assert _walk_or_refuse(raw, False, 50_000) == 2 + 1 + 1 + 1 + 1 + 1 + 1 + 1 + 1  # pixel zeros not counted


def test_encapsulated_pixel_data_is_skipped_fragment_by_fragment_and_not_counted() -> None:
    fragments = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, 8) + b"\xff" * 8 for _ in range(70_000))
    raw = (HEAD + _explicit(0x7FE00010, b"OB", length=0xFFFFFFFF) + fragments
           + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0) + _explicit(0xFFFCFFFC, b"OB", b"\0\0"))
    assert _walk_or_refuse(raw, False, 50_000) == 2 + 1 + 1  # 70,000 fragments cost pydicom no objects
