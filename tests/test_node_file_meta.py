"""The hand-written File Meta Information of spooled instances reads back as pydicom writes it."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pynetdicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage

from dicom_node.node.instances import file_meta_bytes


def test_file_meta_matches_the_standard_layout() -> None:
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.3.45"  # odd length: padded with NUL
    ds.PatientID = "X"
    body = BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True)  # dataset only, no meta
    for ts in (ExplicitVRLittleEndian, JPEGLSLossless):
        raw = file_meta_bytes(MRImageStorage, "1.2.3.45", ts, "MODALITY1 ")
        assert raw[:132] == b"\0" * 128 + b"DICM"
        read = pydicom.dcmread(BytesIO(raw + body.getvalue()), stop_before_pixels=True)
        meta = read.file_meta
        assert meta.MediaStorageSOPClassUID == MRImageStorage
        assert meta.MediaStorageSOPInstanceUID == "1.2.3.45"
        assert meta.TransferSyntaxUID == ts
        assert meta.ImplementationClassUID == pynetdicom.PYNETDICOM_IMPLEMENTATION_UID
        assert meta.ImplementationVersionName == pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION
        assert meta.SourceApplicationEntityTitle == "MODALITY1"
        assert meta.FileMetaInformationVersion == b"\x00\x01"
        assert meta.FileMetaInformationGroupLength == len(raw) - 132 - 12
        assert read.PatientID == "X"
