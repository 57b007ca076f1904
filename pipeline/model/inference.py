"""Running a model package over a volume: axial slices with brain, batched, rescaled channels."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.model.package import ModelPackage
from pipeline.mrf.coefficients import CHANNEL_NAMES


def synthesise_channels(volume: np.ndarray, mask: np.ndarray, package: ModelPackage, *, batch: int = 4,
                        device: str | torch.device | None = None) -> np.ndarray:
    """The seven MRF channels (X, Y, Z, 7), in coefficient units, zero outside ``mask``.

    ``volume`` is the normalised, skull-stripped MPRAGE on the model's grid (slices along axis 2).
    """
    if volume.shape != mask.shape or volume.ndim != 3:
        raise ValueError(f"volume, mask: expected two 3-D arrays of one shape, got {volume.shape}, {mask.shape}")
    model = package.model
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    lo = torch.as_tensor(package.channel_ranges[:, 0], device=dev).view(1, -1, 1, 1)
    span = torch.as_tensor(package.channel_ranges[:, 1] - package.channel_ranges[:, 0], device=dev).view(1, -1, 1, 1)
    out = np.zeros((*volume.shape, len(CHANNEL_NAMES)), dtype=np.float32)
    slices = np.flatnonzero(mask.any(axis=(0, 1)))
    with torch.inference_mode():
        for s in range(0, slices.size, batch):
            ks = slices[s : s + batch]
            x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[:, :, ks], 2, 0), dtype=np.float32))
            # Training targets lie in [0, 1]; tanh may undershoot, so clamp before rescaling.
            y = model(x[:, None].to(dev)).clamp_(0.0, 1.0) * span + lo
            out[:, :, ks, :] = np.transpose(y.float().cpu().numpy(), (2, 3, 0, 1))
    out[~mask] = 0
    return out
