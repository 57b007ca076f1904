"""Anatomy: the MNI152 2009 template as tissue fractions, and each subject's warp of it.

Template (nilearn's bundled ``mni_icbm152_*_tal_nlin_sym_09a``, 1 mm, skull-stripped): GM and WM
probability maps and the brain mask. CSF = mask - GM - WM (clipped; GM + WM renormalised where they
exceed 1). GM inside the deep grey nuclei (:mod:`training.phantom.regions`, smoothed edge) becomes its
own tissue with deep-grey relaxation times. A crude scalp shell (fat, 8 to 14 mm outside the brain
mask, above the skull base) gives the MPRAGE the bright extracranial rim of a real head; the gap in
between stands for skull and meninges (no signal). Region labels are computed once in template space.

Subject: a random rigid pose and per-axis scale (brain size) plus a smooth random displacement field
in template space. A voxel at subject position p samples the template at
``c + diag(1/s) R^T (p - t) + u(.)`` (pull-back), so every map on every grid comes from one warp.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from training.phantom.fields import SmoothField, random_smooth_field
from training.phantom.geometry import VolumeGrid, rotation_matrix
from training.phantom.regions import deep_grey_ids, region_labels

logger = logging.getLogger(__name__)

TISSUES = ("wm", "gm", "deep_gm", "csf", "scalp", "lesion")
"""Tissue compartments; fractions of a voxel sum to <= 1 (the rest is empty: skull, air). The template
has no lesions: world v2 carves them out of white matter per subject (:mod:`training.phantom.world`)."""
TEMPLATE_TISSUES = TISSUES[:-1]

SCALP_INNER_MM, SCALP_OUTER_MM, SKULL_BASE_Z_MM = 8.0, 14.0, -40.0


@dataclass(frozen=True)
class Template:
    """Template-space volumes on the MNI grid (``affine``, RAS mm)."""

    fractions: np.ndarray  # (len(TEMPLATE_TISSUES), X, Y, Z) float32
    labels: np.ndarray  # int16
    brain: np.ndarray  # float32 0/1 brain mask
    support: np.ndarray  # bool: brain or scalp, dilated by the largest expected displacement
    affine: np.ndarray
    centre_mm: np.ndarray  # brain-mask centroid (MNI mm)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """Build the template from nilearn's bundled files (a few seconds, cached per process)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    affine = np.asarray(gm_img.affine, dtype=np.float64)
    gm = np.asarray(gm_img.get_fdata(dtype=np.float32))
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
    brain = (np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)) > 0.5)
    gm, wm = gm * brain, wm * brain
    total = gm + wm
    over = np.where(total > 1, total, 1).astype(np.float32)
    gm, wm = gm / over, wm / over
    csf = np.clip(brain - gm - wm, 0, 1).astype(np.float32)
    labels = region_labels(gm, wm, csf, brain.astype(np.float32), affine)
    deep = ndimage.gaussian_filter(np.isin(labels, deep_grey_ids()).astype(np.float32), 1.0)
    outside_mm = ndimage.distance_transform_edt(~brain)
    z_mm = affine[2, 2] * np.arange(brain.shape[2]) + affine[2, 3]
    above_base = np.clip((z_mm - SKULL_BASE_Z_MM) / 10, 0, 1)[None, None, :]
    scalp = (np.clip(outside_mm - SCALP_INNER_MM, 0, 1) * np.clip(SCALP_OUTER_MM - outside_mm, 0, 1)
             * above_base).astype(np.float32)
    fractions = np.stack([wm, gm * (1 - deep), gm * deep, csf, scalp]).astype(np.float32)
    support = ndimage.binary_dilation((fractions.sum(0) > 0), iterations=8)
    idx = np.argwhere(brain)
    centre = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    logger.debug("template built: %d brain voxels", int(brain.sum()))
    return Template(fractions, labels, brain.astype(np.float32), support, affine, centre)


