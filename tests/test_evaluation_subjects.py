"""SubjectMaps validation, tissue classes of the phantom's region names, loading a phantom subject."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.evaluation.subjects import (
    SubjectMaps,
    load_phantom_subject,
    near_pure_masks,
    tissue_masks_from_labels,
    tissue_of_region,
)
from training.phantom.regions import LABEL_NAMES, label_id


def maps_for(shape: tuple[int, ...], value: float = 1000.0) -> dict[str, np.ndarray]:
    return {"T1": np.full(shape, value), "T2": np.full(shape, value / 10)}


def test_subject_maps_validation() -> None:
    labels = np.array([[0, 1], [2, 2]], dtype=np.int16)
    mask = labels > 0
    names = {1: "a", 2: "b"}
    subject = SubjectMaps("s1", {"truth": maps_for((2, 2))}, labels, names, mask)
    assert subject.with_maps("dl", maps_for((2, 2))).maps.keys() == {"truth", "dl"}
    with pytest.raises(ValueError, match=r"brain_mask: shape \(2, 3\) differs from labels \(2, 2\)"):
        SubjectMaps("s1", {"truth": maps_for((2, 2))}, labels, names, np.ones((2, 3), bool))
    with pytest.raises(ValueError, match=r"maps\['truth'\]\['T1'\]: shape \(3, 2\) differs"):
        SubjectMaps("s1", {"truth": maps_for((3, 2))}, labels, names, mask)
    with pytest.raises(ValueError, match=r"region_names: no name for labels \[2\]"):
        SubjectMaps("s1", {"truth": maps_for((2, 2))}, labels, {1: "a"}, mask)
    with pytest.raises(TypeError, match="labels: must be an integer array, got dtype float64"):
        SubjectMaps("s1", {"truth": maps_for((2, 2))}, labels.astype(float), names, mask)
    with pytest.raises(ValueError, match="labels: must be >= 0, got -2"):
        SubjectMaps("s1", {"truth": maps_for((2, 2))}, -labels, {-1: "x", -2: "y"}, mask)
    bad = maps_for((2, 2))
    bad["T2"][1, 1] = np.nan
    with pytest.raises(ValueError, match=r"maps\['truth'\]\['T2'\]: 1 non-finite voxels inside the brain mask"):
        SubjectMaps("s1", {"truth": bad}, labels, names, mask)
    bad["T2"][1, 1], bad["T2"][0, 0] = 100.0, np.nan  # outside the mask: allowed
    SubjectMaps("s1", {"truth": bad}, labels, names, mask)
    with pytest.raises(ValueError, match=r"quantities: \['PD'\] missing in map set 'truth' of subject s1"):
        subject.require(["truth"], ["T1", "PD"])


def test_tissue_classes_of_phantom_regions() -> None:
    classes = {name: tissue_of_region(name) for name in LABEL_NAMES}
    assert classes["left frontal cortex"] == "GM"
    assert classes["right cerebellar cortex"] == "GM"
    assert classes["left insular white matter"] == "WM"
    assert classes["corpus callosum body"] == "WM"
    assert classes["right lateral ventricle"] == "CSF"
    assert classes["fourth ventricle"] == "CSF"
    assert classes["sulcal CSF"] == "CSF"
    for mixed in ("left caudate", "right thalamus", "left hippocampus", "pons", "midbrain"):
        assert classes[mixed] is None
    counts = {c: list(classes.values()).count(c) for c in ("GM", "WM", "CSF", None)}
    # cortex: 4 lobes + insula + cingulate + cerebellum per side; WM: 4 lobes + insula + cerebellum per side + 3 CC;
    # CSF: 2 lateral + 3rd + 4th + sulcal; mixed: caudate, lentiform, thalamus, hippocampus, amygdala x 2 + brainstem 3
    assert counts == {"GM": 14, "WM": 15, "CSF": 5, None: 13}


def test_load_phantom_subject(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shape = (6, 5, 4)
    labels = np.zeros(shape, dtype=np.int16)
    cortex, wm, ventricle = (label_id(n) for n in ("left frontal cortex", "left frontal white matter",
                                                   "left lateral ventricle"))
    labels[1:3, 1:4, 1:3] = cortex
    labels[3:5, 1:4, 1:3] = wm
    labels[2:4, 2:3, 3] = ventricle
    names = {str(i + 1): n for i, n in enumerate(LABEL_NAMES)}
    files = {"t1": "T1.nii.gz", "t2": "T2.nii.gz", "pd": "PD.nii.gz", "brain_mask": "brain_mask.nii.gz",
             "labels": "labels.nii.gz"}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files, "labels": names}))
    sub = tmp_path / "sub-001"
    sub.mkdir()
    arrays = {"t1": rng.uniform(800, 4000, shape).astype(np.float32),
              "t2": rng.uniform(60, 1500, shape).astype(np.float32),
              "pd": rng.uniform(0.6, 1.0, shape).astype(np.float32),
              "brain_mask": (labels > 0).astype(np.uint8), "labels": labels}
    for key, array in arrays.items():
        nib.save(nib.Nifti1Image(array, np.eye(4)), sub / files[key])

    subject = load_phantom_subject(tmp_path, "sub-001")
    assert subject.subject_id == "sub-001"
    np.testing.assert_array_equal(subject.maps["truth"]["T1"], arrays["t1"])
    np.testing.assert_array_equal(subject.maps["truth"]["PD"], arrays["pd"])
    np.testing.assert_array_equal(subject.labels, labels)
    np.testing.assert_array_equal(subject.brain_mask, labels > 0)
    np.testing.assert_array_equal(subject.tissue_masks["GM"], labels == cortex)
    np.testing.assert_array_equal(subject.tissue_masks["WM"], labels == wm)
    np.testing.assert_array_equal(subject.tissue_masks["CSF"], labels == ventricle)
    assert subject.region_names[47] == "sulcal CSF"
    with pytest.raises(FileNotFoundError, match="subject_id: no folder 'sub-009'"):
        load_phantom_subject(tmp_path, "sub-009")
    with pytest.raises(FileNotFoundError, match=r"dataset_dir: no manifest\.json"):
        load_phantom_subject(sub, "sub-001")


def test_near_pure_masks_by_hand() -> None:
    """A voxel is near-pure when both truth values sit within 5 % (T1) and 8 % (T2) of its tissue's own values."""
    values = {"gm": {"t1_ms": 1400.0, "t2_ms": 100.0}, "wm": {"t1_ms": 800.0, "t2_ms": 70.0}}
    # GM voxels: pure; T1 +4.9 %; T1 +5.1 %; T2 -7.9 %; T2 +8.5 % (a 5 % CSF share under the rate average);
    # a WM voxel at WM values; a WM-valued voxel inside the GM mask
    t1 = np.array([1400.0, 1468.6, 1471.4, 1400.0, 1400.0, 800.0, 800.0])
    t2 = np.array([100.0, 100.0, 100.0, 92.1, 108.5, 70.0, 70.0])
    gm = np.array([True, True, True, True, True, False, True])
    masks = near_pure_masks({"T1": t1, "T2": t2}, {"GM": gm, "WM": ~gm, "CSF": np.zeros(7, bool)}, values)
    assert masks.keys() == {"GM near-pure", "WM near-pure"}
    assert masks["GM near-pure"].tolist() == [True, True, False, True, False, False, False]
    assert masks["WM near-pure"].tolist() == [False, False, False, False, False, True, False]
    assert near_pure_masks({"T1": t1, "T2": t2}, {"GM": gm}, values).keys() == {"GM near-pure"}
    with pytest.raises(ValueError, match=r"tissue_values\['wm'\]\['t2_ms'\]: must be > 0, got 0.0"):
        near_pure_masks({"T1": t1, "T2": t2}, {"WM": ~gm}, {"wm": {"t1_ms": 800.0, "t2_ms": 0.0}})


