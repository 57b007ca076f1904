"""NIfTI volumes written by save_volume: read back exactly by independent readers, atomically, reproducibly."""

from __future__ import annotations

import gzip
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pipeline.volume_io as volume_io
from pipeline.volume_io import load_volume, save_volume

AFFINE = np.array([[-1.2, 0, 0, 90.0], [0, 1.1, 0, -126.0], [0, 0, 1.3, -72.0], [0, 0, 0, 1]])


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(3).gamma(2.0, 500.0, size=(23, 19, 17)).astype(np.float32)


def test_gzip_volume_reads_back_exactly_with_other_readers(volume: np.ndarray, tmp_path: Path) -> None:
    path = save_volume(tmp_path / "T1.nii.gz", volume, AFFINE)
    subprocess.run(["gzip", "-t", str(path)], check=True)  # the system's gzip accepts the stream
    img = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))  # stdlib zlib, not ISA-L
    assert np.array_equal(np.asarray(img.dataobj), volume)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm"
    data, affine = load_volume(path)
    assert np.array_equal(data, volume) and np.allclose(affine, AFFINE, atol=1e-6)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_same_volume_same_bytes_and_plain_nifti_uncompressed(volume: np.ndarray, tmp_path: Path) -> None:
    a = save_volume(tmp_path / "a.nii.gz", volume, AFFINE).read_bytes()
    b = save_volume(tmp_path / "b.nii.gz", volume, AFFINE).read_bytes()
    assert a == b and len(a) < volume.nbytes
    plain = save_volume(tmp_path / "c.nii", volume + 1j, AFFINE)
    assert plain.read_bytes()[:4] == (348).to_bytes(4, "little")  # a plain NIfTI-1 header, not a gzip stream
    data, _ = load_volume(plain)
    assert data.dtype == np.complex64 and np.array_equal(data, (volume + 1j).astype(np.complex64))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(volume: np.ndarray, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_volume(tmp_path / "T2.nii.gz", volume, AFFINE)
    before = path.read_bytes()

    def full_disk(self: Path, data: bytes) -> int:
        self.open("wb").write(data[:100])
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(volume_io.Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_volume(path, volume * 2, AFFINE)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
