"""Packages made of other packages of one architecture, sequence and basis: networks lifted from several
packages (:func:`combine_packages`), the weights of a model and its fine-tune interpolated
(:func:`interpolate_packages`), or a model with a fluid network beside it (:func:`attach_fluid`).

The seven networks share no weights (grouped convolutions, :mod:`pipeline.model.unet`), and each one's
output is rescaled by its own channel range, so a network can be lifted out of one package into another
unchanged: the combined package gives, channel for channel, exactly what its source gave. Training keeps
each network's best validation epoch on its own, so a run may improve some channels and worsen others;
combining keeps the better ones. The manifest names the source of every channel and, as the protocol ranges
a series is judged against, the intersection of the sources' ranges: every network has seen them.

Interpolation is weight-space ensembling (WiSE-FT, Wortsman et al., CVPR 2022): fine-tuning on one world can
gain there and lose on data it never saw; the weights on the line between a model and its fine-tune often
keep much of the gain and recover the robustness. It needs the same channel ranges (the fine-tune keeps its
parent's, ``synthmrf train --init-from``), since the networks' outputs are scaled by them. Its protocol
ranges are the union of the two: the fine-tune descends from the other model, so the lineage saw both.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.model.package import (
    BASIS_KEY,
    FLUID_DIR,
    FLUID_MANIFEST,
    MANIFEST,
    SEQUENCE,
    WEIGHTS,
    PackageError,
    fluid_gate,
    manifest_unet_config,
    read_manifest,
    sha256_file,
    verify_checksums,
    write_package,
)
from pipeline.model.unet import network_slice
from pipeline.mrf.coefficients import CHANNEL_NAMES
from pipeline.protocol import RANGED_FIELDS


def resolve_channels(spec: str) -> list[int]:
    """Network indices named by ``spec``: a channel (``SV4_re``) or a singular vector (``SV4``: all its channels)."""
    key = spec.strip()
    exact = [i for i, name in enumerate(CHANNEL_NAMES) if name.lower() == key.lower()]
    if exact:
        return exact
    vector = [i for i, name in enumerate(CHANNEL_NAMES) if name.split("_")[0].lower() == key.lower()]
    if not vector:
        choices = sorted({n.split("_")[0] for n in CHANNEL_NAMES}) + list(CHANNEL_NAMES)
        raise PackageError(f"channel {spec!r}: expected one of {', '.join(choices)}")
    return vector


def _load(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """A package's manifest and weights, checked; a composite package (with a fluid network) is refused: the
    result would silently lose its fluid network."""
    manifest = read_manifest(path)
    verify_checksums(path, manifest)
    if "fluid" in manifest:
        raise PackageError(f"{_label(manifest)}: has a fluid network; combine its base and fluid packages instead")
    return manifest, load_file(str(path / WEIGHTS))


def _dict_or_none(value: object) -> dict[str, object] | None:
    return value if isinstance(value, dict) else None


def _protocol_ranges(manifest: Mapping[str, object]) -> dict[str, object] | None:
    return _dict_or_none(manifest.get("protocol_ranges"))


def _label(manifest: Mapping[str, object]) -> str:
    return f"{manifest.get('name')}-{manifest.get('version')}"


def _check_same(base: Mapping[str, object], other: Mapping[str, object], base_w: Mapping[str, torch.Tensor],
                other_w: Mapping[str, torch.Tensor]) -> None:
    """Refuse a source that differs from the base in anything but its weights and channel ranges."""
    who = _label(other)
    theirs, ours = manifest_unet_config(other), manifest_unet_config(base)
    if theirs != ours:
        raise PackageError(f"{who}: its architecture differs from the base's ({theirs} vs {ours})")
    for key, what in (("sequence", "MRF sequence"), ("channels", "channels")):
        if base.get(key) != other.get(key):
            raise PackageError(f"{who}: its {what} differs from the base's ({other.get(key)} vs {base.get(key)})")
    norm = [dict(m.get("preprocessing", {})).get("normalisation") for m in (base, other)]  # type: ignore[call-overload]
    if norm[0] != norm[1]:
        raise PackageError(f"{who}: input normalisation {norm[1]!r}, the base's is {norm[0]!r}")
    if not torch.equal(base_w[BASIS_KEY], other_w[BASIS_KEY]):
        raise PackageError(f"{who}: its SVD basis differs from the base's")
    if set(base_w) != set(other_w):
        raise PackageError(f"{who}: its weights hold other tensors than the base's")


def intersect_ranges(ranges: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The protocol ranges every one of ``ranges`` covers (families and fields in all; numeric overlaps)."""
    out: dict[str, object] = {}
    for key in ("families", "field_strengths_t"):
        common = set.intersection(*(set(r.get(key, [])) for r in ranges))  # type: ignore[call-overload]
        if not common:
            raise PackageError(f"protocol ranges: the sources share no {key}")
        out[key] = sorted(common)
    for name in RANGED_FIELDS[1:]:
        spans = [r.get(name) for r in ranges]
        if not all(isinstance(s, list) and len(s) == 2 for s in spans):
            continue
        lo, hi = max(float(s[0]) for s in spans), min(float(s[1]) for s in spans)  # type: ignore[index]
        if lo > hi:
            raise PackageError(f"protocol ranges: the sources' {name} ranges do not overlap")
        out[name] = [lo, hi]
    return out


