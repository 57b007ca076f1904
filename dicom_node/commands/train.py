"""``synthmrf train``: train the seven-U-Net ensemble on a dataset folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from training.preprocess import load_dataset
from training.train import TrainConfig
from training.train import train as run_training


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
@click.option("--validation-slices", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="Mixed precision (bf16 on CPU).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop cleanly after this much wall time (resume later with the same command).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def train(data_dir: Path, run_dir: Path, cache_dir: Path | None, epochs: int, iterations_per_epoch: int,
          batch_size: int, crop: int, learning_rate: float, validation_slices: int, bf16: bool,
          max_minutes: float | None, seed: int, device: str) -> None:
    """Train (or resume) the ensemble: Adam, MSE per network, best weights per network by validation MSE.

    Several GPUs: torchrun --nproc-per-node N $(which synthmrf) train ... (DistributedDataParallel).
    """
    if crop % 16:
        raise click.BadParameter(f"must be a multiple of 16, got {crop}", param_hint="--crop")
    dataset = load_dataset(data_dir, cache_dir or run_dir.parent / "cache", progress=True)
    config = TrainConfig(epochs=epochs, iterations_per_epoch=iterations_per_epoch, batch_size=batch_size, crop=crop,
                         learning_rate=learning_rate, seed=seed, bf16=bf16, validation_slices=validation_slices,
                         max_minutes=max_minutes)
    summary = run_training(dataset, run_dir, config, device=device)
    click.echo(json.dumps(summary, indent=1))
