"""Geometry check of independent-phantom subjects: the MPRAGE vs the truth in patient space.

Per subject folder: synthmrf's own DICOM series reader (its grid) vs mprage.nii.gz's affine, and the
MPRAGE (from mprage.nii.gz) resampled onto the truth grid vs the truth's R1 and WM mask (correlations, best
integer shift per axis). Prints one line per subject; with ``--png-dir``, also a PNG of the mid slices.

Usage (from the repository root): ``python -m research.indep_phantom.check_geometry SUBDIR... [--png-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.dicom_series import read_series


def load_nifti(path: Path) -> nib.Nifti1Image:
    """A NIfTI-1 image (TypeError for anything else)."""
    img = nib.load(path)
    if not isinstance(img, nib.Nifti1Image):
        raise TypeError(f"{path}: expected a NIfTI-1 image, got {type(img).__name__}")
    return img


def resample(vol: np.ndarray, aff_src: np.ndarray, shape: tuple[int, ...], aff_dst: np.ndarray) -> np.ndarray:
    """``vol`` (voxel -> world ``aff_src``) on the grid ``shape`` / ``aff_dst``, trilinear."""
    m = np.linalg.inv(aff_src) @ aff_dst
    return ndimage.affine_transform(vol.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=1)


def check(sub: Path, png: Path | None = None) -> dict[str, object]:
    """Correlations of the resampled MPRAGE with the truth's R1 and WM mask; best shift (voxels) per axis."""
    t1_img = load_nifti(sub / "T1.nii.gz")
    t1 = np.asarray(t1_img.dataobj)
    affine = t1_img.affine
    mask = np.asarray(load_nifti(sub / "brain_mask.nii.gz").dataobj) > 0
    mp = load_nifti(sub / "mprage.nii.gz")
    on = resample(mp.get_fdata(dtype=np.float32), mp.affine, t1.shape, affine)
    out: dict[str, object] = {}
    wm = mask & (t1 > 0) & (t1 < np.percentile(t1[mask], 25))
    # correlation of MPRAGE with the truth's 1/T1 (brightness ~ short T1) inside a dilated brain mask
    region = ndimage.binary_dilation(mask, iterations=3)
    r1 = np.where(t1 > 0, 1000.0 / np.maximum(t1, 1), 0)
    out["corr_mprage_vs_R1_brain"] = float(np.corrcoef(on[region], r1[region])[0, 1])
    out["corr_mprage_vs_wmmask_brain"] = float(np.corrcoef(on[region], wm[region].astype(float))[0, 1])
    # shift test: the correlation should peak at zero shift
    best = {}
    for ax in range(3):
        cs = [float(np.corrcoef(np.roll(on, s, axis=ax)[region], r1[region])[0, 1]) for s in range(-3, 4)]
        best[f"axis{ax}"] = int(np.argmax(cs) - 3)
    out["best_shift_vox"] = best
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        f, axes = plt.subplots(2, 3, figsize=(12, 8))
        c = np.array(t1.shape) // 2
        planes = [(on[:, :, c[2]], t1[:, :, c[2]], wm[:, :, c[2]]), (on[:, c[1], :], t1[:, c[1], :], wm[:, c[1], :]),
                  (on[c[0]], t1[c[0]], wm[c[0]])]
        for i, (a, b, w) in enumerate(planes):
            axes[0, i].imshow(np.rot90(a), cmap="gray")
            axes[1, i].imshow(np.rot90(b), cmap="magma", vmax=2500)
            axes[0, i].contour(np.rot90(w), [0.5], colors="r", linewidths=0.4)
        plt.tight_layout()
        plt.savefig(png, dpi=70)
        plt.close(f)
    return out


def dicom_vs_nifti(sub: Path) -> dict[str, object]:
    """synthmrf's own DICOM series reader: its grid vs mprage.nii.gz's affine (max abs difference, mm)."""
    s = read_series(sub / "mprage_dicom")
    nii = load_nifti(sub / "mprage.nii.gz")
    return {"shape_dicom": list(s.grid.shape), "shape_nii": list(nii.shape),
            "max_affine_diff": float(np.abs(s.grid.ras_affine - nii.affine).max())}


def main() -> None:
    """Command line: check each subject folder."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("subjects", type=Path, nargs="+", help="subject folders (OUT/sub-XXX)")
    ap.add_argument("--png-dir", type=Path, help="write geom-<subject>.png of the mid slices here")
    args = ap.parse_args()
    if args.png_dir is not None:
        args.png_dir.mkdir(parents=True, exist_ok=True)
    for sub in args.subjects:
        png = args.png_dir / f"geom-{sub.name}.png" if args.png_dir is not None else None
        print(sub, json.dumps(dicom_vs_nifti(sub)), json.dumps(check(sub, png)))


if __name__ == "__main__":
    main()