def combine_packages(base_dir: Path, takes: Mapping[str, Path], out_dir: Path, *, name: str, version: str,
                     metrics: dict[str, object] | None = None) -> Path:
    """Write ``out_dir``: the package ``base_dir`` with the networks of each channel spec in ``takes`` (see
    :func:`resolve_channels`) taken from the package folder it maps to, and ``metrics`` (e.g. an evaluation of
    the combination) in its manifest. Returns ``out_dir``."""
    if out_dir.exists():
        raise PackageError(f"{out_dir}: already exists")
    base, weights = _load(base_dir)
    ranges = np.asarray(base["channel_ranges"], dtype=np.float32)
    sources = {i: (_label(base), str(base["files"][WEIGHTS])) for i in range(len(CHANNEL_NAMES))}  # type: ignore[index]
    best_val = list(dict(base.get("training", {})).get("best_validation_mse", []))  # type: ignore[call-overload]
    protocol_docs = [r for r in [_protocol_ranges(base)] if r is not None]
    config = manifest_unet_config(base)
    taken: set[int] = set()
    for spec, source_dir in takes.items():
        nets = resolve_channels(spec)
        if taken & set(nets):
            raise PackageError(f"channel {spec!r}: its networks are already taken by another --take")
        taken |= set(nets)
        other, other_w = _load(source_dir)
        _check_same(base, other, weights, other_w)
        for key, tensor in weights.items():
            if key == BASIS_KEY or not tensor.ndim:
                continue
            for k in nets:
                part = network_slice(tensor, k, config.n_nets)
                tensor[part] = other_w[key][part]
        other_val = list(dict(other.get("training", {})).get("best_validation_mse", []))  # type: ignore[call-overload]
        for k in nets:
            ranges[k] = np.asarray(other["channel_ranges"], dtype=np.float32)[k]  # type: ignore[index]
            sources[k] = (_label(other), str(other["files"][WEIGHTS]))  # type: ignore[index]
            if len(other_val) == len(CHANNEL_NAMES) and len(best_val) == len(CHANNEL_NAMES):
                best_val[k] = other_val[k]
        other_ranges = _protocol_ranges(other)
        if other_ranges is not None:
            protocol_docs.append(other_ranges)
    training = {
        **dict(base.get("training", {})),  # type: ignore[call-overload]
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "best_validation_mse": best_val,
        "combined_from": {CHANNEL_NAMES[k]: {"package": label, "weights_sha256": sha}
                          for k, (label, sha) in sources.items()},
    }
    basis = weights.pop(BASIS_KEY).numpy()
    return write_package(
        out_dir, name=name, version=version, state=weights, unet=config, channel_ranges=ranges,
        sequence_json=(base_dir / SEQUENCE).read_text(), basis=basis, training=training, metrics=metrics or {},
        normalisation=str(dict(base["preprocessing"])["normalisation"]),  # type: ignore[call-overload]
        trained_protocols=intersect_ranges(protocol_docs) if protocol_docs else None,
        channel_signal=_dict_or_none(base.get("channel_signal")))


