"""Encapsulated pixel data of a stored file is checked item by item, whether pydicom read it with the header
(64 KiB or less) or left it in the file: whole files pass, an item that claims more bytes than follow does not."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid

from dicom_node.node.instances import complete_file_uids


def compressed_file(path: Path, size: int) -> Path:
    """An MR image of noise (``size`` x ``size``, 12 bits) in JPEG 2000 lossless: one fragment."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(size).integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("size", [64, 256])  # fragment read with the header; fragment left in the file
def test_whole_fragments_pass_and_an_overlong_item_is_caught(tmp_path: Path, size: int) -> None:
    path = compressed_file(tmp_path / "whole.dcm", size)
    data = path.read_bytes()
    fragment = data.rindex(b"\xfe\xff\x00\xe0")  # the last item: the one fragment (the offset table is before it)
    (length,) = struct.unpack("<L", data[fragment + 4 : fragment + 8])
    assert (length > 64 * 1024) is (size == 256)
    assert complete_file_uids(path) is not None
    overlong = tmp_path / "overlong.dcm"
    overlong.write_bytes(data[: fragment + 4] + struct.pack("<L", length + 1000) + data[fragment + 8 :])
    assert complete_file_uids(overlong) is None
