"""The simulated MPRAGE as a DICOM series, in the styles scanners send.

- ``classic``: one MR Image Storage file per slice, uncompressed, with Siemens-like or GE-like
  public headers (no private tags).
- ``enhanced``: one multi-frame file, built from the classic slices by highdicom's Legacy Converted
  Enhanced MR Image (SOP class 1.2.840.10008.5.1.4.1.1.4.4; shared and per-frame functional groups
  carry the geometry). The references to the (never sent) single-frame sources are removed and the
  vendor series description is kept. A full Enhanced MR Image (1.2.840.10008.5.1.4.1.1.4, with the MR
  functional groups) is not written.
- ``compressed``: the classic files with JPEG-LS lossless pixel data (pydicom + pyjpegls; pydicom has
  no JPEG 2000 encoder without pylibjpeg-openjpeg).

Geometry is LPS: ImageOrientationPatient is the grid's first two LPS axes, ImagePositionPatient the
LPS centre of the first voxel of each slice, PixelSpacing (row spacing, column spacing).
UIDs come from ``generate_uid`` with deterministic entropy, so one seed gives identical files.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, generate_uid

from training.phantom.geometry import VolumeGrid
from training.phantom.mprage import MAX_PIXEL_VALUE, MprageProtocol
from training.phantom.styles import DicomStyle, Vendor

IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")  # pydicom's root, as generate_uid uses


@dataclass(frozen=True)
class VendorHeader:
    manufacturer: str
    model: str
    software: str
    series_description: str
    sequence_name: str
    image_type: tuple[str, ...]
    imaging_frequency_mhz: float
    receive_coil: str
    study_description: str


VENDOR_HEADERS = {
    Vendor.SIEMENS: VendorHeader("SIEMENS", "Prisma", "syngo MR XA30", "t1_mprage_sag_p2_iso",
                                 "*tfl3d1_16ns", ("ORIGINAL", "PRIMARY", "M", "ND", "NORM"), 123.25,
                                 "HeadNeck_64", "Neuro^Brain"),
    Vendor.GE: VendorHeader("GE MEDICAL SYSTEMS", "SIGNA Premier", "MR30.1_R01", "Sag 3D MPRAGE",
                            "mprage", ("ORIGINAL", "PRIMARY", "OTHER"), 127.74, "48HN", "BRAIN"),
    Vendor.PHILIPS: VendorHeader("Philips Medical Systems", "Ingenia", "5.7.1", "sT1W_3D_TFE",
                                 "T1TFE", ("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"), 127.77, "dS Head 32ch",
                                 "Brain"),
}
GE_IR_FSPGR = ("Sag 3D BRAVO", "efgre3d")
"""Series description and sequence name GE writes for its IR-prepared fast SPGR (BRAVO)."""



@dataclass(frozen=True)
class SeriesIdentity:
    """Patient, study and series identity of one synthetic subject."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_datetime: datetime.datetime
    accession: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    uid_entropy: str
    series_number: int = 3

    def instance_uid(self, number: int) -> str:
        return str(generate_uid(entropy_srcs=[self.uid_entropy, "sop", str(number)]))


def make_identity(subject_id: str, uid_entropy: str, rng: np.random.Generator) -> SeriesIdentity:
    """Synthetic identity: ``PHANTOM^<SUBJECT_ID>``, age 20 to 70, a study date in 2024."""
    study = datetime.datetime(2024, 1, 8, 8, 0) + datetime.timedelta(
        days=int(rng.integers(0, 350)), minutes=int(rng.integers(0, 600)))
    birth = study.date() - datetime.timedelta(days=int(rng.integers(20 * 365, 70 * 365)))
    tag = subject_id.upper().replace("-", "")

    def uid(kind: str) -> str:
        return str(generate_uid(entropy_srcs=[uid_entropy, kind]))

    sex = str(rng.choice(["F", "M"]))
    return SeriesIdentity(f"PHANTOM^{tag}", f"SMRF{tag}", birth.strftime("%Y%m%d"), sex,
                          study, f"A{int(rng.integers(10**6, 10**7))}", uid("study"), uid("series"),
                          uid("frame-of-reference"), uid_entropy)


def _slice_geometry(grid: VolumeGrid) -> tuple[list[float], np.ndarray, np.ndarray]:
    lps = grid.lps_affine
    spacing = grid.spacing_mm
    orientation = np.concatenate([lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]])
    positions = (lps @ np.stack([np.zeros(grid.shape[2]), np.zeros(grid.shape[2]),
                                 np.arange(grid.shape[2]), np.ones(grid.shape[2])]))[:3].T
    normal = np.cross(orientation[:3], orientation[3:])
    return [round(float(v), 6) for v in orientation], positions, positions @ normal


def _ds(value: float) -> str:
    return f"{value:.6g}"


