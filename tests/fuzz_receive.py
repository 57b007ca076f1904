"""Coverage-guided fuzzing (atheris) of the path a received instance takes: the data set read from the received
file, the node's checks and MPRAGE rules, then the pipeline's header reading (series grid and geometry) and
the acquisition protocol. A refusal with a reason (InstanceRefusedError, SeriesRejected, ProtocolError) is
the expected outcome for bad input; any other exception is a crash.

Run: ``TMPDIR=<scratch> python tests/fuzz_receive.py -runs=20000`` (libFuzzer flags; ``-max_total_time=60``;
its series and corpus folders are made under TMPDIR and left there); the test
suite runs a short bounded run (``tests/test_node_fuzz.py``). The seed is one valid MPRAGE-like
instance; each input replaces its data set (one of a series of the fewest frames the pipeline takes).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import atheris

with atheris.instrument_imports(include=["dicom_node", "pipeline"]):  # coverage of our code only
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from dicom_node.config import IngressSection, MprageSection
    from dicom_node.node.instances import InstanceRefusedError, inspect_instance
    from pipeline.acquisition import ProtocolError, protocol_from_dicom
    from pipeline.dicom_series import MIN_FRAMES, SeriesRejected, read_series

sys.path.insert(0, str(Path(__file__).parent))
from node_support import mr_datasets

REFUSALS = (InstanceRefusedError, SeriesRejected, ProtocolError)
FOLDER = Path(tempfile.mkdtemp(prefix="fuzz-receive-"))
SERIES = mr_datasets(MIN_FRAMES, 8, patient_id="FUZZ")
for k, ds in enumerate(SERIES[1:], start=1):
    ds.save_as(FOLDER / f"{k}.dcm", enforce_file_format=True)
TARGET = FOLDER / "0.dcm"


def file_bytes(data: bytes) -> bytes:
    """The first instance's File Meta with ``data`` as its data set."""
    head = DicomBytesIO()
    write_file_meta_info(head, SERIES[0].file_meta)
    return b"\0" * 128 + b"DICM" + head.getvalue() + data


def seed() -> bytes:
    """The first instance's data set, encoded as it would arrive."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    SERIES[0].save_as(body, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return body.getvalue()


def test_one_input(data: bytes) -> None:
    raw = file_bytes(data)
    TARGET.write_bytes(raw)
    first = SERIES[0]
    event = SimpleNamespace(request=SimpleNamespace(AffectedSOPInstanceUID=first.SOPInstanceUID,
                                                    AffectedSOPClassUID=first.SOPClassUID),
                            context=SimpleNamespace(transfer_syntax=first.file_meta.TransferSyntaxUID))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            info = inspect_instance(event, TARGET, len(raw) - len(data),  # type: ignore[arg-type]
                                    IngressSection(), MprageSection())
            if info.discard:
                return
            series = read_series(FOLDER)
            assert series.grid.ras_affine.shape == (4, 4)
            protocol_from_dicom(series.header)
        except REFUSALS:
            return


def main() -> None:
    corpus = Path(tempfile.mkdtemp(prefix="fuzz-corpus-"))
    (corpus / "seed").write_bytes(seed())
    atheris.Setup([*sys.argv, str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
