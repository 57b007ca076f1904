"""Model packages: a folder with ``manifest.json``, ``weights.safetensors`` and ``sequence.json``, and for a
composite package a complete package of the same architecture in ``fluid/`` (its fluid network,
:mod:`pipeline.model.fluid`).

The manifest names the architecture, the channel ranges that rescale the network outputs, the
sequence hash and the exact SVD basis (stored in the weights file: a model is only valid with the basis
it was trained with), the preprocessing, a training summary, metrics and the SHA-256 of every file.
Loading verifies the checksums; :func:`check_compatible` refuses a package whose sequence or basis
does not fit a dictionary.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.model.unet import UNetConfig, UNetEnsemble
from pipeline.mrf.coefficients import CHANNEL_NAMES, CHANNEL_RANK, SIGNAL_FLOOR, channel_peaks, signal_channels
from pipeline.mrf.dictionary import Dictionary
from pipeline.mrf.sequence import Sequence, parse_sequence
from pipeline.normalise import NORMALISATIONS
from pipeline.protocol import PAPER_PROTOCOL, protocol_ranges

PACKAGE_FORMAT = "synthmrf-model/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
SEQUENCE = "sequence.json"
BASIS_KEY = "mrf_basis"
FLUID_DIR = "fluid"
FLUID_MANIFEST = f"{FLUID_DIR}/{MANIFEST}"
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
READING_NOTE_MAX = 400  # characters of printable ASCII; the results' DICOM carry it in DerivationDescription (ST)


class PackageError(ValueError):
    """A model package is malformed, corrupted or does not fit this installation."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class FluidMember:
    """A composite package's fluid network: a package of the base's architecture, sequence and basis whose
    channels replace the base's, by a weight that rises from 0 to 1 as the base's matched T2 goes from the gate's
    first to its second value (ms)."""

    package: ModelPackage
    gate_t2_ms: tuple[float, float]


@dataclass(frozen=True)
class ModelPackage:
    """A loaded, checksum-verified package."""

    path: Path
    manifest: dict[str, object]
    model: UNetEnsemble
    channel_ranges: np.ndarray  # (7, 2) min, max of each channel
    basis: np.ndarray  # (frames, 4) the SVD basis the model was trained with
    sequence: Sequence
    fluid: FluidMember | None = None

    @property
    def signal_channels(self) -> tuple[bool, ...]:
        """Per channel, whether its training targets carried signal (``channel_signal`` in the manifest; every
        channel for packages written before it was recorded). Inference skips the networks of the others."""
        doc = self.manifest.get("channel_signal")
        flags = doc.get("carries_signal") if isinstance(doc, dict) else None
        if not isinstance(flags, list) or len(flags) != len(CHANNEL_NAMES):
            return (True,) * len(CHANNEL_NAMES)
        return tuple(bool(f) for f in flags)

    @property
    def name(self) -> str:
        return f"{self.manifest['name']}-{self.manifest['version']}"

    @property
    def trained_on(self) -> dict[str, object]:
        """What the manifest records the weights were trained on, for provenance: the dataset's name, format, seed,
        subject counts and union parts, and the package they were fine-tuned from (``init_from``), without the
        subject lists; empty for a package that records none."""
        training = self.manifest.get("training")
        if not isinstance(training, dict):
            return {}
        dataset = training.get("dataset")
        doc: dict[str, object] = {k: v for k, v in dataset.items() if k != "split"} if isinstance(dataset, dict) else {}
        config = training.get("config")
        if isinstance(config, dict) and config.get("init_from"):
            doc["init_from"] = config["init_from"]
        return doc

    @property
    def reading_note(self) -> str:
        """How to read this model's maps, in one or two sentences (``reading_note`` in the manifest, checked when
        the manifest is read; empty for a package without one). Results carry it in their DICOM and provenance."""
        note = self.manifest.get("reading_note")
        return note if isinstance(note, str) else ""

    @property
    def normalisation(self) -> str:
        """How inputs are scaled (:mod:`pipeline.normalise`); packages before 0.3 divide by the maximum."""
        pre = self.manifest.get("preprocessing")
        return str(pre.get("normalisation", "max")) if isinstance(pre, dict) else "max"

    @property
    def protocol_ranges(self) -> dict[str, object]:
        """The acquisition protocols the model was trained on (:func:`pipeline.protocol.protocol_ranges`).

        Packages before 0.3 do not record them: they were trained on the paper's protocol alone.
        """
        ranges = self.manifest.get("protocol_ranges")
        if isinstance(ranges, dict):
            return ranges
        return protocol_ranges([PAPER_PROTOCOL])


