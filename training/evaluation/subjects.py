"""One subject's maps for evaluation: named map sets on one grid, regions, brain and tissue masks.

A map set is a group of quantitative maps from one source, e.g. ``"truth"`` (a phantom's ground truth),
``"true"`` (dictionary matching of the acquired or simulated MRF) or ``"dl"`` (matching of the
network-synthesised MRF), each ``{"T1": array, "T2": array, "PD": array}`` with times in ms.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np

TISSUE_CLASSES = ("WM", "GM", "CSF")
"""Tissue classes that :func:`tissue_of_region` assigns."""
NEAR_PURE_TOLERANCE = {"T1": 0.05, "T2": 0.08}
"""Largest relative distance of a near-pure voxel's truth from its subject's own tissue value."""
NEAR_PURE_SOURCES = {"GM": "gm", "WM": "wm"}
"""Tissue class -> key of the subject's tissue values (a phantom manifest entry's ``tissues``)."""
NEAR_PURE_SUFFIX = " near-pure"


@dataclass(frozen=True)
class SubjectMaps:
    """Maps of one subject on one grid.

    ``maps``: map set name -> quantity name -> array (ms for T1 and T2); ``labels``: int regions
    (0 = background, 1..N); ``region_names``: label value -> name; ``brain_mask``: bool;
    ``tissue_masks``: tissue name (e.g. ``"WM"``) -> bool, for voxelwise errors. Every array has the
    shape of ``labels``, and every map is finite inside the brain mask.
    """

    subject_id: str
    maps: Mapping[str, Mapping[str, np.ndarray]]
    labels: np.ndarray
    region_names: Mapping[int, str]
    brain_mask: np.ndarray
    tissue_masks: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.subject_id:
            raise ValueError(f"subject_id: must be non-empty, got {self.subject_id!r}")
        labels = np.asarray(self.labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels: must be an integer array, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"labels: must be >= 0, got {labels.min()} (subject {self.subject_id})")
        shape = labels.shape
        mask = np.asarray(self.brain_mask)
        if mask.shape != shape:
            raise ValueError(f"brain_mask: shape {mask.shape} differs from labels {shape}")
        present = {int(v) for v in np.unique(labels)} - {0}
        unnamed = sorted(present - {int(k) for k in self.region_names})
        if unnamed:
            raise ValueError(f"region_names: no name for labels {unnamed} (subject {self.subject_id})")
        if not self.maps:
            raise ValueError(f"maps: no map sets for subject {self.subject_id}")
        inside = mask.astype(bool)
        frozen_maps: dict[str, Mapping[str, np.ndarray]] = {}
        for set_name, quantities in self.maps.items():
            for quantity, array in quantities.items():
                if np.shape(array) != shape:
                    raise ValueError(f"maps[{set_name!r}][{quantity!r}]: shape {np.shape(array)} differs from "
                                     f"labels {shape} (subject {self.subject_id})")
                bad = int(np.count_nonzero(~np.isfinite(np.asarray(array)[inside])))
                if bad:
                    raise ValueError(f"maps[{set_name!r}][{quantity!r}]: {bad} non-finite voxels inside the "
                                     f"brain mask (subject {self.subject_id})")
            frozen_maps[set_name] = MappingProxyType(dict(quantities))
        for tissue, tmask in self.tissue_masks.items():
            if np.shape(tmask) != shape:
                raise ValueError(f"tissue_masks[{tissue!r}]: shape {np.shape(tmask)} differs from labels {shape}")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "brain_mask", inside)
        object.__setattr__(self, "maps", MappingProxyType(frozen_maps))
        object.__setattr__(self, "region_names", MappingProxyType({int(k): str(v)
                                                                   for k, v in self.region_names.items()}))
        object.__setattr__(self, "tissue_masks", MappingProxyType({str(k): np.asarray(v, dtype=bool)
                                                                   for k, v in self.tissue_masks.items()}))

    def require(self, map_sets: Iterable[str], quantities: Iterable[str]) -> None:
        """Raise ValueError unless every map set in ``map_sets`` has every quantity in ``quantities``."""
        quantities = list(quantities)
        for map_set in map_sets:
            if map_set not in self.maps:
                raise ValueError(f"map_sets: {map_set!r} missing in subject {self.subject_id} "
                                 f"(has {sorted(self.maps)})")
            missing = [q for q in quantities if q not in self.maps[map_set]]
            if missing:
                raise ValueError(f"quantities: {missing} missing in map set {map_set!r} of subject "
                                 f"{self.subject_id}")

    def with_maps(self, name: str, maps: Mapping[str, np.ndarray]) -> SubjectMaps:
        """A copy with the map set ``name`` added (or replaced), e.g. the DL maps after inference."""
        return replace(self, maps={**self.maps, name: maps})


def tissue_of_region(name: str) -> str | None:
    """Tissue class of a phantom region name (``training.phantom.regions``), or None if mixed.

    Cortex (cerebral, insular, cingulate, cerebellar) is GM; white matter and the corpus callosum are
    WM; ventricles and sulcal CSF are CSF. The deep nuclei, hippocampus, amygdala and brainstem are
    drawn from GM and WM together in the phantom, so they get no class.
    """
    lowered = name.lower()
    if "cortex" in lowered:
        return "GM"
    if "white matter" in lowered or "corpus callosum" in lowered:
        return "WM"
    if "ventricle" in lowered or lowered.endswith("csf"):
        return "CSF"
    return None


def tissue_masks_from_labels(labels: np.ndarray, region_names: Mapping[int, str]) -> dict[str, np.ndarray]:
    """Boolean WM, GM and CSF masks: the union of the regions of each class (:func:`tissue_of_region`)."""
    masks: dict[str, np.ndarray] = {}
    for tissue in TISSUE_CLASSES:
        ids = [int(k) for k, n in region_names.items() if tissue_of_region(n) == tissue]
        masks[tissue] = np.isin(labels, ids)
    return masks


def near_pure_masks(truth: Mapping[str, np.ndarray], tissue_masks: Mapping[str, np.ndarray],
                    tissue_values: Mapping[str, Mapping[str, float]]) -> dict[str, np.ndarray]:
    """``"GM near-pure"`` and ``"WM near-pure"``: the voxels of the GM (WM) mask whose truth T1 and T2 lie within
    :data:`NEAR_PURE_TOLERANCE` of the subject's own GM (WM) values (``tissue_values[key]["t1_ms"]``, ``["t2_ms"]``).

    Partial volume makes a boundary voxel's truth a matter of convention (fast-exchange rate average, geometric
    mean or the match of the mixed signal differ by tens of percent where CSF is mixed in); a voxel whose truth
    sits at its tissue's own value is nearly the same under every convention. A 5 % CSF share already moves a
    grey-matter voxel's T2 by about 5 % (rate average) to 16 % (geometric mean), so the tolerance admits at most
    about 7 % CSF (rate-average truth), where the conventions' T2 differ by up to about 15 %. Tissues missing from
    ``tissue_values`` or ``tissue_masks`` get no mask.
    """
    masks: dict[str, np.ndarray] = {}
    for tissue, key in NEAR_PURE_SOURCES.items():
        if tissue not in tissue_masks or key not in tissue_values:
            continue
        keep = np.asarray(tissue_masks[tissue], dtype=bool).copy()
        for quantity, unit_key in (("T1", "t1_ms"), ("T2", "t2_ms")):
            value = float(tissue_values[key][unit_key])
            if not value > 0:
                raise ValueError(f"tissue_values[{key!r}][{unit_key!r}]: must be > 0, got {value}")
            keep &= np.abs(np.asarray(truth[quantity], dtype=np.float64) / value - 1) <= NEAR_PURE_TOLERANCE[quantity]
        masks[tissue + NEAR_PURE_SUFFIX] = keep
    return masks


def load_phantom_subject(dataset_dir: Path, subject_id: str, *, map_set: str = "truth") -> SubjectMaps:
    """Ground-truth T1/T2/PD, labels, brain and tissue masks of a phantom subject (``training/phantom``).

    Tissue masks: WM, GM and CSF from the regions, plus :func:`near_pure_masks` where the manifest's entry of
    the subject has tissue values. The truth becomes the map set ``map_set``; add the matched maps with
    :meth:`SubjectMaps.with_maps`.
    """
    import nibabel as nib

    manifest_path = dataset_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"dataset_dir: no manifest.json in {dataset_dir}")
    manifest = json.loads(manifest_path.read_text())
    subject_dir = dataset_dir / subject_id
    if not subject_dir.is_dir():
        raise FileNotFoundError(f"subject_id: no folder {subject_id!r} in {dataset_dir}")
    files = manifest["files"]

    def load(key: str) -> np.ndarray:
        return np.asarray(nib.load(subject_dir / files[key]).dataobj)  # type: ignore[attr-defined]

    region_names = {int(k): str(v) for k, v in manifest["labels"].items()}
    labels = load("labels").astype(np.int32)
    maps = {"T1": load("t1").astype(np.float32), "T2": load("t2").astype(np.float32),
            "PD": load("pd").astype(np.float32)}
    tissue_masks = tissue_masks_from_labels(labels, region_names)
    entry: Mapping[str, object] = next((e for e in manifest.get("subjects", []) if e.get("id") == subject_id), {})
    tissues = entry.get("tissues")
    if isinstance(tissues, Mapping):
        tissue_masks |= near_pure_masks(maps, tissue_masks, tissues)
    return SubjectMaps(subject_id=subject_id, maps={map_set: maps}, labels=labels, region_names=region_names,
                       brain_mask=load("brain_mask") > 0, tissue_masks=tissue_masks)
