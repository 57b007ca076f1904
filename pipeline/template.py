"""The bundled MNI152 template (nilearn's 2009c symmetric, 1 mm) and the network's working grid in its space.

The working grid is the model's grid: 256^3 voxels of 1 mm, axial in DICOM order (i to the patient's
left, j to posterior, k up), centred on the template's brain centroid, exactly like the MRF grid the
training subjects were made on. A head registered to the template and resampled on this grid looks
like a training subject, whatever the acquisition's orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

WORKING_SHAPE = (256, 256, 256)
WORKING_SPACING_MM = 1.0
WORKING_DIRECTIONS_RAS = np.diag([-1.0, -1.0, 1.0])  # i: R->L, j: A->P, k: I->S


@dataclass(frozen=True)
class Template:
    """T1-weighted brain template and brain mask (both skull-stripped) with their RAS affine."""

    image: np.ndarray  # float32, 0..1
    brain_mask: np.ndarray  # float32 probability 0..1
    affine: np.ndarray  # voxel to RAS mm
    brain_centre_mm: np.ndarray  # (3,) RAS


@lru_cache(maxsize=2)
def load_template(resolution_mm: int = 1) -> Template:
    """nilearn's bundled MNI152 T1 template and brain mask (offline; cached per process)."""
    from nilearn import datasets

    image = datasets.load_mni152_template(resolution=resolution_mm)
    mask = datasets.load_mni152_brain_mask(resolution=resolution_mm)
    affine = np.asarray(image.affine, dtype=np.float64)
    brain = np.asarray(mask.get_fdata(dtype=np.float32))
    idx = np.argwhere(brain > 0.5)
    centre = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    return Template(np.asarray(image.get_fdata(dtype=np.float32)), brain, affine, centre)


def working_grid_in_template() -> np.ndarray:
    """RAS affine of the working grid in template (MNI) space: 256^3 at 1 mm centred on the brain."""
    centre = load_template(1).brain_centre_mm
    linear = WORKING_DIRECTIONS_RAS * WORKING_SPACING_MM
    half = (np.asarray(WORKING_SHAPE) - 1) / 2
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = centre - linear @ half
    return a
