"""NIfTI volumes with their geometry: an image is pixels plus an affine, never one without the other."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip

GZIP_LEVEL = 1


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (as stored, complex kept) and the 4x4 RAS affine of a NIfTI file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        img = nib.load(p)
    except Exception as exc:  # nibabel raises several unrelated types for bad files
        raise ValueError(f"{p}: not a readable NIfTI file ({exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{p}: expected a NIfTI image, got {type(img).__name__}")
    data = np.asanyarray(img.dataobj)
    if not np.iscomplexobj(data):
        data = data.astype(np.float32)
    return data, np.asarray(img.affine, dtype=np.float64)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` with ``affine`` (float32 or complex64), atomically (temp file + rename).

    A ``.nii.gz`` is compressed by ISA-L's gzip (level 1: about 10x faster than zlib's level 1, which nibabel uses,
    and no larger; any gzip reader reads it; modification time 0, so the same volume gives the same bytes).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.complex64 if np.iscomplexobj(data) else np.float32
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    encoded = img.to_bytes()
    if p.name.endswith(".gz"):
        encoded = igzip.compress(encoded, compresslevel=GZIP_LEVEL, mtime=0)
    tmp = p.with_name(f".{p.name}.partial")
    try:
        tmp.write_bytes(encoded)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
