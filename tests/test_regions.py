"""Anatomical regions: the atlas grouping in MNI space (against published MNI coordinates), the tissue classes,
and the statistics (against a direct computation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.regions import (
    CSF_CLASS,
    GM_CLASS,
    WM_CLASS,
    region_statistics,
    report_regions,
    template_regions,
    tissue_classes,
    write_region_tables,
)

# Approximate MNI centres of mass (mm, RAS) of the left structures as commonly reported (e.g. by the
# Harvard-Oxford subcortical atlas); right = x mirrored. A wrong side, a flipped axis or a shifted atlas is off
# by far more than the 8 mm allowed (parcel borders differ between atlases by a few mm).
PUBLISHED_LEFT_CENTROIDS = {
    "Thalamus": (-11, -18, 7),
    "Caudate nucleus": (-12, 11, 9),
    "Putamen": (-24, 3, 1),
    "Globus pallidus": (-18, -1, 0),
    "Hippocampus": (-25, -21, -10),
    "Amygdala": (-23, -3, -18),
    "Insula": (-35, 5, 3),
}


def _centroids() -> dict[str, np.ndarray]:
    labels, affine = template_regions()
    out = {}
    for region in report_regions():
        idx = np.argwhere(labels == region.label)
        assert len(idx) > 100, f"{region.name}: {len(idx)} voxels in MNI space"
        out[region.name] = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
    return out


def test_atlas_regions_sit_where_the_literature_puts_them() -> None:
    centroids = _centroids()
    for region in report_regions():
        x = centroids[region.name][0]
        if region.side == "left":
            assert x < -2, f"{region.name}: centroid x {x:.1f} mm is not on the left (RAS: left is negative x)"
        elif region.side == "right":
            assert x > 2, f"{region.name}: centroid x {x:.1f} mm is not on the right"
        else:
            assert abs(x) < 3, f"{region.name}: a midline structure, centroid x {x:.1f} mm"
    for name, left in PUBLISHED_LEFT_CENTROIDS.items():
        for side, mirror in (("left", 1), ("right", -1)):
            expected = np.array(left, float) * np.array([mirror, 1, 1])
            got = centroids[f"{name} {side}"]
            assert np.linalg.norm(got - expected) < 8, f"{name} {side}: {np.round(got, 1)} vs published {expected}"
    # White matter lies between the cortex and the deep nuclei: its centroid is lateral to the thalamus, and
    # the cerebellum is below and behind it.
    assert abs(centroids["Cerebral white matter left"][0]) > abs(centroids["Thalamus left"][0])
    assert centroids["Cerebellar cortex left"][2] < centroids["Cerebral white matter left"][2] - 30
    assert centroids["Cerebellar cortex left"][1] < -40


def test_tissue_classes_follow_the_maps_at_either_field_strength() -> None:
    rng = np.random.default_rng(0)
    for wm, gm, csf in (((830, 80), (1330, 110), (4000, 2000)), ((650, 75), (1190, 95), (3500, 1800))):  # 3 T, 1.5 T
        truth = rng.choice([WM_CLASS, GM_CLASS, CSF_CLASS], size=(40, 40, 40), p=[0.45, 0.4, 0.15])
        t1 = np.choose(truth - 1, [wm[0], gm[0], csf[0]]).astype(np.float32) * rng.normal(1, 0.06, truth.shape)
        t2 = np.choose(truth - 1, [wm[1], gm[1], csf[1]]).astype(np.float32) * rng.normal(1, 0.06, truth.shape)
        mask = np.ones(truth.shape, bool)
        mask[:5] = False
        classes = tissue_classes(t1.astype(np.float32), t2.astype(np.float32), mask)
        assert np.all(classes[~mask] == 0)
        assert np.mean(classes[mask] == truth[mask]) > 0.99


def test_statistics_equal_a_direct_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = np.zeros((30, 20, 10), np.int16)
    labels[2:10, 2:10, 2:8] = 1  # Precentral gyrus left
    labels[12:20, 2:10, 2:8] = 2  # ... right
    labels[0, 0, 0] = 37  # Cerebral white matter right, one voxel
    t1 = rng.uniform(500, 2000, labels.shape).astype(np.float32)
    t2 = rng.uniform(40, 200, labels.shape).astype(np.float32)
    affine = np.diag([1.2, 1.0, 2.0, 1.0])
    maps = {"T1": t1, "T2": t2}
    stats = region_statistics(labels, maps, affine)
    assert [s.region.label for s in stats] == [1, 2, 37]
    for s in stats:
        inside = labels == s.region.label
        assert s.voxels == inside.sum() and s.volume_ml == pytest.approx(inside.sum() * 2.4 / 1000)
        for q in ("T1", "T2"):
            values = maps[q][inside].astype(np.float64)
            got = s.values[q]
            assert (got.mean, got.sd, got.median) == pytest.approx((values.mean(), values.std(), np.median(values)))
    merged = region_statistics(labels, maps, affine, merged=True)
    assert [(m.region.name, m.region.label) for m in merged] == [("Precentral gyrus", 0), ("Cerebral white matter", 0)]
    both = (labels == 1) | (labels == 2)
    assert merged[0].voxels == both.sum()
    assert merged[0].values["T1"].mean == pytest.approx(float(t1[both].astype(np.float64).mean()))

    csv_path, json_path = write_region_tables(stats, merged, tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["region"] for r in rows] == ["Precentral gyrus left", "Precentral gyrus right",
                                           "Cerebral white matter right", "Precentral gyrus", "Cerebral white matter"]
    assert rows[0]["side"] == "left" and rows[3]["side"] == "both" and rows[3]["segment"] == "0"
    assert rows[2]["code"] == "SCT:68523003"  # cerebral white matter
    assert float(rows[0]["T1_mean"]) == pytest.approx(stats[0].values["T1"].mean, abs=0.05)
    doc = json.loads(json_path.read_text())
    assert doc["atlas"]["name"] == "AAL3" and doc["units"]["T1"] == "ms" and len(doc["regions"]) == 5
