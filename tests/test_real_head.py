"""A real head, not a phantom: Colin27 (Debian's mricron-data, 1 mm, with skull) through `synthmrf process`.

Colin27 is 27 averaged 1.5 T T1-weighted scans in MNI space, so MNI152 probability maps mark its
tissues well enough for medians. Independent expectations: WM < GM < CSF in T1 and in T2 (every
relaxometry study), and values inside broad literature ranges for 1.5 T (WM T1 about 650, GM about
1190 ms, Rooney 2007; CSF T1 > 3000 ms; WM/GM T2 50-130 ms), with the quality map good in the brain.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from nilearn import datasets, image

from dicom_node.cli import cli
from pipeline.geometry import resample_to_grid
from pipeline.regions import report_regions, template_regions
from pipeline.volume_io import load_volume

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")


@pytest.mark.slow
def test_colin27_maps_are_ordered_and_plausible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert COLIN27.is_file(), "Colin27 is required (apt-get install mricron-data)"
    out = tmp_path / "colin"
    result = CliRunner().invoke(cli, ["process", str(COLIN27), "--out", str(out), "--field-strength", "1.5"])
    assert result.exit_code == 0, result.output
    t1_img = image.load_img(str(out / "T1.nii.gz"))
    gm = image.resample_to_img(datasets.load_mni152_gm_template(resolution=1), t1_img).get_fdata()
    wm = image.resample_to_img(datasets.load_mni152_wm_template(resolution=1), t1_img).get_fdata()
    brain = image.resample_to_img(datasets.load_mni152_brain_mask(resolution=1), t1_img,
                                  interpolation="nearest").get_fdata() > 0.5
    maps = {q: load_volume(out / f"{q}.nii.gz")[0] for q in ("T1", "T2", "Q")}
    tissues = {"WM": wm > 0.95, "GM": (gm > 0.8) & (wm < 0.1), "CSF": brain & (gm < 0.05) & (wm < 0.05)}
    median = {t: {q: float(np.median(maps[q][m & (maps["T1"] > 0)])) for q in maps} for t, m in tissues.items()}
    with capsys.disabled():
        print("\nColin27 medians:", {t: {q: round(v, 3) for q, v in d.items()} for t, d in median.items()})
    for q in ("T1", "T2"):
        assert median["WM"][q] < median["GM"][q] < median["CSF"][q], q
    assert 500 < median["WM"]["T1"] < 1000 and 900 < median["GM"]["T1"] < 1600 and median["CSF"]["T1"] > 2500
    assert 50 < median["WM"]["T2"] < 110 and 60 < median["GM"]["T2"] < 140
    assert median["WM"]["Q"] > 0.9 and median["GM"]["Q"] > 0.9
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["acquisition"]["field_strength_t"] == 1.5 and provenance["quality"]["ok"]

    # Regions: AAL3 was drawn on Colin27 itself, so the atlas placed directly (Colin27 lies in MNI space) is an
    # independent reference for where the pipeline's registration chain carried it.
    ours, ours_affine = load_volume(out / "regions.nii.gz")
    atlas, atlas_affine = template_regions()
    direct = resample_to_grid(atlas.astype(np.float32), atlas_affine, ours.shape, ours_affine, order=0)
    rows = {r["region"]: r for r in csv.DictReader((out / "regions.csv").open())}
    agreement = {}
    for region in report_regions():
        inside = ours.astype(int) == region.label
        assert inside.sum() >= 50, f"{region.name}: {int(inside.sum())} voxels"
        agreement[region.name] = float(np.mean(direct[inside] == region.label))
    with capsys.disabled():
        print("Colin27 regions on the atlas's own labels:", {k: round(v, 2) for k, v in agreement.items()})
    assert np.median(list(agreement.values())) > 0.8 and min(agreement.values()) > 0.5, agreement
    t1 = {name: float(row["T1_mean"]) for name, row in rows.items()}
    assert t1["Cerebral white matter"] < min(t1["Frontal lobe"], t1["Temporal lobe"], t1["Occipital lobe"])
    for structure in ("Thalamus", "Putamen", "Frontal lobe", "Cerebral white matter"):  # a head is near symmetric
        assert abs(t1[f"{structure} left"] / t1[f"{structure} right"] - 1) < 0.1, structure
