"""MPRAGE recognition: vendor defaults, enhanced objects, and a reason for every series that is ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from node_support import mr_datasets
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_node.config import MprageSection
from dicom_node.dimse.status import OUT_OF_RESOURCES
from dicom_node.node import instances
from dicom_node.node.instances import DEFER_BYTES, InstanceRefusedError, _check_deferred_sequences, _read_data_set
from dicom_node.node.series_rules import classify

RULES = MprageSection()


def header(**attrs: object) -> Dataset:
    ds = mr_datasets(1, 8)[0]
    for name in ("InversionTime", "ScanningSequence", "SequenceName", "ProtocolName"):
        if name in ds:
            delattr(ds, name)
    for name, value in attrs.items():
        setattr(ds, name, value)
    return ds


def test_siemens_mprage() -> None:
    d = classify(mr_datasets(1, 8)[0], RULES)
    assert d.accepted, d.reason
    assert d.reason == ("MPRAGE-like: 3D gradient echo, inversion-prepared (ScanningSequence IR, InversionTime), "
                        "name matches 'mp.?rage'")


def test_ge_bravo() -> None:
    ds = header(SeriesDescription="Sag BRAVO", ScanningSequence=["GR"], MRAcquisitionType="3D",
                InversionTime="450", Manufacturer="GE MEDICAL SYSTEMS", SequenceName="efgre3d")
    d = classify(ds, RULES)
    assert d.accepted, d.reason
    assert "InversionTime" in d.reason and "bravo" in d.reason


def test_philips_t1_tfe_without_inversion_headers_is_recognised_by_name() -> None:
    ds = header(SeriesDescription="T1W_3D_TFE", ScanningSequence="GR", MRAcquisitionType="3D",
                Manufacturer="Philips")
    d = classify(ds, RULES)
    assert d.accepted, d.reason
    assert "inversion-prepared (name pattern" in d.reason
    strict = classify(ds, RULES.model_copy(update={"inversion_implied_by_name": False}))
    assert not strict.accepted
    assert strict.reason.startswith("not inversion-prepared (no IR in ScanningSequence")


@pytest.mark.parametrize(("attrs", "reason"), [
    ({"MRAcquisitionType": "2D", "ScanningSequence": "SE", "SeriesDescription": "t2_tse_tra"},
     "not a 3D acquisition (MRAcquisitionType 2D)"),
    ({"MRAcquisitionType": "3D", "ScanningSequence": "SE", "SeriesDescription": "t2_space_sag"},
     "not gradient echo (ScanningSequence SE)"),
    ({"MRAcquisitionType": "3D", "ScanningSequence": "GR", "SeriesDescription": "t1_fl3d_sag"},
     "not inversion-prepared (no IR in ScanningSequence, no InversionTime, no InversionRecovery; "
     "SeriesDescription 't1_fl3d_sag')"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "SeriesDescription": "AAHead_Scout"},
     "image type LOCALIZER is excluded"),
    ({"ImageType": ["DERIVED", "PRIMARY", "MPR"], "SeriesDescription": "t1_mprage_tra_MPR"},
     "image type DERIVED is excluded"),
    ({"SeriesDescription": "t1_mprage_sag MPR cor", "MRAcquisitionType": "3D"},
     r"SeriesDescription 't1_mprage_sag MPR cor' matches exclude pattern '\bmpr\b|reformat|_mpr_|\bmip\b'"),
    ({"SOPClassUID": CTImageStorage, "Modality": "CT"}, "not an MR image (SOP class CT Image Storage)"),
])
def test_other_series_are_ignored_with_the_reason(attrs: dict[str, object], reason: str) -> None:
    d = classify(header(**attrs), RULES)
    assert not d.accepted
    assert d.reason == reason


def test_require_name_match() -> None:
    ds = header(SeriesDescription="3D T1 sagittal", ScanningSequence=["GR", "IR"], MRAcquisitionType="3D")
    assert classify(ds, RULES).accepted
    d = classify(ds, RULES.model_copy(update={"require_name_match": True}))
    assert not d.accepted
    assert d.reason == "no name matches the MPRAGE patterns (SeriesDescription '3D T1 sagittal')"


def test_legacy_converted_enhanced_mr_is_read_through_functional_groups() -> None:
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    frames = mr_datasets(4, 16)
    mf = LegacyConvertedEnhancedMRImage(frames, series_instance_uid=frames[0].SeriesInstanceUID, series_number=3,
                                        sop_instance_uid=generate_uid(), instance_number=1)
    d = classify(mf, RULES)
    assert d.accepted, d.reason


def test_enhanced_mr_attributes_in_nested_functional_groups() -> None:
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SeriesDescription = "Sag 3D T1"
    ds.MRAcquisitionType = "3D"
    ds.PulseSequenceName = "IR_GR3D"
    ds.EchoPulseSequence = "GRADIENT"
    modifier = Dataset()
    modifier.InversionRecovery = "YES"
    shared = Dataset()
    shared.MRModifierSequence = [modifier]
    ds.SharedFunctionalGroupsSequence = [shared]
    d = classify(ds, RULES)
    assert d.accepted, d.reason
    assert "InversionRecovery YES" in d.reason


def enhanced_mprage_with_per_frame_inversion(path: Path, frames: int) -> Path:
    """An Enhanced MR MPRAGE whose inversion is stated only per frame, its data set alone written to ``path``."""
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.SeriesDescription = "Sag 3D T1"
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    groups = []
    for i in range(frames):
        frame = Dataset()
        modifier = Dataset()
        modifier.InversionRecovery = "YES"
        frame.MRModifierSequence = [modifier]
        content = Dataset()
        content.FrameAcquisitionDateTime = "20261206120000.000000"
        content.InStackPositionNumber = i + 1
        content.StackID = "1"
        frame.FrameContentSequence = [content]
        groups.append(frame)
    ds.PerFrameFunctionalGroupsSequence = groups
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    write_dataset(out, ds)
    path.write_bytes(out.getvalue())
    return path


def test_per_frame_groups_longer_than_the_ingress_read_are_read_from_the_file(tmp_path: Path) -> None:
    # 800 frames of per-frame groups (defined length) pass the 64 KiB that ingress reads at once: they are read from
    # the file when the rules look (until 2026-12-06 they read as absent, and this MPRAGE was discarded)
    path = enhanced_mprage_with_per_frame_inversion(tmp_path / "enhanced.bin", 800)
    assert path.stat().st_size > DEFER_BYTES
    read = _read_data_set(path, 0, ExplicitVRLittleEndian)
    d = classify(read, RULES)
    assert d.accepted, d.reason
    assert "InversionRecovery YES" in d.reason


def test_functional_groups_too_long_to_read_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # read on access, the groups cost twice their size: over instances.MAX_GROUPS_BYTES (64 MB) they are refused
    path = enhanced_mprage_with_per_frame_inversion(tmp_path / "enhanced.bin", 800)
    read = _read_data_set(path, 0, ExplicitVRLittleEndian)
    _check_deferred_sequences(read)  # 67 KB: under the limit
    monkeypatch.setattr(instances, "MAX_GROUPS_BYTES", 32 * 1024)
    with pytest.raises(InstanceRefusedError, match=r"functional groups \(5200,9230\) of 0 MB exceed 0 MB") as err:
        _check_deferred_sequences(read)
    assert err.value.status == OUT_OF_RESOURCES
