"""``synthmrf demo`` as the README runs it: the whole DICOM round trip with the shipped model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from pipeline.mrf.dictionary import Dictionary


@pytest.mark.slow
def test_demo_round_trip(tmp_path: Path, default_dictionary: Dictionary) -> None:
    exe = Path(sys.executable).with_name("synthmrf")
    done = subprocess.run([str(exe), "demo", "--workdir", str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo: OK" in done.stdout
    for quantity in ("T1", "T2"):
        assert any(line.startswith(f"{quantity}   WM") for line in done.stdout.splitlines()), done.stdout
    received = sorted((tmp_path / "demo" / "received").rglob("*.dcm"))
    labels = {str(pydicom.dcmread(p, stop_before_pixels=True).get("ContentLabel", "")) for p in received}
    assert {"T1_MAP", "T2_MAP"} <= labels
    [figure] = (tmp_path / "demo" / "node").rglob("qc.png")
    assert figure.stat().st_size > 10_000
