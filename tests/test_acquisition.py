"""Reading the acquisition protocol from vendor headers, BIDS sidecars and overrides; the trained-range check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pipeline.acquisition import (
    ProtocolError,
    protocol_from_dicom,
    protocol_from_sidecar,
    protocol_with_overrides,
    sidecar_for,
)
from pipeline.protocol import (
    FAMILY_DEFAULTS,
    PAPER_PROTOCOL,
    AcquisitionProtocol,
    Family,
    out_of_range,
    protocol_ranges,
)


def _header(**values: object) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.MRAcquisitionType = "3D"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def siemens_mprage() -> Dataset:
    return _header(Manufacturer="SIEMENS", SequenceName="*tfl3d1_16ns", ScanningSequence=["GR", "IR"],
                   SequenceVariant=["SK", "SP", "MP"], ScanOptions="IR", RepetitionTime="2300", InversionTime="900",
                   EchoTime="2.98", FlipAngle="9", MagneticFieldStrength="3", ImagingFrequency="123.25")


def test_siemens_mprage_repetition_time_is_the_shot_interval() -> None:
    p = protocol_from_dicom(siemens_mprage())
    spacing = FAMILY_DEFAULTS[Family.MPRAGE]["echo_spacing_ms"]
    assert p == AcquisitionProtocol(Family.MPRAGE, 3.0, 900.0, 2300.0, spacing, 9.0, 2.98, "SIEMENS",
                                    ("echo_spacing_ms",))


def test_ge_bravo_repetition_time_is_the_echo_spacing() -> None:
    ds = _header(Manufacturer="GE MEDICAL SYSTEMS", SequenceName="efgre3d", SeriesDescription="Sag 3D BRAVO",
                 ScanningSequence="GR", SequenceVariant=["SS", "SK"], ScanOptions=["FAST_GEMS", "EDR_GEMS", "IR_GEMS"],
                 RepetitionTime="8.1", InversionTime="450", EchoTime="3.2", FlipAngle="12", MagneticFieldStrength="3")
    p = protocol_from_dicom(ds)
    assert (p.family, p.field_strength_t, p.echo_spacing_ms, p.ti_ms, p.flip_angle_deg, p.te_ms) == (
        Family.IR_FSPGR, 3.0, 8.1, 450.0, 12.0, 3.2)
    assert p.shot_interval_ms == FAMILY_DEFAULTS[Family.IR_FSPGR]["shot_interval_ms"]
    assert p.assumed == ("shot_interval_ms",)
    # The scan option alone names the family too (a site that called its BRAVO something else).
    ds.SequenceName, ds.SeriesDescription = "fgre3d", "SAG T1 3D"
    assert protocol_from_dicom(ds).family is Family.IR_FSPGR


def test_philips_tfe_without_inversion_time_assumes_it() -> None:
    ds = _header(Manufacturer="Philips Medical Systems", SequenceName="T1TFE", ProtocolName="sT1W_3D_TFE",
                 ScanningSequence="GR", SequenceVariant=["SK", "MP"], RepetitionTime="8.1", EchoTime="3.7",
                 FlipAngle="8", MagneticFieldStrength="3")
    p = protocol_from_dicom(ds)
    defaults = FAMILY_DEFAULTS[Family.TFE]
    assert (p.family, p.echo_spacing_ms, p.te_ms, p.flip_angle_deg) == (Family.TFE, 8.1, 3.7, 8.0)
    assert (p.ti_ms, p.shot_interval_ms) == (defaults["ti_ms"], defaults["shot_interval_ms"])
    assert p.assumed == ("shot_interval_ms", "ti_ms")


def test_field_strength_from_the_imaging_frequency() -> None:
    ds = _header(Manufacturer="SIEMENS", SequenceName="*tfl3d1_16ns", ScanningSequence=["GR", "IR"],
                 RepetitionTime="2400", InversionTime="1000", FlipAngle="8", EchoTime="3.5", ImagingFrequency="63.6")
    p = protocol_from_dicom(ds)
    assert (p.family, p.field_strength_t, p.shot_interval_ms, p.ti_ms) == (Family.MPRAGE, 1.5, 2400.0, 1000.0)
    assert "field_strength_t" not in p.assumed
    del ds.ImagingFrequency
    assert protocol_from_dicom(ds).field_strength_t == 3.0
    assert "field_strength_t" in protocol_from_dicom(ds).assumed


def test_enhanced_mr_functional_groups() -> None:
    timing, echo, modifier = Dataset(), Dataset(), Dataset()
    timing.RepetitionTime, timing.FlipAngle = 2300.0, 9.0
    echo.EffectiveEchoTime = 2.9
    modifier.InversionRecovery, modifier.InversionTimes = "YES", [900.0]
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = [timing]
    shared.MREchoSequence = [echo]
    shared.MRModifierSequence = [modifier]
    ds = _header(Manufacturer="SIEMENS", PulseSequenceName="tfl3d1", MagneticFieldStrength=3.0,
                 SharedFunctionalGroupsSequence=[shared])
    p = protocol_from_dicom(ds)
    assert (p.family, p.shot_interval_ms, p.ti_ms, p.te_ms, p.flip_angle_deg) == (Family.MPRAGE, 2300.0, 900.0, 2.9,
                                                                                  9.0)
    assert p.assumed == ("echo_spacing_ms",)


def test_no_inversion_at_all_is_an_assumed_mprage(caplog: pytest.LogCaptureFixture) -> None:
    ds = _header(Manufacturer="ACME", ScanningSequence="GR", SequenceVariant="SP", RepetitionTime="7.5",
                 EchoTime="3", FlipAngle="10", MagneticFieldStrength="3")
    p = protocol_from_dicom(ds)
    assert (p.family, p.echo_spacing_ms) == (Family.MPRAGE, 7.5)
    assert set(p.assumed) == {"shot_interval_ms", "ti_ms", "family"}
    assert "no inversion" in caplog.text


@pytest.mark.parametrize(("change", "message"), [
    ({"RepetitionTime": "120"}, "RepetitionTime 120 ms is neither an echo spacing"),
    ({"InversionTime": "2500"}, "InversionTime 2500 ms is not shorter than the shot interval 2300"),
    ({"FlipAngle": "120"}, "flip angle 120"),
    ({"EchoTime": "-2"}, "EchoTime '-2' is impossible"),
    ({"FlipAngle": RawDataElement(Tag(0x00181314), "DS", 4, b"nine", 0, True, True)},
     "FlipAngle 'nine' is not a number"),
])
def test_impossible_headers_are_refused(change: dict[str, object], message: str) -> None:
    ds = siemens_mprage()
    for keyword, value in change.items():
        if isinstance(value, RawDataElement):
            ds[value.tag] = value  # type: ignore[assignment]  # as read from a file: converted on access
        else:
            setattr(ds, keyword, value)
    with pytest.raises(ProtocolError, match=message):
        protocol_from_dicom(ds)


def test_sidecar_in_seconds(tmp_path: Path) -> None:
    nifti = tmp_path / "sub-01_T1w.nii.gz"
    nifti.touch()
    assert sidecar_for(nifti) is None
    doc = {"Manufacturer": "GE", "MagneticFieldStrength": 3, "RepetitionTime": 0.0081, "InversionTime": 0.45,
           "EchoTime": 0.0032, "FlipAngle": 12, "SequenceName": "efgre3d", "ScanningSequence": "GR",
           "SequenceVariant": "SS_SK", "ScanOptions": "FAST_GEMS\\EDR_GEMS\\IR_GEMS"}
    (tmp_path / "sub-01_T1w.json").write_text(json.dumps(doc))
    sidecar = sidecar_for(nifti)
    assert sidecar == tmp_path / "sub-01_T1w.json"
    assert sidecar_for(tmp_path / "sub-01_T1w.nii") == sidecar
    p = protocol_from_sidecar(sidecar)
    assert (p.family, p.echo_spacing_ms, p.ti_ms, p.te_ms, p.flip_angle_deg) == (Family.IR_FSPGR, 8.1, 450.0, 3.2, 12.0)
    assert p.assumed == ("shot_interval_ms",)

    doc = {"Manufacturer": "Siemens", "ImagingFrequency": 63.68, "RepetitionTime": 2.4, "InversionTime": 1.0,
           "EchoTime": 0.0035, "FlipAngle": 8, "SequenceName": "*tfl3d1_16ns", "ScanningSequence": "GR_IR",
           "SequenceVariant": "SK_SP_MP", "PulseSequenceDetails": "%SiemensSeq%\\tfl"}
    sidecar.write_text(json.dumps(doc))
    p = protocol_from_sidecar(sidecar)
    assert (p.family, p.field_strength_t, p.shot_interval_ms, p.ti_ms, p.te_ms) == (Family.MPRAGE, 1.5, 2400.0,
                                                                                    1000.0, 3.5)
    sidecar.write_text(json.dumps({**doc, "RepetitionTime": 2400}))
    with pytest.raises(ProtocolError, match="seconds, not milliseconds"):
        protocol_from_sidecar(sidecar)
    sidecar.write_text("{not json")
    with pytest.raises(ProtocolError, match="unreadable sidecar"):
        protocol_from_sidecar(sidecar)


def test_overrides() -> None:
    bare = protocol_with_overrides(None)
    assert bare.family is Family.MPRAGE and bare.field_strength_t == 3.0
    assert set(bare.assumed) == {"family", "field_strength_t", *FAMILY_DEFAULTS[Family.MPRAGE]}

    given = protocol_with_overrides(None, family="tfe", field_strength_t=1.5, ti_ms=1000, echo_spacing_ms=None)
    assert (given.family, given.field_strength_t, given.ti_ms) == (Family.TFE, 1.5, 1000.0)
    assert given.shot_interval_ms == FAMILY_DEFAULTS[Family.TFE]["shot_interval_ms"]
    assert set(given.assumed) == {"shot_interval_ms", "echo_spacing_ms", "flip_angle_deg", "te_ms"}

    # A GE series with the shot interval from the protocol sheet.
    ge = protocol_with_overrides(AcquisitionProtocol(Family.IR_FSPGR, 3.0, 450.0, 2000.0, 8.1, 12.0, 3.2, "GE",
                                                     ("shot_interval_ms",)), shot_interval_ms=2200)
    assert ge.shot_interval_ms == 2200.0 and ge.assumed == ()
    # A family corrected by hand takes its own defaults for what the header did not say.
    tfe = protocol_with_overrides(ge, family=Family.TFE)
    assert tfe.family is Family.TFE and tfe.ti_ms == 450.0

    with pytest.raises(ProtocolError, match=r"shot interval 8\.1 ms"):
        protocol_with_overrides(ge, shot_interval_ms=8.1)
    with pytest.raises(ProtocolError, match="family 'flash'"):
        protocol_with_overrides(None, family="flash")
    with pytest.raises(TypeError, match="tr_ms"):
        protocol_with_overrides(None, tr_ms=2300)


def test_out_of_range_names_the_parameter() -> None:
    paper = protocol_ranges([PAPER_PROTOCOL])
    assert out_of_range(PAPER_PROTOCOL, paper) == []
    at_15 = protocol_from_dicom(_header(Manufacturer="GE MEDICAL SYSTEMS", SequenceName="mprage",
                                        RepetitionTime="2130", InversionTime="900", EchoTime="2.6", FlipAngle="8",
                                        MagneticFieldStrength="1.5"))
    reasons = out_of_range(at_15, paper)
    assert len(reasons) == 1 and reasons[0].startswith("MagneticFieldStrength 1.5 T")
    # An assumed field strength says nothing about the data: not judged.
    assert out_of_range(protocol_with_overrides(None, field_strength_t=None, shot_interval_ms=2130, flip_angle_deg=8,
                                                te_ms=2.6), paper) == []
    bravo = protocol_with_overrides(None, family="ir-fspgr", ti_ms=450)
    assert [r.split()[0] for r in out_of_range(bravo, paper)] == ["sequence", "ti_ms"]
    wider = protocol_ranges([PAPER_PROTOCOL, bravo, at_15])
    assert out_of_range(bravo, wider) == [] and out_of_range(at_15, wider) == []
