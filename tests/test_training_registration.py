"""Training preprocessing: the rigid MPRAGE-to-MRF registration recovers a known misalignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.volume_io import load_volume
from training.phantom.geometry import rotation_matrix
from training.preprocess import _motion, mprage_to_mrf


def test_registration_recovers_a_known_head_movement(tiny_dataset: Path) -> None:
    subject = tiny_dataset / "sub-001"
    mprage, mprage_affine = load_volume(subject / "mprage.nii.gz")
    coeffs, mrf_affine = load_volume(subject / "mrf_svd.nii.gz")
    mask = load_volume(subject / "brain_mask.nii.gz")[0] > 0
    # The head moved between the two scans: the MPRAGE's voxels now sit at moved patient positions.
    moved = np.eye(4)
    moved[:3, :3] = rotation_matrix((0.3, 1.0, 0.2), 4.0)
    moved[:3, 3] = (3.0, -2.0, 1.5)
    found = mprage_to_mrf(mprage, moved @ mprage_affine, coeffs, mrf_affine, mask)
    residual_mm, residual_deg = _motion(np.linalg.inv(moved) @ found)
    assert residual_mm < 1.0 and residual_deg < 0.5, (residual_mm, residual_deg)
    identity_mm, identity_deg = _motion(mprage_to_mrf(mprage, mprage_affine, coeffs, mrf_affine, mask))
    assert identity_mm < 1.0 and identity_deg < 0.5