def write_package(out_dir: Path, *, name: str, version: str, state: dict[str, torch.Tensor], unet: UNetConfig,
                  channel_ranges: np.ndarray, sequence_json: str, basis: np.ndarray,
                  training: dict[str, object], metrics: dict[str, object], normalisation: str = "max",
                  trained_protocols: dict[str, object] | None = None,
                  channel_signal: dict[str, object] | None = None) -> Path:
    """Write a package folder (weights in fp16; basis in fp32) and return its path. ``channel_signal``:
    :func:`channel_signal_record` of the dictionary the targets came from."""
    sequence = parse_sequence(json.loads(sequence_json))
    if basis.shape != (sequence.n_frames, CHANNEL_RANK):
        raise PackageError(f"basis: expected shape ({sequence.n_frames}, {CHANNEL_RANK}), got {basis.shape}")
    if (channel_ranges.shape != (len(CHANNEL_NAMES), 2) or not np.isfinite(channel_ranges).all()
            or np.any(channel_ranges[:, 1] <= channel_ranges[:, 0])):
        raise PackageError(f"channel_ranges: expected 7 increasing, finite (min, max) pairs, "
                           f"got {channel_ranges.tolist()}")
    if normalisation not in NORMALISATIONS:
        raise PackageError(f"normalisation: expected one of {NORMALISATIONS}, got {normalisation!r}")
    manifest: dict[str, object] = {
        "format": PACKAGE_FORMAT, "name": name, "version": version,
        "architecture": {"type": "seven-unet-ensemble", **unet.to_dict()},
        "channels": list(CHANNEL_NAMES), "channel_ranges": np.asarray(channel_ranges).tolist(),
        "sequence": {"name": sequence.name, "hash": sequence.hash()},
        "basis": {"frames": int(basis.shape[0]), "rank": CHANNEL_RANK, "key": BASIS_KEY},
        "preprocessing": {
            "grid": "axial 256x256x256, 1 mm isotropic; slices along the third axis",
            "input": "MPRAGE resampled to the grid, multiplied by the brain mask, divided by "
                     + ("its maximum in the mask" if normalisation == "max" else
                        "the 95th percentile of its brain voxels"),
            "normalisation": normalisation,
            "output": "tanh outputs in [0, 1] scaled per channel: min + (max - min) * y; phase-normalised coefficients",
        },
        "training": _untrained_as_null(training), "metrics": metrics,
        **({"protocol_ranges": trained_protocols} if trained_protocols is not None else {}),
        **({"channel_signal": channel_signal} if channel_signal is not None else {}),
    }
    try:  # strict JSON (no NaN or Infinity), which every reader parses; checked before anything is written
        json.dumps(manifest, allow_nan=False)
    except ValueError as err:
        raise PackageError(f"manifest: a training record or metric is not a finite number ({err})") from err
    out_dir.mkdir(parents=True, exist_ok=False)
    tensors = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().cpu()
               for k, v in state.items()}
    tensors[BASIS_KEY] = torch.as_tensor(np.ascontiguousarray(basis, dtype=np.float32))
    save_file(tensors, str(out_dir / WEIGHTS))
    (out_dir / WEIGHTS).chmod(0o644)  # safetensors writes 0600: the node's user must read what an admin wrote
    (out_dir / SEQUENCE).write_text(sequence_json)
    manifest["files"] = {WEIGHTS: sha256_file(out_dir / WEIGHTS), SEQUENCE: sha256_file(out_dir / SEQUENCE)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return out_dir


def _untrained_as_null(training: dict[str, object]) -> dict[str, object]:
    """``training`` with each network's best validation MSE that is not finite (a network not trained: its channel
    carries no signal; older manifests wrote Infinity) as None."""
    values = training.get("best_validation_mse")
    if not isinstance(values, list):
        return training
    return {**training, "best_validation_mse": [v if isinstance(v, int | float) and math.isfinite(v) else None
                                                for v in values]}


def channel_signal_record(dictionary: Dictionary) -> dict[str, object]:
    """The manifest's ``channel_signal``: which channels' training targets carry signal (from the dictionary the
    targets are made of; the rest are noise only), with each channel's peak relative to SV1."""
    atoms = dictionary.atoms[:, :CHANNEL_RANK]
    return {"carries_signal": list(signal_channels(atoms)),
            "peak_relative_to_SV1": [float(f"{p:.3g}") for p in channel_peaks(atoms)],
            "rule": f"a channel carries signal if some dictionary atom reaches {SIGNAL_FLOOR:g} of SV1's peak in it; "
                    "inference skips the networks of the others and gives the matcher exact zeros there"}


def read_manifest(path: Path) -> dict[str, object]:
    """The manifest of a package folder, with its format checked (an untrained network's validation MSE that an
    older package wrote as Infinity reads as None)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(f"{path}: not a model package (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise PackageError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{manifest_path}: format must be {PACKAGE_FORMAT!r}, got {manifest.get('format')!r}")
    training = manifest.get("training")
    if isinstance(training, dict):
        manifest["training"] = _untrained_as_null(training)
    note = manifest.get("reading_note")
    if note is not None:
        check_reading_note(note, manifest_path)
    return manifest


def check_reading_note(note: object, where: Path | str) -> str:
    """``note`` if it can be a package's reading note (it goes into DICOM text), else :class:`PackageError`."""
    if not (isinstance(note, str) and 0 < len(note) <= READING_NOTE_MAX and note.isascii() and note.isprintable()
            and "\\" not in note and note == note.strip()):
        raise PackageError(f"{where}: reading_note must be 1 to {READING_NOTE_MAX} characters of printable ASCII "
                           f"without a backslash or surrounding spaces, got {str(note)[:60]!r}")
    return note


def set_reading_note(path: Path, note: str) -> None:
    """Record ``note`` as the reading note of the package folder ``path`` (the manifest is not checksummed)."""
    manifest_path = path / MANIFEST
    manifest = read_manifest(path)
    manifest["reading_note"] = check_reading_note(note, "--reading-note")
    manifest_path.write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")


def verify_checksums(path: Path, manifest: dict[str, object]) -> None:
    """Raise :class:`PackageError` naming the first missing or altered file (a composite's fluid package is checked
    through its manifest, which names its own files)."""
    files = manifest.get("files")
    required = {WEIGHTS, SEQUENCE} | ({FLUID_MANIFEST} if "fluid" in manifest else set())
    if not isinstance(files, dict) or set(files) != required:
        raise PackageError(f"{path / MANIFEST}: 'files' must list {', '.join(sorted(required))} with their SHA-256")
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise PackageError(f"{path}: {name} is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise PackageError(f"{file}: checksum mismatch (expected {expected[:16]}..., got {actual[:16]}...)")


def manifest_unet_config(manifest: Mapping[str, object]) -> UNetConfig:
    """The network configuration a manifest's ``architecture`` names (keys it lacks take their defaults)."""
    arch = dict(manifest["architecture"])  # type: ignore[call-overload]
    arch.pop("type", None)
    return UNetConfig(**arch)


def load_package(path: Path, *, device: str | torch.device = "cpu") -> ModelPackage:
    """Load and verify a package folder; the model comes back in eval mode, float32, on ``device``."""
    manifest = read_manifest(path)
    verify_checksums(path, manifest)
    config = manifest_unet_config(manifest)
    tensors = load_file(str(path / WEIGHTS))
    basis = tensors.pop(BASIS_KEY).numpy()
    model = UNetEnsemble(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device).eval()
    sequence = parse_sequence(json.loads((path / SEQUENCE).read_text()))
    seq_doc = manifest["sequence"]
    if not isinstance(seq_doc, dict) or seq_doc.get("hash") != sequence.hash():
        raise PackageError(f"{path}: {SEQUENCE} does not have the hash the manifest names")
    ranges = np.asarray(manifest["channel_ranges"], dtype=np.float32)
    package = ModelPackage(path, manifest, model, ranges, basis, sequence)
    if package.normalisation not in NORMALISATIONS:
        raise PackageError(f"{path / MANIFEST}: preprocessing.normalisation must be one of {NORMALISATIONS}, "
                           f"got {package.normalisation!r}")
    if "fluid" in manifest:
        package = replace(package, fluid=_load_fluid(package, device))
    return package


def fluid_gate(doc: object) -> tuple[float, float]:
    """The gate (first, second T2 in ms) of a manifest's ``fluid`` section; :class:`PackageError` unless
    0 < first < second, both finite."""
    gate = doc.get("gate_t2_ms") if isinstance(doc, dict) else None
    if (not isinstance(gate, list) or len(gate) != 2 or not all(isinstance(v, int | float) for v in gate)
            or not 0 < gate[0] < gate[1] < math.inf):
        raise PackageError(f"fluid.gate_t2_ms: expected two increasing, positive T2 values (ms), got {gate!r}")
    return float(gate[0]), float(gate[1])


def _load_fluid(base: ModelPackage, device: str | torch.device) -> FluidMember:
    """The fluid member of composite ``base``, checked to take the same input and give the same channels."""
    gate = fluid_gate(base.manifest["fluid"])
    member = load_package(base.path / FLUID_DIR, device=device)
    if member.fluid is not None:
        raise PackageError(f"{base.path / FLUID_DIR}: a fluid package cannot itself have one")
    if member.sequence.hash() != base.sequence.hash() or not np.allclose(member.basis, base.basis, atol=1e-6):
        raise PackageError(f"{base.path / FLUID_DIR}: its MRF sequence or SVD basis differs from the base's")
    if (member.model.config != base.model.config or member.normalisation != base.normalisation
            or member.signal_channels != base.signal_channels):
        raise PackageError(f"{base.path / FLUID_DIR}: its architecture, input normalisation or signal channels "
                           "differ from the base's")
    return FluidMember(member, gate)


def check_compatible(package: ModelPackage, dictionary: Dictionary) -> None:
    """Refuse a package whose sequence or SVD basis differs from ``dictionary``'s."""
    if dictionary.sequence_hash != package.sequence.hash():
        raise PackageError(f"{package.name}: trained for sequence {package.sequence.hash()[:12]}, the dictionary is "
                           f"for {dictionary.sequence_hash[:12]}")
    theirs = dictionary.basis[:, :CHANNEL_RANK]
    if theirs.shape != package.basis.shape or not np.allclose(theirs, package.basis, atol=1e-4):
        raise PackageError(f"{package.name}: its SVD basis differs from the installed dictionary's (sign or "
                           "subspace); the model only works with the basis it was trained with")
