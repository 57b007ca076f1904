"""Running a model package over a volume: axial slices with brain, batched, rescaled channels."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch

from pipeline.apparent_t1 import brain_apparent_t1
from pipeline.model import onnx_backend
from pipeline.model.package import ModelPackage
from pipeline.model.unet import UNetEnsemble, subset
from pipeline.mrf.coefficients import CHANNEL_NAMES
from pipeline.protocol import AcquisitionProtocol, protocol_features

# Crops start and end on this lattice: a multiple of 16 (four 2x2 poolings) keeps the full image's pooling
# grid. Margin: voxels of background kept around the brain. On a 192x192x150 phantom study (ONNX Runtime,
# one run each, against the phantom's truth in the brain): whole slices 37.0 s, margin 32 on a 32 lattice
# 26.5 s, margin 16 on a 16 lattice 19.6 s (7.8 -> 4.9 Mpixels); median T1 error 7.51 / 7.51 / 7.41 %, T2
# 9.76 / 9.77 / 9.83 %, within 3 voxels of the mask edge T1 16.1 / 16.1 / 15.5 %. Against whole slices, 1.2 %
# of T1 voxels moved by more than one 2 % dictionary step at margin 16 (0.01 % at 32): near the edge, by far
# less than the model's own error there. (Networks were trained on 128^2 crops that cut through the brain.)
CROP_ALIGN = 16
CROP_MARGIN = 16


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """float32, or bfloat16 autocast: "auto" picks bfloat16 where the hardware computes it natively
    (CUDA with bf16 support, CPUs with AVX512-BF16 or AMX). Measured here on 16 brain slices: 1.7x
    faster than float32 on this CPU, the matched T1/T2 identical at the median and within one 2 %
    dictionary step at the 99th percentile; bench/bench_pipeline.py shows the effect on the whole run."""
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"precision: expected 'auto', 'float32' or 'bfloat16', got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def crop_window(mask: np.ndarray, *, margin: int = CROP_MARGIN, align: int = CROP_ALIGN) -> tuple[slice, slice]:
    """In-plane window (x, y) covering the brain of every slice plus ``margin``, on the pooling lattice."""
    window = []
    for axis, other in ((0, (1, 2)), (1, (0, 2))):
        present = np.flatnonzero(mask.any(axis=other))
        n = mask.shape[axis]
        if present.size == 0:
            window.append(slice(0, n))
            continue
        lo = max(0, (int(present[0]) - margin) // align * align)
        hi = min(n, -(-(int(present[-1]) + 1 + margin) // align) * align)
        window.append(slice(lo, hi))
    return window[0], window[1]


def features_for(package: ModelPackage, protocol: AcquisitionProtocol) -> np.ndarray | None:
    """What :func:`synthesise_channels` takes as ``protocol`` for ``package``: the features of
    ``protocol`` for a protocol-conditioned model, None for the others."""
    return protocol_features(protocol) if package.model.config.protocol_features else None


def network_input(package: ModelPackage, normalised: np.ndarray, mask: np.ndarray,
                  protocol: AcquisitionProtocol) -> np.ndarray:
    """What :func:`synthesise_channels` takes as ``volume`` for ``package``: the normalised, skull-stripped MPRAGE
    (X, Y, Z), and for a model with a physics plane its apparent T1 (zero outside ``mask``) on a last axis."""
    if not package.model.config.physics_planes:
        return normalised
    return np.stack([normalised, brain_apparent_t1(normalised, mask, protocol)], axis=-1).astype(np.float32)


_SUBSETS: weakref.WeakKeyDictionary[UNetEnsemble, dict[tuple[int, ...], UNetEnsemble]] = weakref.WeakKeyDictionary()


def _model_for(model: UNetEnsemble, active: tuple[int, ...]) -> UNetEnsemble:
    """``model``, or (cached) the ensemble of only its ``active`` networks."""
    if len(active) == model.config.n_nets:
        return model
    cache = _SUBSETS.setdefault(model, {})
    if active not in cache:
        cache[active] = subset(model, active)
    return cache[active]


BACKENDS = ("auto", "torch", "onnxruntime")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """"torch" or "onnxruntime". "auto": ONNX Runtime for float32 on CPU when it is installed (inference
    1.7x faster on a 192x192x150 study here, channels within 2.4e-6 of torch's), torch for CUDA and for
    bfloat16 (the CPUs that compute it natively)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"backend: onnxruntime runs on the CPU here; device is {device}")
        if not onnx_backend.available():
            raise ValueError("backend: onnxruntime is not installed (pip install onnxruntime onnx)")
        return backend
    if backend == "auto" and device.type == "cpu" and dtype == torch.float32 and onnx_backend.available():
        return "onnxruntime"
    return "torch"


