"""Phantom datasets: the CLI, the layout and manifest, determinism, contrast, and the full-size grids."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from scipy import ndimage

from dicom_node.commands.phantom import phantom
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, load_sequence
from training.phantom.dataset import make_dataset, split_subjects
from training.phantom.regions import label_id
from training.phantom.subject import FILES, PhantomOptions

NIFTI_KEYS = ("mprage", "t1", "t2", "pd", "brain_mask", "labels", "mrf")


@pytest.fixture(scope="module")
def fast_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "ds"
    result = CliRunner().invoke(phantom, ["make", "--subjects", "2", "--out", str(out), "--seed", "7", "--fast"])
    assert result.exit_code == 0, result.output
    return out


def _nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    return img


def _load(folder: Path, key: str) -> np.ndarray:
    return np.asarray(_nifti(folder / FILES[key]).dataobj)


def _tissue_means(folder: Path) -> dict[str, float]:
    """Mean MPRAGE pixel value in WM, cortex and lateral ventricles (labels resampled to the MPRAGE grid)."""
    mprage = _nifti(folder / FILES["mprage"])
    labels = _nifti(folder / FILES["labels"])
    to_labels = np.linalg.inv(labels.affine) @ mprage.affine
    ijk = np.indices(mprage.shape).astype(np.float64).reshape(3, -1)
    lab = ndimage.map_coordinates(np.asarray(labels.dataobj), to_labels[:3, :3] @ ijk + to_labels[:3, 3:], order=0)
    image = np.asarray(mprage.dataobj, dtype=np.float64).ravel()
    groups = {
        "wm": [label_id(f"{s} {lobe} white matter") for s in ("left", "right") for lobe in ("frontal", "parietal")],
        "gm": [label_id(f"{s} {lobe} cortex") for s in ("left", "right") for lobe in ("frontal", "parietal")],
        "csf": [label_id(f"{s} lateral ventricle") for s in ("left", "right")],
    }
    return {name: float(image[np.isin(lab, ids)].mean()) for name, ids in groups.items()}


def test_cli_writes_the_layout_and_manifest(fast_dataset: Path) -> None:
    manifest = json.loads((fast_dataset / "manifest.json").read_text())
    assert manifest["format"] == "synthmrf-phantom/1" and manifest["seed"] == 7
    sequence = load_sequence(DEFAULT_SEQUENCE)
    assert manifest["sequence"] == {"name": sequence.name, "hash": sequence.hash(), "rank": 4}
    assert manifest["split"] == {"train": ["sub-001"], "val": [], "test": ["sub-002"]} or sorted(
        manifest["split"]["train"] + manifest["split"]["test"]
    ) == ["sub-001", "sub-002"]
    assert len(manifest["labels"]) == 47
    for entry in manifest["subjects"]:
        folder = fast_dataset / entry["id"]
        assert set(entry["tissues"]) == {"wm", "gm", "deep_gm", "csf", "scalp", "lesion"}  # v1: lesion = WM, unused
        assert entry["split"] in ("train", "val", "test")
        assert len(list((folder / FILES["mprage_dicom"]).glob("*.dcm"))) == 75
        for key in NIFTI_KEYS:
            assert (folder / FILES[key]).is_file(), key
        coeffs = _load(folder, "mrf")
        assert coeffs.dtype == np.complex64 and coeffs.shape == (128, 128, 128, 4)
        sv1 = coeffs[..., 0]
        assert np.abs(sv1.imag).max() < 1e-5 * np.abs(sv1.real).max() and sv1.real.min() >= 0
        t1, mask = _load(folder, "t1"), _load(folder, "brain_mask").astype(bool)
        wm = entry["tissues"]["wm"]["t1_ms"]
        assert 0.7 * wm < np.median(t1[mask]) < 2.0 * wm


def test_mprage_contrast_wm_gm_csf(fast_dataset: Path) -> None:
    for folder in sorted(fast_dataset.glob("sub-*")):
        m = _tissue_means(folder)
        print(
            f"{folder.name}: MPRAGE WM {m['wm']:.0f}, GM {m['gm']:.0f}, CSF {m['csf']:.0f}; "
            f"WM/GM {m['wm'] / m['gm']:.2f}, GM/CSF {m['gm'] / m['csf']:.2f}"
        )
        assert m["wm"] > 1.2 * m["gm"] > 1.2 * m["csf"]


def test_same_seed_gives_identical_arrays(fast_dataset: Path, tmp_path: Path) -> None:
    options = PhantomOptions(downsample=2)
    again = make_dataset(1, tmp_path / "again", seed=7, options=options, progress=False).parent
    other = make_dataset(1, tmp_path / "other", seed=8, options=options, progress=False).parent
    for key in NIFTI_KEYS:
        first = _load(fast_dataset / "sub-001", key)
        np.testing.assert_array_equal(first, _load(again / "sub-001", key), err_msg=key)
        if key not in ("brain_mask", "labels"):
            assert not np.array_equal(first, _load(other / "sub-001", key)), key
    files = sorted((fast_dataset / "sub-001" / FILES["mprage_dicom"]).glob("*.dcm"))
    twins = sorted((again / "sub-001" / FILES["mprage_dicom"]).glob("*.dcm"))
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in twins]


def test_split_follows_the_paper_proportions() -> None:
    ids = [f"sub-{i:03d}" for i in range(1, 38)]
    split = split_subjects(ids, seed=0)
    assert {k: len(v) for k, v in split.items()} == {"train": 30, "val": 2, "test": 5}
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    assert split == split_subjects(ids, seed=0) and split != split_subjects(ids, seed=1)


def test_split_sizes_can_be_chosen() -> None:
    ids = [f"sub-{i:03d}" for i in range(1, 61)]
    split = split_subjects(ids, seed=3, n_val=6, n_test=8)
    assert {k: len(v) for k, v in split.items()} == {"train": 46, "val": 6, "test": 8}
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    assert split_subjects(ids, seed=3, n_val=0, n_test=0)["train"] == ids
    with pytest.raises(ValueError, match="leave no training subject of 60"):
        split_subjects(ids, seed=3, n_val=30, n_test=30)


def test_make_dataset_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"n_subjects: must be >= 1, got 0"):
        make_dataset(0, tmp_path)
    with pytest.raises(ValueError, match=r"workers: must be >= 1, got 0"):
        make_dataset(1, tmp_path, workers=0)
    with pytest.raises(ValueError, match="leave no training subject"):
        make_dataset(4, tmp_path, n_val=2, n_test=2)
    assert not (tmp_path / "sub-001").exists()


@pytest.mark.slow
def test_full_resolution_subject(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_dataset(1, tmp_path, seed=3, options=PhantomOptions(), progress=False)
    elapsed = time.perf_counter() - start
    folder = tmp_path / "sub-001"
    print(f"full-resolution subject: {elapsed:.1f} s")
    assert _nifti(folder / FILES["mrf"]).shape == (256, 256, 256, 4)
    for key in ("t1", "t2", "pd", "brain_mask", "labels"):
        img = _nifti(folder / FILES[key])
        assert img.shape == (256, 256, 256)
        np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 1.0)
    mprage = _nifti(folder / FILES["mprage"])
    assert mprage.shape == (192, 192, 150)
    files = sorted((folder / FILES["mprage_dicom"]).glob("*.dcm"))
    assert len(files) == 150
    ds = pydicom.dcmread(files[0])
    assert (ds.Rows, ds.Columns) == (192, 192)
    assert [float(v) for v in ds.PixelSpacing] == [1.25, 1.25] and float(ds.SliceThickness) == 1.2
    assert [round(float(v)) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    m = _tissue_means(folder)
    print(f"full resolution: WM/GM {m['wm'] / m['gm']:.2f}, GM/CSF {m['gm'] / m['csf']:.2f}")
    assert m["wm"] > 1.2 * m["gm"] > 1.2 * m["csf"]
    labels = np.asarray(_nifti(folder / FILES["labels"]).dataobj)
    assert set(np.unique(labels)) == set(range(48))


@pytest.mark.slow
def test_expected_mrf_target_changes_only_the_mrf(tmp_path: Path) -> None:
    """``--mrf-target expected`` (world v2): the same MPRAGE, truth maps and settings otherwise; the MRF differs, and
    old folders (made before the option) keep their settings."""
    made = {}
    for target in ("subject", "expected"):
        result = CliRunner().invoke(phantom, ["make", "--subjects", "1", "--out", str(tmp_path / target), "--seed",
                                              "5", "--fast", "--world", "v2", "--mrf-target", target])
        assert result.exit_code == 0, result.output
        made[target] = tmp_path / target / "sub-001"
    for key in ("mprage", "t1", "t2", "pd", "brain_mask", "labels"):
        np.testing.assert_array_equal(_load(made["subject"], key), _load(made["expected"], key), err_msg=key)
    subject_mrf, expected_mrf = _load(made["subject"], "mrf"), _load(made["expected"], "mrf")
    brain = _load(made["subject"], "brain_mask") > 0
    change = np.abs(expected_mrf[brain] - subject_mrf[brain]).sum(axis=-1) / np.abs(subject_mrf[brain]).sum(axis=-1)
    assert np.median(change) > 0.01
    settings = {t: json.loads((tmp_path / t / "settings.json").read_text())["options"] for t in made}
    assert "mrf_target" not in settings["subject"] and settings["expected"]["mrf_target"] == "expected"
    refused = CliRunner().invoke(phantom, ["make", "--subjects", "1", "--out", str(tmp_path / "v1"), "--fast",
                                           "--mrf-target", "expected"])
    assert refused.exit_code != 0 and "needs world v2, v3 or v4" in refused.output