def classic_datasets(image: np.ndarray, grid: VolumeGrid, protocol: MprageProtocol, identity: SeriesIdentity,
                     vendor: Vendor) -> list[Dataset]:
    """One MR Image Storage dataset per slice of ``image`` (i, j, k) on ``grid``."""
    if image.shape != grid.shape or image.dtype != np.uint16:
        raise ValueError(f"image: expected uint16 of shape {grid.shape}, got {image.dtype} {image.shape}")
    head = VENDOR_HEADERS[Vendor(vendor)]
    family = protocol.family
    if family == "ir-fspgr":
        head = replace(head, series_description=GE_IR_FSPGR[0], sequence_name=GE_IR_FSPGR[1])
    orientation, positions, locations = _slice_geometry(grid)
    spacing = grid.spacing_mm
    when = identity.study_datetime
    series_time = when + datetime.timedelta(minutes=6)
    out = []
    for k in range(grid.shape[2]):
        ds = Dataset()
        number = k + 1
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(head.image_type)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = identity.instance_uid(number)
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time.strftime("%H%M%S")
        ds.AccessionNumber = identity.accession
        ds.Modality = "MR"
        ds.Manufacturer = head.manufacturer
        ds.InstitutionName = "SYNTHMRF PHANTOM SITE"
        ds.ReferringPhysicianName = ""
        ds.StationName = "PHANTOM3T"
        ds.StudyDescription = head.study_description
        ds.SeriesDescription = head.series_description
        ds.ManufacturerModelName = head.model
        ds.PatientName = identity.patient_name
        ds.PatientID = identity.patient_id
        ds.PatientBirthDate = identity.birth_date
        ds.PatientSex = identity.sex
        age_years = (when.date() - datetime.date.fromisoformat(
            f"{identity.birth_date[:4]}-{identity.birth_date[4:6]}-{identity.birth_date[6:]}")).days // 365
        ds.PatientAge = f"{age_years:03d}Y"
        ds.BodyPartExamined = "HEAD" if vendor is not Vendor.GE else "BRAIN"
        if family == "ir-fspgr":
            ds.ScanningSequence, ds.SequenceVariant = "GR", ["SS", "SK"]
            ds.ScanOptions = ["FAST_GEMS", "EDR_GEMS", "IR_GEMS"]
        elif family == "tfe":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", ["SK", "MP"], ""
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = ["GR", "IR"], ["SK", "SP", "MP"], "IR"
        ds.MRAcquisitionType = "3D"
        ds.SequenceName = head.sequence_name
        ds.AngioFlag = "N"
        ds.SliceThickness = _ds(spacing[2])
        ds.RepetitionTime = _ds(protocol.header_tr_ms)
        ds.EchoTime = _ds(protocol.te_ms)
        if not protocol.header_omits_ti:
            ds.InversionTime = _ds(protocol.header_ti_ms)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds(head.imaging_frequency_mhz * protocol.field_strength_t / 3.0)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(protocol.field_strength_t)
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.EchoTrainLength = "1"
        ds.PercentSampling = "100"
        ds.PercentPhaseFieldOfView = "100"
        ds.PixelBandwidth = "240"
        ds.SoftwareVersions = head.software
        ds.ProtocolName = head.series_description
        ds.ReceiveCoilName = head.receive_coil
        ds.TransmitCoilName = "Body"
        ds.AcquisitionMatrix = [0, grid.shape[1], grid.shape[0], 0]
        ds.InPlanePhaseEncodingDirection = "ROW"
        ds.FlipAngle = _ds(protocol.flip_angle_deg)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = identity.study_uid
        ds.SeriesInstanceUID = identity.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = identity.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = orientation
        ds.FrameOfReferenceUID = identity.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(locations[k]))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = grid.shape[1], grid.shape[0]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.WindowCenter, ds.WindowWidth = "700", "1600"
        ds.PixelData = np.ascontiguousarray(image[:, :, k].T).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        out.append(ds)
    return out


def write_mprage_series(image: np.ndarray, grid: VolumeGrid, out_dir: Path, *, protocol: MprageProtocol,
                        identity: SeriesIdentity, vendor: Vendor = Vendor.SIEMENS,
                        style: DicomStyle = DicomStyle.CLASSIC) -> list[Path]:
    """Write the series into ``out_dir`` (created) and return the file paths."""
    if int(image.max(initial=0)) > MAX_PIXEL_VALUE:
        raise ValueError(f"image: values must fit 12 bits, got maximum {int(image.max())}")
    style = DicomStyle(style)
    out_dir.mkdir(parents=True, exist_ok=True)
    slices = classic_datasets(image, grid, protocol, identity, Vendor(vendor))
    if style is DicomStyle.ENHANCED:
        from highdicom.legacy import LegacyConvertedEnhancedMRImage

        frame = LegacyConvertedEnhancedMRImage(
            slices, series_instance_uid=identity.series_uid, series_number=identity.series_number,
            sop_instance_uid=identity.instance_uid(0), instance_number=1)
        del frame.ReferencedSeriesSequence  # the single-frame sources are never sent
        frame.SeriesDescription = slices[0].SeriesDescription
        frame.InstanceCreationDate, frame.InstanceCreationTime = slices[0].ContentDate, slices[0].ContentTime
        path = out_dir / "MR000001.dcm"
        frame.save_as(path, enforce_file_format=True)
        return [path]
    paths = []
    for ds in slices:
        if style is DicomStyle.COMPRESSED:
            ds.compress(JPEGLSLossless)
        path = out_dir / f"MR{int(ds.InstanceNumber):06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