def _union_ranges(ranges: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """The protocol ranges any of ``ranges`` covers (families and fields of any; numeric hulls)."""
    out: dict[str, object] = {}
    for key in ("families", "field_strengths_t"):
        out[key] = sorted(set().union(*(set(r.get(key, [])) for r in ranges)))  # type: ignore[call-overload]
    for name in RANGED_FIELDS[1:]:
        spans = [r.get(name) for r in ranges]
        if all(isinstance(s, list) and len(s) == 2 for s in spans):
            out[name] = [min(float(s[0]) for s in spans), max(float(s[1]) for s in spans)]  # type: ignore[index]
    return out


def interpolate_packages(a_dir: Path, b_dir: Path, alpha: float, out_dir: Path, *, name: str, version: str,
                         metrics: dict[str, object] | None = None) -> Path:
    """Write ``out_dir``: every weight ``(1 - alpha) * A + alpha * B`` (in float32, stored fp16) of the packages
    ``a_dir`` (e.g. a model) and ``b_dir`` (e.g. its fine-tune), which must agree in everything but their
    weights, including channel ranges; ``alpha`` in [0, 1]. Returns ``out_dir``."""
    if not 0.0 <= alpha <= 1.0:
        raise PackageError(f"alpha: expected a value in [0, 1], got {alpha}")
    if out_dir.exists():
        raise PackageError(f"{out_dir}: already exists")
    a, a_w = _load(a_dir)
    b, b_w = _load(b_dir)
    _check_same(a, b, a_w, b_w)
    if not np.array_equal(np.asarray(a["channel_ranges"]), np.asarray(b["channel_ranges"])):
        raise PackageError(f"{_label(b)}: its channel ranges differ from {_label(a)}'s, so their networks' outputs "
                           "are scaled differently and their weights cannot be interpolated")
    state = {key: (1.0 - alpha) * tensor.float() + alpha * b_w[key].float() if tensor.is_floating_point()
             else tensor for key, tensor in a_w.items() if key != BASIS_KEY}
    training = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "interpolated": {"alpha": alpha, "from": {"package": _label(a), "weights_sha256": str(a["files"][WEIGHTS])},  # type: ignore[index]
                         "to": {"package": _label(b), "weights_sha256": str(b["files"][WEIGHTS])}},  # type: ignore[index]
        "from_training": dict(a.get("training", {})),  # type: ignore[call-overload]
        "to_training": dict(b.get("training", {})),  # type: ignore[call-overload]
    }
    protocol_docs = [r for r in (_protocol_ranges(a), _protocol_ranges(b)) if r is not None]
    return write_package(
        out_dir, name=name, version=version, state=state, unet=manifest_unet_config(a),
        channel_ranges=np.asarray(a["channel_ranges"], dtype=np.float32), sequence_json=(a_dir / SEQUENCE).read_text(),
        basis=a_w[BASIS_KEY].numpy(), training=training, metrics=metrics or {},
        normalisation=str(dict(a["preprocessing"])["normalisation"]),  # type: ignore[call-overload]
        trained_protocols=_union_ranges(protocol_docs) if protocol_docs else None,
        channel_signal=_dict_or_none(a.get("channel_signal")))


def attach_fluid(base_dir: Path, fluid_dir: Path, gate_t2_ms: tuple[float, float], out_dir: Path, *, name: str,
                 version: str, metrics: dict[str, object] | None = None) -> Path:
    """Write ``out_dir``: the package ``base_dir`` unchanged in its weights, with the package ``fluid_dir`` (the same
    architecture, sequence, basis, normalisation and signal channels; e.g. the base fine-tuned on another CSF
    prior) as its fluid network under ``fluid/``, used where the base's matched T2 passes ``gate_t2_ms``
    (:mod:`pipeline.model.fluid`). The protocol ranges are the union of the two (the fluid network is meant to
    descend from the base). Returns ``out_dir``."""
    if out_dir.exists():
        raise PackageError(f"{out_dir}: already exists")
    gate = fluid_gate({"gate_t2_ms": list(gate_t2_ms)})
    base, base_w = _load(base_dir)
    fluid, fluid_w = _load(fluid_dir)
    _check_same(base, fluid, base_w, fluid_w)
    if base.get("channel_signal") != fluid.get("channel_signal"):
        raise PackageError(f"{_label(fluid)}: its signal channels differ from {_label(base)}'s")
    training = {**dict(base.get("training", {})),  # type: ignore[call-overload]
                "created": datetime.now(UTC).isoformat(timespec="seconds")}
    protocol_docs = [r for r in (_protocol_ranges(base), _protocol_ranges(fluid)) if r is not None]
    write_package(
        out_dir, name=name, version=version, state={k: v for k, v in base_w.items() if k != BASIS_KEY},
        unet=manifest_unet_config(base), channel_ranges=np.asarray(base["channel_ranges"], dtype=np.float32),
        sequence_json=(base_dir / SEQUENCE).read_text(), basis=base_w[BASIS_KEY].numpy(), training=training,
        metrics=metrics or {}, normalisation=str(dict(base["preprocessing"])["normalisation"]),  # type: ignore[call-overload]
        trained_protocols=_union_ranges(protocol_docs) if protocol_docs else None,
        channel_signal=_dict_or_none(base.get("channel_signal")))
    (out_dir / FLUID_DIR).mkdir()
    for file in (MANIFEST, WEIGHTS, SEQUENCE):
        shutil.copy2(fluid_dir / file, out_dir / FLUID_DIR / file)
    manifest = read_manifest(out_dir)
    manifest["fluid"] = {
        "package": FLUID_DIR, "gate_t2_ms": list(gate),
        "base": {"package": _label(base), "weights_sha256": str(base["files"][WEIGHTS])},  # type: ignore[index]
        "fluid": {"package": _label(fluid), "weights_sha256": str(fluid["files"][WEIGHTS])},  # type: ignore[index]
        "rule": f"each voxel is matched from the base's channels; where that T2 exceeds {gate[0]:g} ms its channels "
                f"are blended toward the fluid network's by (T2 - {gate[0]:g}) / ({gate[1]:g} - {gate[0]:g}), "
                "clipped to [0, 1], and matched again",
    }
    manifest["files"] = {**dict(manifest["files"]),  # type: ignore[call-overload]
                         FLUID_MANIFEST: sha256_file(out_dir / FLUID_MANIFEST)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return out_dir