CPU_BATCH, CUDA_BATCH = 1, 16  # slices per forward pass; on this CPU one slice per pass was fastest (0.16 s vs 0.19 s)


def synthesise_channels(volume: np.ndarray, mask: np.ndarray, package: ModelPackage, *, batch: int | None = None,
                        device: str | torch.device | None = None, crop: bool = True,
                        precision: str = "float32", protocol: np.ndarray | None = None,
                        backend: str = "torch") -> np.ndarray:
    """The seven MRF channels (X, Y, Z, 7), in coefficient units, zero outside ``mask`` and exactly zero in the
    channels whose training targets carried no signal (``package.signal_channels``: their networks are skipped).

    ``volume`` is the normalised, skull-stripped MPRAGE on the model's grid (slices along axis 2), with the
    physics planes of a model that takes them on a last axis (:func:`network_input`).
    ``crop`` runs the networks on each batch's in-plane brain bounding box (plus a margin, on the
    pooling lattice) instead of the whole slice: the networks are convolutional and the input outside
    the brain is zero, so the brain values change by far less than the model's error
    (bench/bench_pipeline.py --compare-crop). ``precision``: see :func:`inference_dtype`. Tensors are
    channels-last, the layout oneDNN's and cuDNN's convolutions prefer (1.3-1.6x on this CPU).
    ``protocol``: the acquisition's features (:func:`pipeline.protocol.protocol_features`), required by
    protocol-conditioned models and refused by the others. ``backend``: see :func:`resolve_backend`.
    """
    active = [k for k, carries in enumerate(package.signal_channels) if carries]
    model = _model_for(package.model, tuple(active))
    planes = 1 + model.config.physics_planes
    if volume.shape[:3] != mask.shape or mask.ndim != 3 or volume.shape[3:] != ((planes,) if planes > 1 else ()):
        raise ValueError(f"volume, mask: expected {'(X, Y, Z)' if planes == 1 else f'(X, Y, Z, {planes})'} and "
                         f"(X, Y, Z) for {package.name}, got {volume.shape}, {mask.shape}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device=dev, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    batch = batch or (CUDA_BATCH if dev.type == "cuda" else CPU_BATCH)
    ranges = package.channel_ranges[active]
    lo, span = ranges[:, 0].reshape(1, -1, 1, 1), (ranges[:, 1] - ranges[:, 0]).reshape(1, -1, 1, 1)
    out = np.zeros((*mask.shape, len(CHANNEL_NAMES)), dtype=np.float32)
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    dtype = inference_dtype(dev, precision)
    needs = model.config.protocol_features
    if bool(needs) != (protocol is not None):
        raise ValueError(f"protocol: {package.name} takes {needs} protocol features, got "
                         f"{'none' if protocol is None else np.shape(protocol)}")
    features = None if protocol is None else np.asarray(protocol, np.float32)[None]
    def run_torch(image: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        x = torch.from_numpy(image).to(dev, memory_format=torch.channels_last)
        p = None if features is None else torch.from_numpy(features).to(dev)
        return model(x, p).float().cpu().numpy()  # type: ignore[no-any-return]

    forward: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = run_torch
    if resolve_backend(backend, dev, dtype) == "onnxruntime":
        forward = onnx_backend.networks(package, model, tuple(active))
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        for s in range(0, slices.size, batch):
            ks = slices[s : s + batch]
            wx, wy = crop_window(mask[:, :, ks]) if crop else (slice(0, volume.shape[0]), slice(0, volume.shape[1]))
            window = volume[wx, wy][:, :, ks]
            x = np.ascontiguousarray(np.transpose(window.reshape(*window.shape[:3], planes), (2, 3, 0, 1)),
                                     dtype=np.float32)
            p = None if features is None else np.repeat(features, x.shape[0], axis=0)
            # Training targets lie in [0, 1]; tanh may undershoot, so clamp before rescaling.
            y = np.clip(forward(x, p), 0.0, 1.0) * span + lo
            block = np.zeros((*y.shape[2:], len(ks), len(CHANNEL_NAMES)), dtype=np.float32)
            block[..., active] = np.transpose(y, (2, 3, 0, 1))
            out[wx, wy, ks, :] = block
    out[~mask] = 0
    return out
