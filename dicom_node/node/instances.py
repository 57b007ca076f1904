"""A received instance: the checks it must pass before it is stored, and what the node records of it.

``inspect_instance`` reads the headers of a C-STORE data set as received into a file (values larger than
``DEFER_BYTES``, the pixel data, stay on disk) and refuses (with a named DIMSE status) what the node
cannot use: instances over the ``[ingress]`` limits (size first, then the image size its header claims,
before pixel data is touched), undecodable or truncated streams, missing or invalid identifying UIDs,
UIDs that disagree with the command, and MR images without complete pixel data. It also says which
valid instances are not worth keeping (non-MR, or MR that the MPRAGE rules refuse by its own
header). ``file_meta_bytes`` writes the File Meta Information of the received file;
``complete_file_uids`` and ``read_instance_info`` read a received file back after a restart.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage, MRImageStorage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from dicom_node.config import IngressSection, MprageSection
from dicom_node.dimse.status import CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS, OUT_OF_RESOURCES
from dicom_node.node.header_elements import MIN_ELEMENT_BYTES, HeaderTooLargeError, count_elements, count_fragments
from dicom_node.uids import InvalidUIDError, require_uid

MR_IMAGE_STORAGE = frozenset({MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage})
_PIXEL_TAGS = (Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))
_SOP_CLASS, _SOP_INSTANCE = Tag(0x0008, 0x0016), Tag(0x0008, 0x0018)
_STUDY, _SERIES = Tag(0x0020, 0x000D), Tag(0x0020, 0x000E)
_PATIENT_ID = Tag(0x0010, 0x0020)
DEFER_BYTES = 64 * 1024  # values longer than this (pixel data) are not read while checking
MAX_GROUPS_BYTES = 64 * 2**20  # longer functional groups are refused, not read (_check_deferred_sequences)
_FUNCTIONAL_GROUPS = (Tag(0x5200, 0x9229), Tag(0x5200, 0x9230))  # shared, per-frame
_PATIENT_KEY = secrets.token_bytes(16)  # per process: a digest means nothing outside it


class InstanceRefusedError(Exception):
    """An instance the node will not store; carries the DIMSE status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InstanceInfo:
    """What the node needs to know about a received instance (no patient data)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frames: int
    images_in_acquisition: int | None
    transfer_syntax: str
    patient_key: str = ""  # a keyed digest of the PatientID (see patient_key), to compare instances by
    discard: str = ""  # why the instance is acknowledged but not kept ("" : keep it)


def patient_key(patient_id: str) -> str:
    """A digest of a PatientID, keyed per process: equal IDs give equal keys, and the ID is not kept."""
    return hashlib.blake2b(patient_id.encode(), key=_PATIENT_KEY, digest_size=16).hexdigest()


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element (the File Meta Information encoding, PS3.10 7.1)."""
    tag = struct.pack("<HH", group_elem >> 16, group_elem & 0xFFFF)
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return tag + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information of a received instance (PS3.10 7.1).

    Written by hand because it runs for every instance: the same elements as pynetdicom's
    ``create_file_meta`` plus the Source Application Entity Title (the calling AE).
    """
    body = b"".join((
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(sop_class_uid, b"\0")),
        _element(0x00020003, b"UI", _padded(sop_instance_uid, b"\0")),
        _element(0x00020010, b"UI", _padded(transfer_syntax, b"\0")),
        _element(0x00020012, b"UI", _padded(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _element(0x00020013, b"SH", _padded(pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _element(0x00020016, b"AE", _padded(source_ae_title.strip() or "UNKNOWN", b" ")),
    ))
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<L", len(body))) + body


def _text(ds: Dataset, tag: Any) -> str:
    """The value of a text element without converting (and validating) it; '' if absent."""
    if tag not in ds:
        return ""
    value = ds.get_item(tag).value
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").rstrip("\x00 ")
    return str(value or "").rstrip("\x00 ")


def _int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def _raw(ds: Dataset, tag: Any) -> Any:
    """The element as read, without reading a deferred value from the file."""
    return ds.get_item(tag, keep_deferred=True)


def _check_complete(ds: Dataset, file_size: int) -> None:
    """A truncated stream leaves its last element shorter than its declared length (a deferred value: its
    declared end lies past the end of the file)."""
    for tag in list(ds.keys()):
        raw = _raw(ds, tag)
        length = getattr(raw, "length", None)
        if length in (None, 0xFFFFFFFF):
            continue
        value = getattr(raw, "value", None)
        available = len(value) if isinstance(value, bytes) else None
        if value is None and getattr(raw, "value_tell", None) is not None:
            available = max(0, min(length, file_size - raw.value_tell))
        if available is not None and available != length:
            raise InstanceRefusedError(CANNOT_UNDERSTAND, f"data set truncated in {Tag(tag)}: {available} of "
                                                          f"{length} bytes")


def _check_deferred_sequences(ds: Dataset) -> None:
    """The functional groups are read from the file when the MPRAGE rules look into them (pydicom defers a sequence
    longer than ``DEFER_BYTES``), whole, and copied once more while parsed: refuse groups that would cost more than
    ``MAX_GROUPS_BYTES`` (those of 10,000 frames take about 20 MB)."""
    for tag in _FUNCTIONAL_GROUPS:
        raw = _raw(ds, tag) if tag in ds else None
        length = getattr(raw, "length", 0) or 0
        if raw is not None and getattr(raw, "value", b"") is None and MAX_GROUPS_BYTES < length != 0xFFFFFFFF:
            raise InstanceRefusedError(OUT_OF_RESOURCES, f"functional groups {tag} of {length / 2**20:.0f} MB exceed "
                                                         f"{MAX_GROUPS_BYTES // 2**20} MB")


def _check_pixels(ds: Dataset, encapsulated: bool, path: Path) -> int:
    """Check the pixel data is present and whole (``path``: the file ``ds`` was read from, where a deferred value
    lies); return the number of frames."""
    frames = _int(ds, "NumberOfFrames", 1) or 1
    tag = next((t for t in _PIXEL_TAGS if t in ds), None)
    if tag is None:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "no pixel data")
    raw = _raw(ds, tag)
    value = raw.value
    size = len(value) if isinstance(value, bytes) else (raw.length if value is None else 0)
    if not size:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "empty pixel data")
    if encapsulated:
        try:
            if isinstance(value, bytes):  # read with the header (short); the delimiter is not part of it
                n = count_fragments(io.BytesIO(value), len(value), delimited=False)
            elif value is None and raw.length == 0xFFFFFFFF and getattr(raw, "value_tell", None) is not None:
                with open(path, "rb") as fp:  # deferred: still in the file
                    fp.seek(raw.value_tell)
                    n = count_fragments(fp, os.fstat(fp.fileno()).st_size, delimited=True)
            else:
                raise ValueError("encapsulated pixel data must have an undefined length")
        except (ValueError, OSError) as exc:
            raise InstanceRefusedError(CANNOT_UNDERSTAND, f"broken encapsulated pixel data: {exc}") from exc
        if n == 0:
            raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "encapsulated pixel data without fragments")
        return frames
    rows, columns = _int(ds, "Rows", 0) or 0, _int(ds, "Columns", 0) or 0
    bits = _int(ds, "BitsAllocated", 0) or 0
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    if not (rows and columns and bits):
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "Rows, Columns or BitsAllocated absent")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if size < expected:
        raise InstanceRefusedError(CANNOT_UNDERSTAND, f"pixel data truncated: {size} of {expected} bytes")
    return frames


def _check_image_size(ds: Dataset, limits: IngressSection) -> None:
    """Refuse a header that claims more pixels than ``ingress.max_pixels`` (before pixel data is decoded)."""
    pixels = 1
    for keyword, default in (("Rows", 0), ("Columns", 0), ("NumberOfFrames", 1), ("SamplesPerPixel", 1)):
        pixels *= max(_int(ds, keyword, default) or default, 1 if default else 0)
    if pixels > limits.max_pixels:
        raise InstanceRefusedError(OUT_OF_RESOURCES, f"image of {pixels:,} pixels (Rows x Columns x frames x "
                                                     f"samples) exceeds ingress.max_pixels {limits.max_pixels:,}")


def _why_discard(ds: Dataset, sop_class: str, limits: IngressSection, rules: MprageSection | None) -> str:
    if sop_class not in MR_IMAGE_STORAGE:
        return "" if limits.keep_non_mr else "not an MR image"
    if rules is None or limits.keep_non_candidates:
        return ""
    from dicom_node.node.series_rules import classify  # it reads MR_IMAGE_STORAGE from here

    decision = classify(ds, rules)
    return "" if decision.accepted else f"not an MPRAGE candidate: {decision.reason}"


def _check_header_elements(path: Path, offset: int, size: int, transfer_syntax: UID, limit: int) -> None:
    """Refuse a data set (``offset`` to ``size`` in the file) of more elements and items than
    ``ingress.max_header_elements`` before pydicom builds it."""
    if (size - offset) // MIN_ELEMENT_BYTES <= limit:
        return  # too short to hold more (most single-frame images): nothing to walk
    with open(path, "rb") as fp:
        fp.seek(offset)
        try:
            count_elements(fp, size, implicit_vr=transfer_syntax.is_implicit_VR,
                           little_endian=transfer_syntax.is_little_endian, limit=limit)
        except HeaderTooLargeError as exc:  # the limit first: a response's Error Comment keeps 64 characters
            raise InstanceRefusedError(OUT_OF_RESOURCES, f"header exceeds ingress.max_header_elements {limit:,} "
                                                         "(elements and sequence items)") from exc


def _read_data_set(path: Path, offset: int, transfer_syntax: UID) -> Dataset:
    """The data set that starts at ``offset`` in the file, values longer than ``DEFER_BYTES`` left unread until
    used (without parsing the File Meta Information again: it is ours)."""
    with open(path, "rb") as fp:
        fp.seek(offset)
        ds = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, defer_size=DEFER_BYTES)
    # named by its file, so that a deferred value can be read on access (a long sequence: the functional groups of
    # an Enhanced MR image of 100 frames or more)
    return FileDataset(str(path), ds, is_implicit_VR=transfer_syntax.is_implicit_VR,
                       is_little_endian=transfer_syntax.is_little_endian)


def inspect_instance(event: Event, path: Path, data_offset: int, limits: IngressSection | None = None,
                     rules: MprageSection | None = None) -> InstanceInfo:
    """Check a C-STORE request whose data set was received into the DICOM file ``path`` (starting at
    ``data_offset``; its size was bounded while it arrived, see ``streamed_receive``);
    :class:`InstanceRefusedError` says why it is refused.

    ``limits`` (default: the ``[ingress]`` defaults) bound the instance; with ``rules``, an MR instance the
    MPRAGE rules refuse by its own header is marked for discarding (unless ``keep_non_candidates``)."""
    limits = limits or IngressSection()
    request = cast(C_STORE, event.request)
    try:
        command_sop = require_uid(request.AffectedSOPInstanceUID, "Affected SOP Instance UID")
        command_class = require_uid(request.AffectedSOPClassUID, "Affected SOP Class UID")
    except InvalidUIDError as exc:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    transfer_syntax = UID(event.context.transfer_syntax)
    file_size = os.path.getsize(path)
    _check_header_elements(path, data_offset, file_size, transfer_syntax, limits.max_header_elements)
    try:
        ds = _read_data_set(path, data_offset, transfer_syntax)
    except Exception as exc:  # pydicom raises many types for garbage
        raise InstanceRefusedError(CANNOT_UNDERSTAND, f"undecodable data set ({type(exc).__name__})") from exc
    if not len(ds):  # pydicom gives up on a value cut short before its delimiter and returns nothing
        raise InstanceRefusedError(CANNOT_UNDERSTAND, "no element could be read (a value ends without its delimiter: "
                                                      "truncated)")
    _check_complete(ds, file_size)
    _check_deferred_sequences(ds)
    try:
        return _checked_info(ds, command_sop, command_class, transfer_syntax, limits, rules, path)
    except InstanceRefusedError:
        raise
    except Exception as exc:  # a value pydicom cannot decode (unknown VR, bad number...), read lazily here
        raise InstanceRefusedError(CANNOT_UNDERSTAND, f"undecodable header value ({type(exc).__name__})") from exc


def _checked_info(ds: Dataset, command_sop: str, command_class: str, transfer_syntax: UID, limits: IngressSection,
                  rules: MprageSection | None, path: Path) -> InstanceInfo:
    meta = [Tag(t) for t in list(ds.keys()) if Tag(t).group == 0x0002]
    if meta:  # File Meta Information belongs to the file; inside the data set it would override ours on reading
        raise InstanceRefusedError(CANNOT_UNDERSTAND, f"File Meta Information element {meta[0]} in the data set")
    try:
        sop = require_uid(_text(ds, _SOP_INSTANCE), "SOPInstanceUID")
        sop_class = require_uid(_text(ds, _SOP_CLASS), "SOPClassUID")
        study = require_uid(_text(ds, _STUDY), "StudyInstanceUID")
        series = require_uid(_text(ds, _SERIES), "SeriesInstanceUID")
    except InvalidUIDError as exc:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    if sop != command_sop:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPInstanceUID differs from the command's")
    if sop_class != command_class:
        raise InstanceRefusedError(DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "SOPClassUID differs from the command's")
    _check_image_size(ds, limits)
    discard = _why_discard(ds, sop_class, limits, rules)
    keep_mr = sop_class in MR_IMAGE_STORAGE and not discard
    frames = _check_pixels(ds, transfer_syntax.is_encapsulated, path) if keep_mr else 1
    return InstanceInfo(sop, sop_class, study, series, frames, _int(ds, "ImagesInAcquisition", None),
                        str(transfer_syntax), patient_key(_text(ds, _PATIENT_ID)), discard)


def read_instance_info(path: Path) -> InstanceInfo:
    """The :class:`InstanceInfo` of a spooled file (headers only)."""
    ds = dcmread(path, stop_before_pixels=True)
    frames = _int(ds, "NumberOfFrames", 1) or 1
    return InstanceInfo(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                        str(ds.SeriesInstanceUID), frames, _int(ds, "ImagesInAcquisition", None),
                        str(ds.file_meta.get("TransferSyntaxUID", "")), patient_key(_text(ds, _PATIENT_ID)))


def complete_file_uids(path: Path) -> tuple[str, str] | None:
    """(SeriesInstanceUID, SOPInstanceUID) of a whole DICOM file (pixel data complete for MR images); None for
    a partial write or anything unreadable."""
    try:
        ds = dcmread(path, defer_size=DEFER_BYTES)
        _check_complete(ds, os.path.getsize(path))
        if str(ds.get("SOPClassUID", "")) in MR_IMAGE_STORAGE:
            _check_pixels(ds, UID(ds.file_meta.TransferSyntaxUID).is_encapsulated, path)
        return (require_uid(_text(ds, _SERIES), "SeriesInstanceUID"),
                require_uid(_text(ds, _SOP_INSTANCE), "SOPInstanceUID"))
    except Exception:  # unreadable or cut short: a partial write
        return None
