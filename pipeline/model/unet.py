"""Seven independent 2D U-Nets (McGee 2024), run as one grouped module.

Each network: encoder levels of two 3x3 convs, each followed by ReLU and batch norm (16, 32, 64, 128
filters, 2x2 max pooling), a 256-filter bottleneck of the same form at 16x16 (for 256x256 input),
then per level a bilinear up-sampling, a 2x2 conv halving the filters, concatenation with the skip,
and two 3x3 convs with ReLU and no batch norm; a 1x1 conv and tanh give one output channel.
Dropout (default 0.1) follows the two deepest levels.

Protocol conditioning (``protocol_features`` > 0, models from 0.3): the acquisition's feature vector
(:func:`pipeline.protocol.protocol_features`) enters every network as constant input planes beside
the image, so the first convolution of each network sees (1 + protocol_features) channels. Physics planes
(``physics_planes`` = 1): the image's apparent T1 (:mod:`pipeline.apparent_t1`) comes with the image, (B, 2, H,
W), and enters after the protocol planes. A model without either fine-tunes into one with them by
:func:`expand_input_planes` (zero weights on the new planes: the same outputs as before until training moves
them).

The seven networks share no weights. They are stored as grouped convolutions (``groups=n_nets``),
so one forward pass runs all seven with the same kernels a single network would use; every
parameter's first dimension is blocked by network, which :func:`network_slice` exposes. Training
all seven with the sum of their MSE losses is training each on its own: their gradients and Adam
states are disjoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the ensemble (stored in model packages)."""

    n_nets: int = 7
    base_filters: int = 16
    depth: int = 4  # pooling steps; the bottleneck has base_filters * 2**depth filters
    dropout: float = 0.1
    protocol_features: int = 0  # constant input planes carrying the acquisition protocol
    physics_planes: int = 0  # image planes after the MPRAGE: 1 = its apparent T1 (pipeline.apparent_t1)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class _EncoderLevel(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        self.n, self.c_out = n, c_out
        self.conv1 = nn.Conv2d(n * c_in, n * c_out, 3, padding=1, groups=n)
        self.bn1 = nn.BatchNorm2d(n * c_out)
        self.conv2 = nn.Conv2d(n * c_out, n * c_out, 3, padding=1, groups=n)
        self.bn2 = nn.BatchNorm2d(n * c_out)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(x)))
        return self.drop(self.bn2(F.relu(self.conv2(x))))


class _DecoderLevel(nn.Module):
    def __init__(self, n: int, c_in: int, c_out: int) -> None:
        super().__init__()
        self.n, self.c_out = n, c_out
        self.up_conv = nn.Conv2d(n * c_in, n * c_out, 2, groups=n)
        self.conv1 = nn.Conv2d(n * 2 * c_out, n * c_out, 3, padding=1, groups=n)
        self.conv2 = nn.Conv2d(n * c_out, n * c_out, 3, padding=1, groups=n)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(self.up_conv(F.pad(x, (0, 1, 0, 1))))  # "same" 2x2 conv, as Keras pads
        b, _, h, w = x.shape
        # Concatenate per network: (B, n, C, H, W) + (B, n, C, H, W) -> (B, n * 2C, H, W).
        x = torch.cat([x.view(b, self.n, self.c_out, h, w), skip.view(b, self.n, self.c_out, h, w)], dim=2)
        x = F.relu(self.conv1(x.view(b, self.n * 2 * self.c_out, h, w)))
        return F.relu(self.conv2(x))


