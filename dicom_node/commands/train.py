"""``synthmrf train``: train the seven-U-Net ensemble on a dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dicom_node.commands.options import device_option


@click.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Dataset folder (manifest.json + one folder per subject; README: dataset layout).")
@click.option("--run-dir", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoint.pt, best.pt, metrics.csv. An existing run is resumed.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where prepared training arrays are cached (default RUN/../cache).")
@click.option("--epochs", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--iterations-per-epoch", default=480, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--crop", default=128, show_default=True, type=click.IntRange(min=0),
              help="Random square crops inside the brain (multiple of 16); 0 = whole slices.")
@click.option("--learning-rate", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant", show_default=True,
              help="After the warm-up: constant, or cosine decay to --min-learning-rate at the last epoch.")
@click.option("--min-learning-rate", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--init-from", "init_from", default=None, metavar="PKG|NAME",
              help="Fine-tune: start from this model package (folder, or installed/built-in NAME-VERSION) and keep "
                   "its channel ranges. Same architecture and sequence as the dataset's.")
@click.option("--hold-below-t2", "hold_below_t2", default=None, type=click.FloatRange(min=0, min_open=True),
              metavar="MS", help="Fine-tuning only: voxels whose reference T2 (each subject's T2.nii.gz) is under MS "
                                 "take the --init-from package's own outputs as targets, so the fine-tune moves "
                                 "fluid voxels (CSF and its partial volume) towards the data and holds what the "
                                 "package gives in tissue. Off by default.")
@click.option("--loss-above-t2", "loss_above_t2", default=None, type=click.FloatRange(min=0, min_open=True),
              metavar="MS", help="Train a fluid network (`synthmrf model fluid`): the loss, the validation MSE (so "
                                 "the best weights) and the crops' centres count only voxels whose reference T2 "
                                 "(each subject's T2.nii.gz) exceeds MS, the fluid that such a network is used for; "
                                 "in a brain they are a minority of the voxels (14-30 % over 150 ms, 0.5-5 % "
                                 "over 1000 ms in three world v2 subjects) and barely move an all-voxel loss. "
                                 "Its tissue outputs are left free: use the result only as a fluid network. Excludes "
                                 "--hold-below-t2. Off by default.")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry for --init-from NAME.")
@click.option("--validation-slices", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--bf16/--no-bf16", default=None,
              help="Mixed precision (bf16 autocast; fp16 with gradient scaling on GPUs without bf16). Default: "
                   "on where the hardware computes bf16 natively (CUDA, CPUs with AVX512-BF16 or AMX); on an "
                   "AVX2-only CPU emulated bf16 made a training step 13x slower than float32 (82 vs 6.3 s, "
                   "batch 8 of 128^2 crops).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop cleanly after this much wall time (resume later with the same command).")
@click.option("--protocol-aware/--no-protocol-aware", default=True, show_default=True,
              help="Give the networks the acquisition protocol (field strength, TI, timing, flip, TE, family) as "
                   "constant input planes; a package without them gains them when fine-tuned (--init-from).")
@click.option("--physics-input/--no-physics-input", default=False, show_default=True,
              help="Also give the networks each voxel's apparent T1: the protocol's MPRAGE signal equation inverted "
                   "relative to white matter of the field's literature T1 (pipeline/apparent_t1.py), so that "
                   "protocols look alike before the networks; a package without it gains it when fine-tuned.")
@click.option("--normalisation", type=click.Choice(["p95", "max"]), default="p95", show_default=True,
              help="Input scaling: the brain's 95th percentile (robust), or its maximum (models before 0.3).")
@click.option("--networks", type=click.Choice(["signal", "all"]), default="signal", show_default=True,
              help="signal: train only the networks of channels the sequence's dictionary puts signal in (for a "
                   "real-valued signal such as FISP the imaginary channels hold noise only and inference skips "
                   "their networks: 4 of 7 networks, 1.7x less work per step); all: every network.")
@click.option("--seed", default=0, show_default=True)
@device_option
def train(data_dir: Path, run_dir: Path, cache_dir: Path | None, epochs: int, iterations_per_epoch: int,
          batch_size: int, crop: int, learning_rate: float, lr_schedule: str, min_learning_rate: float,
          init_from: str | None, hold_below_t2: float | None, loss_above_t2: float | None, models_dir: Path,
          validation_slices: int, bf16: bool | None, max_minutes: float | None,
          protocol_aware: bool, physics_input: bool, normalisation: str, networks: str, seed: int, device: str) -> None:
    """Train (or resume) the ensemble: Adam, MSE per network, best weights per network by validation MSE.

    Several GPUs: torchrun --nproc-per-node N $(which synthmrf) train ... (DistributedDataParallel).
    """
    from pipeline.model.unet import UNetConfig
    from pipeline.protocol import N_FEATURES
    from training.preprocess import load_dataset
    from training.train import InitialModelError, RunConfigurationError, TrainConfig
    from training.train import train as run_training

    if crop % 16:
        raise click.BadParameter(f"must be a multiple of 16, got {crop}", param_hint="--crop")
    if min_learning_rate > learning_rate:
        raise click.BadParameter(f"{min_learning_rate} is above --learning-rate {learning_rate}",
                                 param_hint="--min-learning-rate")
    if hold_below_t2 is not None and init_from is None:
        raise click.BadParameter("holds a package's outputs: give the package with --init-from",
                                 param_hint="--hold-below-t2")
    if hold_below_t2 is not None and loss_above_t2 is not None:
        raise click.BadParameter("a fluid network's loss ignores the tissue that --hold-below-t2 would keep: give one",
                                 param_hint="--loss-above-t2")
    initial = None
    if init_from is not None:
        from pipeline.model.package import PackageError
        from pipeline.model.registry import load_model

        try:
            initial = load_model(init_from, models_dir)
        except (PackageError, ValueError) as exc:
            raise click.BadParameter(str(exc), param_hint="--init-from") from exc
    if bf16 is None:
        import torch

        from pipeline.model.inference import inference_dtype
        from pipeline.mrf.epg import resolve_device

        bf16 = inference_dtype(resolve_device(device), "auto") != torch.float32
    try:
        dataset = load_dataset(data_dir, cache_dir or run_dir.parent / "cache", progress=True,
                               reference_t2=hold_below_t2 is not None or loss_above_t2 is not None)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    config = TrainConfig(epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, crop=crop,
                         learning_rate=learning_rate, lr_schedule=lr_schedule, min_learning_rate=min_learning_rate,
                         seed=seed, bf16=bf16, validation_slices=validation_slices, max_minutes=max_minutes,
                         normalisation=normalisation, hold_below_t2=hold_below_t2,
                         loss_above_t2=loss_above_t2,
                         unet=UNetConfig(protocol_features=N_FEATURES if protocol_aware else 0,
                                         physics_planes=1 if physics_input else 0))
    active = None
    if networks == "signal":
        from pipeline.model.package import channel_signal_record
        from pipeline.mrf.coefficients import CHANNEL_RANK
        from pipeline.mrf.dictionary import load_or_build_dictionary
        from pipeline.mrf.sequence import load_sequence

        seq_doc = dataset.manifest.get("sequence")
        sequence = load_sequence(str(seq_doc.get("name", "")) if isinstance(seq_doc, dict) else "")
        record = channel_signal_record(load_or_build_dictionary(sequence, rank=CHANNEL_RANK))  # as packages say
        flags: list[bool] = record["carries_signal"]  # type: ignore[assignment]
        active = [g for g, carries in enumerate(flags) if carries]
    try:
        summary = run_training(dataset, run_dir, config, device=device, initial=initial, networks=active)
    except (InitialModelError, RunConfigurationError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(summary, indent=1))
