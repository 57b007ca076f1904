"""Training the seven-U-Net ensemble (method.md): random slice batches, Adam, MSE per network,
validation each epoch, per-network best weights, checkpoints that resume, seeded, CPU or CUDA,
optionally several GPUs through torch's DistributedDataParallel (``torchrun``).

Targets are the seven channels scaled to [0, 1] with the training set's channel ranges. On CPU the
defaults favour what measured fastest: random crops inside the brain, and bf16 autocast where the
hardware has it (the CLI's default; emulated bf16 on an AVX2-only CPU is 13x slower than float32).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.apparent_t1 import brain_apparent_t1
from pipeline.model.package import ModelPackage
from pipeline.model.unet import UNetConfig, UNetEnsemble, expand_input_planes, merge_subset, network_slice, subset
from pipeline.mrf.coefficients import CHANNEL_NAMES
from pipeline.mrf.epg import resolve_device
from training.preprocess import Dataset, PreparedSubject, channel_ranges

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (the paper's where it gives them)."""

    epochs: int = 1000
    iterations_per_epoch: int = 480
    batch_size: int = 16
    crop: int = 128  # 0 = whole 256x256 slices, as the paper
    learning_rate: float = 1e-4
    seed: int = 0
    bf16: bool = True  # autocast (2x faster with native bf16, 13x slower emulated); fp16 on GPUs without bf16
    validation_slices: int = 32
    warmup_iterations: int = 100  # linear learning-rate warm-up from 0
    lr_schedule: str = "constant"  # or "cosine": from learning_rate down to min_learning_rate at the last epoch
    min_learning_rate: float = 0.0
    init_from: str | None = None  # set by train(): the package (NAME-VERSION) whose weights and ranges started it
    max_minutes: float | None = None  # stop cleanly (checkpoint saved) after this much wall time
    normalisation: str = "p95"  # input scaling (pipeline/normalise.py); packages before 0.3 used "max"
    hold_below_t2: float | None = None  # fine-tuning: voxels of reference T2 under this (ms) keep the package's outputs
    loss_above_t2: float | None = None  # a fluid network: loss, validation, crop centres where reference T2 > this
    unet: UNetConfig = field(default_factory=UNetConfig)


@dataclass
class _State:
    epoch: int
    best_val: list[float]
    best_state: dict[str, torch.Tensor]


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]
"""Inputs (B, 1 + physics planes, H, W), scaled targets (B, 7, H, W), protocol features (B, P) or None, where the
targets are to be held at the starting package's outputs (B, 1, H, W; ``hold_below_t2`` runs) or None, and where the
loss counts (B, 1, H, W; ``loss_above_t2`` runs) or None (everywhere)."""