class UNetEnsemble(nn.Module):
    """Input (B, 1 + physics_planes, H, W) with H, W divisible by 2**depth, and for a protocol-conditioned model
    the protocol features (B, protocol_features); output (B, n_nets, H, W) in [-1, 1]."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        n, f, depth = config.n_nets, config.base_filters, config.depth
        widths = [f * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList(
            _EncoderLevel(n, input_planes(config) if i == 0 else widths[i - 1], widths[i],
                          config.dropout if i >= depth - 1 else 0.0)
            for i in range(depth + 1)
        )
        self.decoders = nn.ModuleList(_DecoderLevel(n, widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(n * f, n, 1, groups=n)

    def forward(self, x: torch.Tensor, protocol: torch.Tensor | None = None) -> torch.Tensor:
        planes = 1 + self.config.physics_planes
        if x.ndim != 4 or x.shape[1] != planes:
            raise ValueError(f"x: expected (B, {planes}, H, W), got {tuple(x.shape)}")
        step = 2**self.config.depth
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"x: height and width must be multiples of {step}, got {tuple(x.shape[-2:])}")
        p = self.config.protocol_features
        if p:
            if protocol is None or protocol.shape != (x.shape[0], p):
                got = None if protocol is None else tuple(protocol.shape)
                raise ValueError(f"protocol: this model needs features of shape ({x.shape[0]}, {p}), got {got}")
            constant = protocol.to(x).view(x.shape[0], p, 1, 1).expand(-1, -1, *x.shape[-2:])
            x = torch.cat([x[:, :1], constant, x[:, 1:]], dim=1)
        elif protocol is not None:
            raise ValueError("protocol: this model takes no protocol features")
        # Per network a block of input_planes channels: the grouped first convolution sees its own copy.
        x = x.repeat(1, self.config.n_nets, 1, 1)
        skips = []
        for i, level in enumerate(self.encoders):
            x = level(x)
            if i < self.config.depth:
                skips.append(x)
                x = F.max_pool2d(x, 2)
        for level, skip in zip(self.decoders, reversed(skips), strict=True):
            x = level(x, skip)
        return torch.tanh(self.head(x))


def subset(model: UNetEnsemble, nets: Sequence[int]) -> UNetEnsemble:
    """A smaller ensemble of only networks ``nets`` of ``model`` (same weights, in that order): it computes
    exactly those output channels, at their share of the cost."""
    n = model.config.n_nets
    if not nets or any(not 0 <= k < n for k in nets):
        raise ValueError(f"nets: expected indices in 0..{n - 1}, got {list(nets)}")
    small = UNetEnsemble(replace(model.config, n_nets=len(nets)))
    state = {key: torch.cat([t[network_slice(t, k, n)] for k in nets]) if t.ndim else t
             for key, t in model.state_dict().items()}
    small.load_state_dict(state)
    p = next(model.parameters())
    return small.to(device=p.device, dtype=p.dtype).train(model.training)


def merge_subset(model: UNetEnsemble, small: UNetEnsemble, nets: Sequence[int]) -> None:
    """Copy the weights of ``small`` (a :func:`subset` of ``model`` for ``nets``) back into ``model``'s networks
    ``nets``, in place; the other networks are left as they are."""
    n = model.config.n_nets
    if small.config.n_nets != len(nets):
        raise ValueError(f"small: {small.config.n_nets} networks for {len(nets)} indices")
    current = model.state_dict()
    for key, t in small.state_dict().items():
        if not t.ndim:
            continue
        for j, k in enumerate(nets):
            current[key][network_slice(current[key], k, n)] = t[network_slice(t, j, len(nets))]


def input_planes(config: UNetConfig) -> int:
    """Channels the first convolution of each network sees: image, protocol planes, physics planes."""
    return 1 + config.protocol_features + config.physics_planes


def expand_input_planes(state: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A state dict of a model with fewer input planes, widened to ``config``'s (new planes' weights 0: the planes
    are ordered image, protocol, physics, so a model gains them at the end)."""
    key = "encoders.0.conv1.weight"
    weight = state[key]
    want = input_planes(config)
    if weight.shape[1] == want:
        return state
    if weight.shape[1] > want:
        raise ValueError(f"{key}: {weight.shape[1]} input planes, cannot narrow to {want}")
    wider = torch.zeros((weight.shape[0], want, *weight.shape[2:]), dtype=weight.dtype)
    wider[:, : weight.shape[1]] = weight
    return {**state, key: wider}


def network_slice(tensor: torch.Tensor, net: int, n_nets: int) -> slice:
    """The block of ``tensor``'s first dimension that belongs to network ``net``."""
    size = tensor.shape[0] // n_nets
    return slice(net * size, (net + 1) * size)


def parameter_counts(model: UNetEnsemble) -> dict[str, int]:
    """Trainable parameters: per network (conv weights/biases and batch-norm affine) and in total."""
    n = model.config.n_nets
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    return {"per_network": total // n, "per_network_conv": (total - bn) // n, "per_network_batchnorm": bn // n,
            "total": total}