def test_load_phantom_subject_adds_near_pure_masks_from_the_manifest_entry(tmp_path: Path) -> None:
    shape = (4, 1, 1)
    labels = np.full(shape, label_id("left frontal cortex"), dtype=np.int16)
    labels[3] = label_id("left frontal white matter")
    files = {"t1": "T1.nii.gz", "t2": "T2.nii.gz", "pd": "PD.nii.gz", "brain_mask": "brain_mask.nii.gz",
             "labels": "labels.nii.gz"}
    entry = {"id": "sub-001", "tissues": {"gm": {"t1_ms": 1400.0, "t2_ms": 100.0, "pd": 0.8},
                                          "wm": {"t1_ms": 800.0, "t2_ms": 70.0, "pd": 0.7}}}
    names = {str(i + 1): n for i, n in enumerate(LABEL_NAMES)}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files, "labels": names, "subjects": [entry]}))
    sub = tmp_path / "sub-001"
    sub.mkdir()
    arrays = {"t1": np.array([1400.0, 1800.0, 1420.0, 810.0]), "t2": np.array([100.0, 160.0, 99.0, 72.0]),
              "pd": np.full(4, 0.8), "brain_mask": np.ones(4), "labels": labels}
    for key, array in arrays.items():
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.int16 if key == "labels" else np.float32).reshape(shape),
                                 np.eye(4)), sub / files[key])
    masks = load_phantom_subject(tmp_path, "sub-001").tissue_masks
    assert masks["GM near-pure"].ravel().tolist() == [True, False, True, False]
    assert masks["WM near-pure"].ravel().tolist() == [False, False, False, True]
    (tmp_path / "manifest.json").write_text(json.dumps({"files": files, "labels": names}))
    assert load_phantom_subject(tmp_path, "sub-001").tissue_masks.keys() == {"GM", "WM", "CSF"}


def test_tissue_masks_from_labels() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    names = {1: "x cortex", 2: "x white matter", 3: "third ventricle", 4: "pons"}
    masks = tissue_masks_from_labels(labels, names)
    assert {k: v.tolist() for k, v in masks.items()} == {
        "WM": [False, False, True, False, False], "GM": [False, True, False, False, False],
        "CSF": [False, False, False, True, False]}
