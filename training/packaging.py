"""Turning a training run into a model package (weights, channel ranges, basis, provenance, metrics)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from pipeline.model.package import channel_signal_record, write_package
from pipeline.model.unet import UNetConfig
from pipeline.mrf.coefficients import CHANNEL_NAMES
from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.sequence import find_sequence_file, load_sequence
from pipeline.protocol import protocol_ranges
from training.preprocess import manifest_entries, subject_protocol
from training.train import CHECKPOINT, METRICS

WEIGHT_CHOICES = ("best", "last")


def package_run(run_dir: Path, dataset_dir: Path, out_dir: Path, *, name: str, version: str,
                metrics: dict[str, object] | None = None, weights: str = "best") -> Path:
    """Package ``run_dir/best.pt`` (``weights="best"``: per network its best validation epoch) or the last epoch's
    weights of ``run_dir/checkpoint.pt`` (``"last"``) with the basis of the dataset's sequence; returns the
    package folder."""
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights: expected one of {WEIGHT_CHOICES}, got {weights!r}")
    best_path = run_dir / "best.pt"
    if not best_path.is_file():
        raise FileNotFoundError(f"{best_path}: no best weights (has the run finished an epoch?)")
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    state, chosen = best["state"], [float(v) for v in best["best_val"]]
    if weights == "last":
        saved = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        if int(saved["epoch"]) != int(best["epoch"]):
            raise ValueError(f"{run_dir}: {CHECKPOINT} (epoch {saved['epoch']}) and best.pt (epoch {best['epoch']}) "
                             "disagree; is the run still training?")
        state = saved["model"]
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    seq_doc = manifest.get("sequence", {})
    sequence = load_sequence(seq_doc.get("name", ""))
    if sequence.hash() != seq_doc.get("hash"):
        raise ValueError(f"{dataset_dir}: made with sequence hash {str(seq_doc.get('hash'))[:12]}, but "
                         f"{sequence.name} now hashes to {sequence.hash()[:12]}")
    dictionary = load_or_build_dictionary(sequence, rank=4)
    config = json.loads((run_dir / "train_config.json").read_text())
    history = list(csv.DictReader((run_dir / METRICS).open()))
    training = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": {"path_name": dataset_dir.name, "format": manifest.get("format"), "seed": manifest.get("seed"),
                    "subjects": {k: len(v) for k, v in manifest["split"].items()}, "split": manifest["split"],
                    **({"union_of": [{"prefix": u.get("prefix"), "seed": u.get("seed")} for u in manifest["union_of"]]}
                       if isinstance(manifest.get("union_of"), list) else {})},
        "config": config,
        "epochs_trained": int(best["epoch"]),
        "iterations": int(best["epoch"]) * int(config["iterations_per_epoch"]),
        "iterations_per_s": float(np.median([float(r["iterations_per_s"]) for r in history])) if history else None,
        "best_validation_mse": chosen,  # inf (not trained) is written as null
        "checkpoint": CHECKPOINT,
        "weights": "per network, its best validation epoch" if weights == "best" else "the last epoch's",
    }
    if weights == "last" and history:
        last = [float(history[-1][f"val_{c}"]) for c in CHANNEL_NAMES]
        training["last_validation_mse"] = [v if np.isfinite(v) else None for v in last]  # nan: not trained
    entries = manifest_entries(manifest)
    trained = protocol_ranges([subject_protocol(entries.get(sid, {})) for sid in manifest["split"]["train"]])
    sequence_json = find_sequence_file(seq_doc.get("name", "")).read_text()
    return write_package(out_dir, name=name, version=version, state=state, unet=UNetConfig(**best["unet"]),
                         channel_ranges=np.asarray(best["channel_ranges"]), sequence_json=sequence_json,
                         basis=dictionary.basis[:, :4], training=training, metrics=metrics or {},
                         normalisation=str(config.get("normalisation", "max")), trained_protocols=trained,
                         channel_signal=channel_signal_record(dictionary))