def _sample_batch(subjects: list[PreparedSubject], rng: np.random.Generator, batch: int, crop: int,
                  ranges: np.ndarray, config: TrainConfig) -> Batch:
    """Random slices (random subject, slice, crop inside the brain, left-right flip)."""
    xs, ys, ps = [], [], []
    hs: list[np.ndarray] = []
    ws: list[np.ndarray] = []
    lo, span = ranges[:, 0, None, None], (ranges[:, 1] - ranges[:, 0])[:, None, None]
    for _ in range(batch):
        s = subjects[rng.integers(len(subjects))]
        i = int(rng.integers(len(s.slices)))
        planes = [_input_planes(s, i, config), np.asarray(s.targets[i], np.float32)]
        if config.hold_below_t2 is not None:
            planes.append(_hold_plane(s, i, config.hold_below_t2))
        centres = s.masks[i]
        if config.loss_above_t2 is not None:
            planes.append(_fluid_plane(s, i, config.loss_above_t2))
            centres = centres & planes[-1][0]
        ps.append(s.features)
        if crop:
            rows, cols = np.nonzero(centres)
            if not rows.size:  # a slice without fluid: anywhere in the brain
                rows, cols = np.nonzero(s.masks[i])
            k = int(rng.integers(rows.size))
            r0 = int(np.clip(rows[k] - crop // 2, 0, planes[0].shape[1] - crop))
            c0 = int(np.clip(cols[k] - crop // 2, 0, planes[0].shape[2] - crop))
            planes = [a[:, r0 : r0 + crop, c0 : c0 + crop] for a in planes]
        if rng.random() < 0.5:
            planes = [a[:, ::-1] for a in planes]
        xs.append(planes[0].copy())
        ys.append(((planes[1] - lo) / span).copy())
        if config.hold_below_t2 is not None:
            hs.append(planes[2].copy())
        if config.loss_above_t2 is not None:
            ws.append(planes[-1].copy())
    return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), _features(ps, config),
            torch.from_numpy(np.stack(hs)) if hs else None, torch.from_numpy(np.stack(ws)) if ws else None)


def _reference_t2(s: PreparedSubject, i: int) -> np.ndarray:
    """(1, X, Y): slice ``i``'s reference T2 map, ms."""
    if s.reference_t2 is None:
        raise ValueError(f"{s.subject}: choosing voxels by T2 needs the subject's reference T2 map (load_dataset(..., "
                         "reference_t2=True))")
    return np.asarray(s.reference_t2[i], np.float32)[None]


def _hold_plane(s: PreparedSubject, i: int, level: float) -> np.ndarray:
    """(1, X, Y): where slice ``i``'s targets are held (reference T2 under ``level`` ms)."""
    return _reference_t2(s, i) < level


def _fluid_plane(s: PreparedSubject, i: int, level: float) -> np.ndarray:
    """(1, X, Y): where slice ``i``'s loss counts in a fluid network's run (reference T2 over ``level`` ms)."""
    return _reference_t2(s, i) > level


def _input_planes(s: PreparedSubject, i: int, config: TrainConfig) -> np.ndarray:
    """Slice ``i`` of ``s`` as the networks take it: (1 + physics planes, X, Y), the normalised MPRAGE and, for a
    model with a physics plane, its apparent T1 in the brain (as :func:`pipeline.model.inference.network_input`)."""
    x = np.asarray(s.inputs[i], np.float32) * np.float32(s.input_factor(config.normalisation))
    if not config.unet.physics_planes:
        return x[None]
    return np.stack([x, brain_apparent_t1(x, s.masks[i], s.protocol)])


def _features(rows: list[np.ndarray], config: TrainConfig) -> torch.Tensor | None:
    return torch.from_numpy(np.stack(rows)) if config.unet.protocol_features else None


def _validation_set(subjects: list[PreparedSubject], n: int, ranges: np.ndarray, config: TrainConfig) -> Batch:
    """Whole slices spread evenly over the validation subjects."""
    picks = [(s, i) for s in subjects for i in range(len(s.slices))]
    chosen = [picks[int(j)] for j in np.linspace(0, len(picks) - 1, min(n, len(picks)))]
    lo, span = ranges[:, 0, None, None], (ranges[:, 1] - ranges[:, 0])[:, None, None]
    x = np.stack([_input_planes(s, i, config) for s, i in chosen])
    y = np.stack([(np.asarray(s.targets[i], np.float32) - lo) / span for s, i in chosen])
    level, fluid = config.hold_below_t2, config.loss_above_t2
    hold = None if level is None else torch.from_numpy(np.stack([_hold_plane(s, i, level) for s, i in chosen]))
    where = None if fluid is None else torch.from_numpy(np.stack([_fluid_plane(s, i, fluid) for s, i in chosen]))
    return (torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)),
            _features([s.features for s, _ in chosen], config), hold, where)


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_learning_rate`` over all planned iterations."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_iterations))
    if config.lr_schedule == "constant":
        return config.learning_rate * warm
    if config.lr_schedule != "cosine":
        raise ValueError(f"lr_schedule: 'constant' or 'cosine', got {config.lr_schedule!r}")
    total = max(1, config.epochs * config.iterations_per_epoch - config.warmup_iterations)
    done = min(1.0, max(0.0, (step - config.warmup_iterations) / total))
    cosine = config.min_learning_rate + 0.5 * (config.learning_rate - config.min_learning_rate) * (
        1 + math.cos(math.pi * done))
    return cosine * warm


def _autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CPUs and on GPUs that have it (Ampere on); fp16 on older GPUs (then with a gradient scaler)."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=_autocast_dtype(device), enabled=enabled)


def validation_mse(model: torch.nn.Module, data: Batch, device: torch.device, batch: int = 8) -> np.ndarray:
    """Mean squared error per network over whole validation slices (scaled units), or over the voxels where the
    loss counts (``loss_above_t2`` runs)."""
    x, y, p, _, where = data
    model.eval()
    total = torch.zeros(y.shape[1], dtype=torch.float64)
    count = 0.0
    with torch.inference_mode():
        for s in range(0, x.shape[0], batch):
            features = None if p is None else p[s : s + batch].to(device)
            out = model(x[s : s + batch].to(device), features).float().cpu()
            squared = (out - y[s : s + batch]) ** 2
            counted = torch.ones_like(squared[:, :1]) if where is None else where[s : s + batch]
            total += (squared * counted).sum(dim=(0, 2, 3)).double()
            count += float(counted.sum())
    model.train()
    return (total / max(count, 1.0)).numpy()


