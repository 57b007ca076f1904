"""Training-data harvest from a real Orthanc: phantom MPRAGE + MRF SVD (in the documented DICOM form) in,
the dataset layout 'synthmrf train' reads out, equal to what went in, geometry included."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from node_support import free_port, mr_datasets
from retro_support import HARVEST_AET, NODE_AET, ArchiveOrthanc, config_toml, distractors, retro_config

from dicom_node.cli import cli
from dicom_node.retro.harvest import Harvester, HarvestSpec, harvest_key, patient_group, subject_id
from dicom_node.retro.progress import ProgressStore, RunState
from pipeline.mrf.svd_dicom import MrfFormatError, read_mrf_series, write_mrf_series
from pipeline.volume_io import load_volume
from training.harvested import FILES, HarvestedDataset


@pytest.fixture(scope="module")
def harvest_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path, harvest_port: int
            ) -> Iterator[ArchiveOrthanc]:
    """sub-001: MPRAGE + MRF SVD series (+ distractors); sub-002: MPRAGE only; sub-003 absent."""
    folder = tmp_path_factory.mktemp("harvest-archive")
    orthanc = ArchiveOrthanc(folder, {NODE_AET: ("127.0.0.1", free_port()), HARVEST_AET: ("127.0.0.1", harvest_port)})
    orthanc.start()
    try:
        manifest = json.loads((tiny_dataset / "manifest.json").read_text())
        for sid in ("sub-001", "sub-002"):
            mprage = sorted((tiny_dataset / sid / "mprage_dicom").glob("*.dcm"))
            orthanc.upload(mprage)
            if sid == "sub-001":
                source = pydicom.dcmread(mprage[0], stop_before_pixels=True)
                coeffs, affine = load_volume(tiny_dataset / sid / "mrf_svd.nii.gz")
                mrf = write_mrf_series(coeffs, affine, source, folder / "mrf",
                                       sequence_hash=manifest["sequence"]["hash"],
                                       sequence_name=manifest["sequence"]["name"])
                extra, _ = distractors(folder / "distractors", patient_id=str(source.PatientID),
                                       study_uid=str(source.StudyInstanceUID), seed=1)
                orthanc.upload([*mrf, *extra])
        yield orthanc
    finally:
        orthanc.stop()


def test_mrf_dicom_form_round_trip_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    coeffs = (rng.standard_normal((6, 5, 4, 4)) + 1j * rng.standard_normal((6, 5, 4, 4))).astype(np.complex64)
    affine = np.array([[-1.5, 0.1, 0.0, 90.0], [0.0, -1.5, 0.2, 110.0], [0.0, 0.0, 2.0, -70.0], [0, 0, 0, 1]])
    source = mr_datasets(1, 8)[0]
    files = write_mrf_series(coeffs, affine, source, tmp_path / "mrf", sequence_hash="a" * 64)
    assert len(files) == 8
    back = read_mrf_series(files)
    assert np.array_equal(back.coefficients, coeffs)
    assert np.allclose(back.affine, affine, atol=1e-4)
    assert (back.sequence_hash, back.rank, back.frame_of_reference_uid) == ("a" * 64, 4,
                                                                              source.FrameOfReferenceUID)
    with pytest.raises(MrfFormatError, match=r"instances missing: \['MRF_SV4_IM'\]"):
        read_mrf_series(files[:-1])
    with pytest.raises(ValueError, match="sequence_hash: expected 64 lowercase hex"):
        write_mrf_series(coeffs, affine, source, tmp_path / "bad", sequence_hash="abc")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.mark.slow
def test_harvest_round_trip_with_c_get(tmp_path: Path, archive: ArchiveOrthanc, tiny_dataset: Path,
                                       harvest_port: int) -> None:
    cfg = retro_config(tmp_path / "node", node_port=free_port(), sources=[archive.source(retrieve="get")],
                       retro={"harvest_port": harvest_port})
    config_file = config_toml(cfg, tmp_path / "synthmrf.toml")
    out = tmp_path / "dataset"
    args = ["retro", "harvest", "--config", str(config_file), "--source", "archive", "--out", str(out),
            "--query", "PatientID=SMRF*"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    phantom = json.loads((tiny_dataset / "manifest.json").read_text())
    study = next(s["study_instance_uid"] for s in phantom["subjects"] if s["id"] == "sub-001")
    sid = subject_id(study)
    assert f"subject  {sid}" in result.output and "1 subjects harvested" in result.output, result.output

    truth = tiny_dataset / "sub-001"
    coeffs, affine = load_volume(out / sid / FILES["mrf"])
    true_coeffs, true_affine = load_volume(truth / "mrf_svd.nii.gz")
    assert coeffs.dtype == np.complex64 and np.array_equal(coeffs, true_coeffs)
    assert np.allclose(affine, true_affine, atol=1e-4)
    mprage, mprage_affine = load_volume(out / sid / FILES["mprage"])
    true_mprage, true_mprage_affine = load_volume(truth / "mprage.nii.gz")
    assert np.array_equal(mprage, true_mprage)
    assert np.allclose(mprage_affine, true_mprage_affine, atol=1e-3)
    mask, mask_affine = load_volume(out / sid / FILES["brain_mask"])
    true_mask, _ = load_volume(truth / "brain_mask.nii.gz")
    assert mask.shape == coeffs.shape[:3] and np.allclose(mask_affine, true_affine, atol=1e-4)
    assert dice(mask > 0, true_mask > 0) > 0.8

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sequence"] == phantom["sequence"]
    assert manifest["split"]["train"] == [sid] and [s["id"] for s in manifest["subjects"]] == [sid]
    assert not (Path(cfg.node.storage_dir) / "series").exists()  # nothing went to the node

    from training.preprocess import load_dataset

    dataset = load_dataset(out, tmp_path / "cache")
    assert dataset.sequence_hash == phantom["sequence"]["hash"]
    assert len(dataset.subjects["train"]) == 1 and dataset.subjects["train"][0].inputs.shape[0] > 0

    again = CliRunner().invoke(cli, [*args, "--json"])
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["harvested"] == [] and report["skipped"]["already harvested"] == 1


def test_harvest_with_c_move_to_its_own_scp_and_dry_run(tmp_path: Path, archive: ArchiveOrthanc, tiny_dataset: Path,
                                                        harvest_port: int, caplog: pytest.LogCaptureFixture) -> None:
    cfg = retro_config(tmp_path / "node", node_port=free_port(), sources=[archive.source(retrieve="move")],
                       retro={"harvest_port": harvest_port})
    progress = ProgressStore.open(cfg.node.storage_dir)
    out = tmp_path / "dataset"

    def threshold_mask(mprage: np.ndarray, mprage_affine: np.ndarray, shape: tuple[int, int, int],
                       affine: np.ndarray) -> np.ndarray:
        return np.ones(shape, dtype=bool)

    harvester = Harvester(cfg, progress, HarvestedDataset(mask=threshold_mask))
    dry = harvester.run(HarvestSpec("archive", out, {"PatientID": "SMRF*"}, dry_run=True))
    assert dry.state is RunState.FINISHED and len(dry.pairs) == 1 and dry.harvested == []
    assert dry.skipped == {"no MPRAGE and MRF pair": 1} and not out.exists()
    caplog.set_level(logging.INFO)
    report = harvester.run(HarvestSpec("archive", out, {"PatientID": "SMRF*"}))
    assert report.state is RunState.FINISHED, report.summary()
    [sid] = report.harvested
    # split by patient: the group is a keyed hash of the PatientID, which is written nowhere
    source = pydicom.dcmread(next((tiny_dataset / "sub-001" / "mprage_dicom").glob("*.dcm")), stop_before_pixels=True)
    patient_id = str(source.PatientID)
    manifest = json.loads((out / "manifest.json").read_text())
    info = json.loads((out / sid / "subject.json").read_text())
    assert info["group"] == patient_group(patient_id, "", harvest_key(cfg.node.storage_dir))
    assert "group_salt" not in manifest  # the key stays with the node, never in the dataset
    assert manifest["split"]["train"] == [sid] and manifest["subjects"][0]["group"] == info["group"]
    written = [p.read_text() for p in out.rglob("*.json")]
    assert not [text for text in written if patient_id in text] and patient_id not in caplog.text
    again = harvester.run(HarvestSpec("archive", out, {"PatientID": "SMRF*"}))
    assert again.skipped.get("already harvested") == 1 and again.harvested == []
    coeffs, _ = load_volume(out / sid / FILES["mrf"])
    true_coeffs, _ = load_volume(tiny_dataset / "sub-001" / "mrf_svd.nii.gz")
    assert np.array_equal(coeffs, true_coeffs)
    assert not list((out / ".incoming").glob("*/*.dcm"))  # the DICOM files are not kept
    progress.close()