@dataclass(frozen=True)
class Warp:
    """Subject pose and shape: template point = c + diag(1/scale) R^T (p - t), then + displacement."""

    rotation: np.ndarray  # 3x3
    scale: np.ndarray  # (3,)
    translation_mm: np.ndarray  # (3,)
    displacement: SmoothField  # 3 components, in template mm
    centre_mm: np.ndarray  # template point placed at the subject origin (before translation)

    def matrix(self) -> np.ndarray:
        """The rigid-and-scale part as a 4x4 (subject RAS mm to template mm)."""
        m = np.eye(4)
        m[:3, :3] = (self.rotation / self.scale[None, :]).T
        m[:3, 3] = self.centre_mm - m[:3, :3] @ self.translation_mm
        return m

    def to_template(self, points_mm: np.ndarray) -> np.ndarray:
        """Subject RAS points (3, N) to template (MNI) mm (3, N), float32."""
        m = self.matrix().astype(np.float32)
        rigid = m[:3, :3] @ points_mm + m[:3, 3:]
        return rigid + self.displacement(rigid)


def random_warp(rng: np.random.Generator, template: Template, *, max_rotation_deg: float = 8.0,
                max_translation_mm: float = 4.0, scale_sd: float = 0.03,
                displacement_sd_mm: float = 2.0, correlation_mm: float = 20.0) -> Warp:
    """A subject's pose (uniform angles and shifts), brain size (per-axis scale ~ N(1, scale_sd)) and a
    smooth displacement (each component ~ N(0, displacement_sd_mm), correlation ``correlation_mm``)."""
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    rotation = (rotation_matrix((0, 0, 1), angles[2]) @ rotation_matrix((0, 1, 0), angles[1])
                @ rotation_matrix((1, 0, 0), angles[0]))
    scale = np.clip(rng.normal(1.0, scale_sd, size=3), 1 - 3 * scale_sd, 1 + 3 * scale_sd)
    translation = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    displacement = random_smooth_field(rng, components=3, centre_mm=template.centre_mm, extent_mm=260.0,
                                       correlation_mm=correlation_mm, sd=displacement_sd_mm)
    return Warp(rotation, scale, translation, displacement, template.centre_mm)


@dataclass(frozen=True)
class RenderedAnatomy:
    """Anatomy sampled on a grid, stored only at the ``index`` voxels (flat, C order) of the support."""

    grid: VolumeGrid
    index: np.ndarray  # int64 (N,)
    template_mm: np.ndarray  # (3, N) template coordinates of those voxels
    fractions: np.ndarray  # (len(TISSUES), N) float32
    labels: np.ndarray  # (N,) int16
    brain: np.ndarray  # (N,) bool

    def full(self, values: np.ndarray, fill: float = 0) -> np.ndarray:
        """Scatter per-support-voxel ``values`` (N, ...) into a full grid array."""
        out = np.full((self.grid.n_voxels, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.index] = values
        return out.reshape(*self.grid.shape, *values.shape[1:])


def _sample(volume: np.ndarray, voxel_coords: np.ndarray, order: int) -> np.ndarray:
    return ndimage.map_coordinates(volume, voxel_coords, order=order, mode="constant", cval=0,
                                   prefilter=False)


def render(template: Template, warp: Warp, grid: VolumeGrid) -> RenderedAnatomy:
    """Tissue fractions, labels and brain mask of the warped template on ``grid`` (linear / nearest)."""
    to_voxel = np.linalg.inv(template.affine)
    coarse = grid.points_mm(transform=to_voxel @ warp.matrix())
    index = np.flatnonzero(_sample(template.support.astype(np.uint8), coarse, order=0))
    del coarse
    points = warp.to_template(grid.points_mm(index))
    vox = to_voxel[:3, :3].astype(np.float32) @ points + to_voxel[:3, 3:].astype(np.float32)
    fractions = np.stack([*(_sample(f, vox, order=1) for f in template.fractions),
                          np.zeros(index.size, np.float32)]).clip(0, 1)
    labels = _sample(template.labels, vox, order=0).astype(np.int16)
    brain = _sample(template.brain, vox, order=1) >= 0.5
    return RenderedAnatomy(grid, index, points, fractions.astype(np.float32), labels, brain)
