"""47 evaluation regions in MNI152 space: tissue class x anatomical zone, defined geometrically.

No atlas ships offline with nilearn, so zones are simple shapes in MNI152 (2009, RAS mm) coordinates:
ellipsoids for the deep grey nuclei, hippocampus and amygdala (centres and radii read off the
MNI152 2009 template), elliptic cylinders for the brainstem, planes for the lobes (central sulcus
approximated by y = -20 - z/4, parieto-occipital by y = -75 + z/5, tentorium sloping down
posteriorly and laterally), boxes for the insula, the cingulate and the corpus callosum. The tissue
class of a voxel is the most probable of GM, WM and CSF. Ventricles are CSF more than 8 mm inside
the brain mask. The count (47) follows the paper; the boundaries are approximate and meant for
regional statistics, not neuroanatomy.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_SIDES = ("left", "right")
_LOBES = ("frontal", "parietal", "temporal", "occipital")


def _label_names() -> tuple[str, ...]:
    names: list[str] = []
    for side in _SIDES:
        names += [f"{side} {lobe} cortex" for lobe in _LOBES]
        names += [f"{side} insular cortex", f"{side} cingulate cortex"]
        names += [f"{side} {lobe} white matter" for lobe in _LOBES]
        names += [f"{side} insular white matter"]
        names += [f"{side} {n}" for n in ("caudate", "lentiform nucleus", "thalamus", "hippocampus",
                                          "amygdala", "cerebellar cortex", "cerebellar white matter",
                                          "lateral ventricle")]
    names += ["corpus callosum genu", "corpus callosum body", "corpus callosum splenium",
              "midbrain", "pons", "medulla", "third ventricle", "fourth ventricle", "sulcal CSF"]
    return tuple(names)


LABEL_NAMES: tuple[str, ...] = _label_names()
"""Region names; label value = index + 1 (0 = outside the brain)."""

DEEP_GREY_NAMES = ("caudate", "lentiform nucleus", "thalamus")


def label_id(name: str) -> int:
    """Label value of a region name."""
    try:
        return LABEL_NAMES.index(name) + 1
    except ValueError:
        raise ValueError(f"name: unknown region {name!r}") from None


def deep_grey_ids() -> list[int]:
    """Labels of the deep grey nuclei (their GM gets deep-grey relaxation times)."""
    return [label_id(f"{s} {n}") for s in _SIDES for n in DEEP_GREY_NAMES]


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    return (((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
            + ((z - centre[2]) / radii[2]) ** 2) < 1


def region_labels(gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, mask: np.ndarray,
                  affine: np.ndarray) -> np.ndarray:
    """Label map (int16, same shape) for tissue probabilities on a grid with RAS ``affine`` (MNI mm)."""
    if not (gm.shape == wm.shape == csf.shape == mask.shape):
        raise ValueError(f"gm, wm, csf, mask: shapes differ: {gm.shape}, {wm.shape}, {csf.shape}, "
                         f"{mask.shape}")
    idx = np.indices(gm.shape, dtype=np.float32)
    x, y, z = (sum(affine[a, b] * idx[b] for b in range(3)) + affine[a, 3] for a in range(3))
    ax = np.abs(x)
    cls = np.argmax(np.stack([gm, wm, csf]), axis=0)  # 0 GM, 1 WM, 2 CSF
    brain = mask > 0
    is_gm, is_wm, is_csf = brain & (cls == 0), brain & (cls == 1), brain & (cls == 2)
    tissue = is_gm | is_wm
    depth_mm = ndimage.distance_transform_edt(brain, sampling=np.linalg.norm(affine[:3, :3], axis=0))
    labels = np.zeros(gm.shape, dtype=np.int16)
    free = np.ones(gm.shape, dtype=bool)

    def put(name: str, where: np.ndarray) -> None:
        sel = where & free
        labels[sel] = label_id(name)
        free[sel] = False

    # Brainstem (midline, before the hemispheric zones).
    put("midbrain", tissue & ((x / 12) ** 2 + ((y + 25) / 11) ** 2 < 1) & (z >= -14) & (z < -2))
    put("pons", tissue & ((x / 15) ** 2 + ((y + 27) / 13) ** 2 < 1) & (z >= -40) & (z < -14))
    put("medulla", tissue & ((x / 10) ** 2 + ((y + 38) / 10) ** 2 < 1) & (z < -40))
    deep_csf = is_csf & (depth_mm > 8)
    put("fourth ventricle", deep_csf & (z < -14) & (y < -30) & (ax < 12))
    put("third ventricle", deep_csf & (ax < 5) & (z >= -14) & (z < 18) & (y > -32) & (y < 5))
    for sign, side in ((-1.0, "left"), (1.0, "right")):
        hemi = (x < 0) if sign < 0 else (x >= 0)
        xs = x * sign  # distance from midline, positive in this hemisphere
        put(f"{side} lateral ventricle", deep_csf & hemi & (z > -25))
        put(f"{side} caudate", tissue & hemi & (_ellipsoid(xs, y, z, (12, 13, 7), (6, 9, 9))
                                                | _ellipsoid(xs, y, z, (16, -5, 19), (5, 12, 5))))
        put(f"{side} lentiform nucleus", tissue & hemi & _ellipsoid(xs, y, z, (23, 1, 1), (9, 16, 10)))
        put(f"{side} thalamus", tissue & hemi & _ellipsoid(xs, y, z, (11, -18, 7), (9, 15, 9)))
        put(f"{side} amygdala", tissue & hemi & _ellipsoid(xs, y, z, (23, -4, -19), (7, 7, 6)))
        put(f"{side} hippocampus", tissue & hemi & _ellipsoid(xs, y, z, (28, -23, -12), (6, 16, 7)))
        tentorium = -6 - 0.45 * np.maximum(0, -y - 50) - 0.15 * np.maximum(0, xs - 20)
        cerebellum = hemi & (y < -36) & (z < tentorium)
        put(f"{side} cerebellar cortex", is_gm & cerebellum)
        put(f"{side} cerebellar white matter", is_wm & cerebellum)
    put("corpus callosum genu", is_wm & (ax < 8) & (z > 0) & (z < 32) & (y >= 12) & (y < 38))
    put("corpus callosum splenium", is_wm & (ax < 8) & (z > 0) & (z < 32) & (y > -45) & (y < -25))
    put("corpus callosum body", is_wm & (ax < 8) & (z > 8) & (z < 32) & (y >= -25) & (y < 12))
    for sign, side in ((-1.0, "left"), (1.0, "right")):
        hemi = (x < 0) if sign < 0 else (x >= 0)
        xs = x * sign
        insula = hemi & (xs > 28) & (xs < 42) & (y > -28) & (y < 28) & (z > -12) & (z < 24)
        put(f"{side} insular cortex", is_gm & insula)
        put(f"{side} insular white matter", is_wm & insula)
        put(f"{side} cingulate cortex", is_gm & hemi & (xs < 14) & (y > -50) & (y < 40) & (z > 0) & (z < 45))
        occipital = hemi & (y < -75 + 0.2 * z)
        temporal = hemi & ~occipital & (z < 10) & (xs > 25) & ((y < 5) | ((y < 25) & (z < -15)))
        frontal = hemi & ~occipital & ~temporal & (y > -20 - 0.25 * z)
        parietal = hemi & ~occipital & ~temporal & ~frontal
        for lobe, zone in zip(_LOBES, (frontal, parietal, temporal, occipital), strict=True):
            put(f"{side} {lobe} cortex", is_gm & zone)
            put(f"{side} {lobe} white matter", is_wm & zone)
    put("sulcal CSF", is_csf)
    return labels