def masked_mse(out: torch.Tensor, y: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
    """Per-network mean squared error of a batch: over every voxel, or over ``where`` (B, 1, H, W) only (zero for a
    batch without such voxels)."""
    squared = (out - y) ** 2
    if where is None:
        return squared.mean(dim=(0, 2, 3))
    return (squared * where).sum(dim=(0, 2, 3)) / where.sum().clamp(min=1)


def _holding_model(initial: ModelPackage, config: TrainConfig, active: tuple[int, ...],
                   device: torch.device) -> UNetEnsemble:
    """The starting package's networks ``active``, frozen in inference mode: the outputs a held fine-tune keeps."""
    model = UNetEnsemble(config.unet)
    model.load_state_dict(expand_input_planes(initial.model.state_dict(), config.unet))
    model = _working_model(model.to(device), active).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def held_batch(data: Batch, holder: UNetEnsemble, chunk: int = 8) -> Batch:
    """``data`` with its targets replaced by ``holder``'s outputs where its hold plane is set (computed on the
    holder's device; the targets stay where they were)."""
    x, y, p, hold, where = data
    if hold is None:
        return data
    device = next(holder.parameters()).device
    with torch.inference_mode():
        held = torch.cat([holder(x[s : s + chunk].to(device), None if p is None else p[s : s + chunk].to(device))
                          .float() for s in range(0, x.shape[0], chunk)])
    return x, torch.where(hold.to(device), held, y.to(device)).to(y.device), p, hold, where


def _initialise_output_bias(model: UNetEnsemble, subjects: list[PreparedSubject], ranges: np.ndarray,
                            config: TrainConfig) -> None:
    """Start each network's output at its channel's mean target (tanh of the head bias).

    Scaled targets sit far from tanh(0) = 0 for some channels (the background of SV2 re is ~0.96);
    starting there produced large early updates that left a whole network with dead ReLUs (seen here).
    """
    _, y, *_ = _sample_batch(subjects, np.random.default_rng([config.seed, 2**31]), 64, config.crop, ranges, config)
    mean = y.mean(dim=(0, 2, 3)).clamp(-0.95, 0.95)
    bias = model.head.bias
    assert bias is not None  # the head conv is built with a bias
    with torch.no_grad():
        bias.copy_(torch.atanh(mean).to(bias))


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when started by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


class InitialModelError(ValueError):
    """The package given to start a run from does not fit the run."""


class RunConfigurationError(ValueError):
    """The run folder holds a run with another configuration."""


def _check_initial(initial: ModelPackage, dataset: Dataset, config: TrainConfig) -> None:
    """A run may start from a package of the same architecture (a model without protocol or physics planes may
    gain them) and the dataset's sequence only."""
    own = initial.model.config
    if replace(own, protocol_features=config.unet.protocol_features,
               physics_planes=config.unet.physics_planes) != config.unet or \
            own.protocol_features not in (0, config.unet.protocol_features) or \
            own.physics_planes not in (0, config.unet.physics_planes) or \
            (own.physics_planes and own.protocol_features != config.unet.protocol_features):  # planes gained at the end
        raise InitialModelError(f"--init-from {initial.name}: its architecture {initial.model.config} differs "
                                f"from the run's {config.unet}")
    if initial.sequence.hash() != dataset.sequence_hash:
        raise InitialModelError(f"--init-from {initial.name}: trained for sequence {initial.sequence.name} "
                                f"({initial.sequence.hash()[:12]}), the dataset has {dataset.sequence_hash[:12]}: "
                                "its outputs mean another signal")


def train(dataset: Dataset, run_dir: Path, config: TrainConfig = TrainConfig(), *, device: str = "auto",
          resume: bool = True, progress: bool = True, initial: ModelPackage | None = None,
          networks: Sequence[int] | None = None) -> dict[str, object]:
    """Train (or resume) in ``run_dir``; returns a summary. Best weights: ``run_dir/best.pt``.

    ``initial`` fine-tunes a model package: the run starts from its weights and keeps its channel ranges,
    so its outputs keep their meaning; its name is recorded as ``config.init_from``.
    ``networks``: train only these networks (default all); the others keep their weights and cost nothing
    (inference skips the networks of channels without signal, so training them is wasted). A run resumes
    on the same networks or on fewer.
    """
    config = replace(config, init_from=None if initial is None else initial.name)
    if config.hold_below_t2 is not None and config.loss_above_t2 is not None:
        raise ValueError("--hold-below-t2 and --loss-above-t2 exclude each other: a fluid network's loss ignores "
                         "the tissue that a hold would keep")
    if config.hold_below_t2 is not None and initial is None:
        raise InitialModelError("holding outputs (--hold-below-t2) needs a package to hold them from (--init-from)")
    rank, world = _distributed()
    dev = resolve_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    run_dir.mkdir(parents=True, exist_ok=True)
    train_subjects, val_subjects = dataset.subjects["train"], dataset.subjects["val"] or dataset.subjects["train"]
    if initial is not None:
        _check_initial(initial, dataset, config)
        ranges = initial.channel_ranges.astype(np.float64)
    else:
        ranges = channel_ranges(train_subjects)
    torch.manual_seed(config.seed)
    model = UNetEnsemble(config.unet).to(dev)
    n_nets = config.unet.n_nets
    active = tuple(range(n_nets)) if networks is None else tuple(sorted(set(networks)))
    if not active or not all(0 <= g < n_nets for g in active):
        raise ValueError(f"networks: expected indices in 0..{n_nets - 1}, got {networks}")
    state = _State(0, [math.inf] * n_nets, {})
    checkpoint = run_dir / CHECKPOINT
    if resume and checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=dev, weights_only=False)
        free = ["max_minutes"] + (["epochs"] if config.lr_schedule == "constant" else [])  # cosine: planned length
        previous = {k: v for k, v in asdict(TrainConfig()).items() if k not in saved["config"]} | saved["config"]
        if previous != asdict(config) | {key: previous[key] for key in free}:  # fields added since: their defaults
            raise RunConfigurationError(f"{checkpoint}: was trained with another configuration (with the cosine "
                                        "schedule the number of epochs is part of it); use a new run folder, or "
                                        "--init-from a package of this run to train on")
        model.load_state_dict(saved["model"])
        trained = tuple(saved.get("networks", range(n_nets)))
        if not set(active) <= set(trained):
            raise RunConfigurationError(f"{checkpoint}: trained networks {list(trained)}; it can resume on those "
                                        f"or fewer, not on {list(active)}")
        work = _working_model(model, active)
        optimiser = torch.optim.Adam(work.parameters(), lr=config.learning_rate)
        optimiser.load_state_dict(_optimiser_for(saved["optimiser"], trained, active))
        state = _State(saved["epoch"], saved["best_val"], saved["best_state"])
        logger.info("resuming %s at epoch %d", run_dir, state.epoch)
    else:
        if initial is not None:
            model.load_state_dict(expand_input_planes(initial.model.state_dict(), config.unet))
            logger.info("starting from the weights of %s", initial.name)
        else:
            _initialise_output_bias(model, train_subjects, ranges, config)
        state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        work = _working_model(model, active)
        optimiser = torch.optim.Adam(work.parameters(), lr=config.learning_rate)
    if len(active) < n_nets:
        logger.info("training networks %s only (%s keep their weights)", [CHANNEL_NAMES[g] for g in active],
                    [c for g, c in enumerate(CHANNEL_NAMES) if g not in active])
    net: torch.nn.Module = work
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(work, device_ids=[dev.index] if dev.type == "cuda" else None)
    validation = _validation_set(val_subjects, config.validation_slices, ranges, config)
    validation = (validation[0], validation[1][:, list(active)], *validation[2:])
    holder = None
    if config.hold_below_t2 is not None:
        assert initial is not None  # checked above
        holder = _holding_model(initial, config, active, dev)
        validation = held_batch(validation, holder)
    if initial is not None and state.epoch == 0 and rank == 0:  # the package's weights are the best so far
        for g, v in zip(active, validation_mse(work, validation, dev), strict=True):
            state.best_val[g] = float(v)
    metrics_path = run_dir / METRICS
    # fp16 gradients of an MSE of about 1e-3 underflow without scaling; bf16 has float32's range
    scaler = torch.amp.GradScaler(dev.type, enabled=config.bf16 and _autocast_dtype(dev) == torch.float16)
    started = time.monotonic()
    stopped_early = False
    while state.epoch < config.epochs:
        rng = np.random.default_rng([config.seed, state.epoch, rank])
        losses = np.zeros(len(active))
        tick = time.monotonic()
        bar = tqdm(range(config.iterations_per_epoch), desc=f"epoch {state.epoch + 1}/{config.epochs}",
                   unit="it", disable=not progress or rank != 0, leave=False)
        for it in bar:
            step = state.epoch * config.iterations_per_epoch + it
            for group in optimiser.param_groups:
                group["lr"] = learning_rate_at(step, config)
            batch = _sample_batch(train_subjects, rng, config.batch_size // world, config.crop, ranges, config)
            x, y, p, hold, where = (batch[0].to(dev), batch[1][:, list(active)].to(dev),
                                    *(None if t is None else t.to(dev) for t in batch[2:]))
            if holder is not None:
                x, y, p, *_ = held_batch((x, y, p, hold, where), holder)
            with _autocast(dev, config.bf16):
                out = net(x, p)
            per_net = masked_mse(out.float(), y, where)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(per_net.sum()).backward()
            scaler.step(optimiser)
            scaler.update()
            losses += per_net.detach().cpu().numpy()
            bar.set_postfix(mse=f"{per_net.mean().item():.2e}")
        seconds = time.monotonic() - tick
        state.epoch += 1
        if rank == 0:
            val = validation_mse(work, validation, dev)
            if work is not model:
                merge_subset(model, work, active)
            current = model.state_dict()
            for g, v in zip(active, val, strict=True):
                if v < state.best_val[g]:
                    state.best_val[g] = float(v)
                    for name, tensor in current.items():
                        if tensor.ndim and tensor.shape[0] % n_nets == 0:
                            state.best_state[name][network_slice(tensor, g, n_nets)] = \
                                tensor[network_slice(tensor, g, n_nets)].detach()
            _append_metrics(metrics_path, state.epoch, _spread(losses / config.iterations_per_epoch, active, n_nets),
                            _spread(val, active, n_nets), config.iterations_per_epoch / seconds)
            _save(checkpoint, model, optimiser, state, config, ranges, active)
        if config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes:
            stopped_early = state.epoch < config.epochs
            break
    if world > 1:
        dist.barrier()
    return {"epochs": state.epoch, "best_val_mse": dict(zip(CHANNEL_NAMES, state.best_val, strict=True)),
            "stopped_early": stopped_early, "channel_ranges": ranges.tolist()}


def _working_model(model: UNetEnsemble, active: tuple[int, ...]) -> UNetEnsemble:
    """The module the optimiser trains: ``model`` itself, or the ensemble of its ``active`` networks."""
    return model if len(active) == model.config.n_nets else subset(model, active)


def _spread(values: np.ndarray, active: tuple[int, ...], n_nets: int) -> np.ndarray:
    """Per-network values of the active networks placed among ``n_nets`` (NaN for the untrained ones)."""
    full = np.full(n_nets, np.nan)
    full[list(active)] = values
    return full


def _optimiser_for(saved: dict[str, object], trained: tuple[int, ...], active: tuple[int, ...]) -> dict[str, object]:
    """An Adam state saved while training networks ``trained``, cut down to networks ``active`` (each moment
    tensor holds one block per trained network, as the weights do)."""
    if trained == active:
        return saved
    keep = [trained.index(g) for g in active]
    moments_by_param: dict[int, dict[str, object]] = saved["state"]  # type: ignore[assignment]
    state = {key: {name: torch.cat([t[network_slice(t, j, len(trained))] for j in keep])
                   if isinstance(t, torch.Tensor) and t.ndim else t for name, t in moments.items()}
             for key, moments in moments_by_param.items()}
    return {**saved, "state": state}


def _append_metrics(path: Path, epoch: int, train: np.ndarray, val: np.ndarray, its: float) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch", "iterations_per_s", *(f"train_{c}" for c in CHANNEL_NAMES),
                             *(f"val_{c}" for c in CHANNEL_NAMES)])
        writer.writerow([epoch, f"{its:.4f}", *(f"{v:.6e}" for v in train), *(f"{v:.6e}" for v in val)])


def _save(path: Path, model: UNetEnsemble, optimiser: torch.optim.Optimizer, state: _State, config: TrainConfig,
          ranges: np.ndarray, active: tuple[int, ...]) -> None:
    payload = {"model": model.state_dict(), "optimiser": optimiser.state_dict(), "epoch": state.epoch,
               "best_val": state.best_val, "best_state": state.best_state, "config": asdict(config),
               "channel_ranges": ranges, "networks": list(active)}
    tmp = path.with_suffix(".partial")
    torch.save(payload, tmp)
    tmp.replace(path)
    best = {"state": state.best_state, "best_val": state.best_val, "channel_ranges": ranges,
            "unet": config.unet.to_dict(), "epoch": state.epoch}
    tmp = path.with_name("best.partial")
    torch.save(best, tmp)
    tmp.replace(path.with_name("best.pt"))
    (path.parent / "train_config.json").write_text(json.dumps(asdict(config), indent=1))
