"""``synthmrf model ...``: install, verify, activate and roll back model packages."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from pipeline.model.registry import ModelRegistry

DEFAULT_MODELS_DIR = Path("var/synthmrf/models")

P = ParamSpec("P")
R = TypeVar("R")


def _registry() -> ModelRegistry:
    """The registry at the group's ``--models-dir`` (imported here: ``synthmrf --help`` stays fast)."""
    from pipeline.model.registry import ModelRegistry

    return ModelRegistry(click.get_current_context().obj)


def _clean_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Registry and package errors become a one-line message and exit status 1."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        from pipeline.model.package import PackageError
        from pipeline.model.registry import RegistryError

        try:
            return command(*args, **kwargs)
        except (RegistryError, PackageError) as exc:
            raise click.ClickException(str(exc)) from exc

    return run


@click.group()
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_MODELS_DIR,
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, show_envvar=True,
              help="Registry folder: installed packages and active.json.")
@click.pass_context
def model(ctx: click.Context, models_dir: Path) -> None:
    """Model packages: built-in and installed ones, which is active, install, verify, roll back.

    Models are named NAME-VERSION as 'synthmrf model list' shows them.
    """
    ctx.obj = models_dir


@model.command("list")
@_clean_errors
def list_models() -> None:
    """List every available package: source (builtin/installed), active mark, sequence, created, metrics."""
    entries = _registry().list()
    if not entries:
        click.echo("no model packages (install one with 'synthmrf model install PATH')")
    for e in entries:
        mark = "*" if e.active else " "
        click.echo(f"{mark} {e.name}  {e.source}  seq {e.sequence_hash[:12]}  created {e.created}  "
                   f"{e.metrics_summary()}")


@model.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--force", is_flag=True, help="Replace an installed package of the same name and version.")
@_clean_errors
def install(path: Path, force: bool) -> None:
    """Install the package folder or .tar.gz/.zip archive PATH after checking it.

    Checks the checksums, that it loads, and that its sequence and SVD basis fit this installation's
    dictionary (built and cached on first use). It is not activated: use 'synthmrf model activate'.
    """
    name = _registry().install(path, force=force)
    click.echo(f"installed {name}")


@model.command()
@click.argument("name", required=False)
@_clean_errors
def verify(name: str | None) -> None:
    """Check NAME (default: the active model): checksums, loading, sequence and basis, smoke inference."""
    report = _registry().verify(name)
    for check in report.checks:
        click.echo(f"ok  {check}")
    click.echo(f"{report.name}: verified ({report.in_range_fraction:.0%} of smoke outputs inside the channel ranges)")


@model.command()
@click.argument("name")
@_clean_errors
def activate(name: str) -> None:
    """Make NAME the model new jobs use; the previous one can be restored with 'rollback'."""
    _registry().activate(name)
    click.echo(f"active: {name}")


@model.command()
@_clean_errors
def rollback() -> None:
    """Re-activate the model that was active before the last activation."""
    click.echo(f"active: {_registry().rollback()}")


@model.command()
@click.argument("name", required=False)
@_clean_errors
def info(name: str | None) -> None:
    """Print the manifest of NAME (default: the active model) as JSON."""
    click.echo(json.dumps(_registry().info(name), indent=1))


def _check_note(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from pipeline.model.package import PackageError, check_reading_note

    try:
        return None if value is None else check_reading_note(value, "--reading-note")
    except PackageError as exc:
        raise click.BadParameter(str(exc).removeprefix("--reading-note: ")) from exc


def _new_package_options(command: Callable[P, R]) -> Callable[P, R]:
    """--out, --name, --version, --metrics and --reading-note of the commands that write a package."""
    options = [
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="New package folder (must not exist)."),
        click.option("--name", required=True, help="Model name, e.g. synthmrf-phantom."),
        click.option("--version", "version", required=True, help="Model version, e.g. 0.4."),
        click.option("--metrics", "metrics_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="JSON object of evaluation metrics to record in the manifest."),
        click.option("--reading-note", "reading_note", callback=_check_note, metavar="TEXT",
                     help="How to read this model's maps, in a sentence or two (printable ASCII, at most 400 "
                          "characters): every result's DICOM (Derivation Description), summary page and "
                          "provenance.json carry it. E.g. what its evaluation showed the maps do not follow."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _read_metrics(path: Path | None) -> dict[str, object] | None:
    if path is None:
        return None
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{path}: not valid JSON ({exc})", param_hint="--metrics") from exc
    if not isinstance(metrics, dict):
        raise click.BadParameter(f"{path}: expected a JSON object", param_hint="--metrics")
    return metrics


def _note(path: Path, reading_note: str | None) -> Path:
    """Record ``reading_note`` in the package just written at ``path``."""
    if reading_note is not None:
        from pipeline.model.package import set_reading_note

        set_reading_note(path, reading_note)
    return path


def _package_folder(ref: str) -> Path:
    """A package folder as given, or the folder of an installed or built-in NAME-VERSION."""
    return Path(ref) if Path(ref).is_dir() else _registry().path_of(ref)


@model.command()
@click.argument("base")
@click.option("--take", "takes", multiple=True, required=True, metavar="CHANNEL=PACKAGE",
              help="Take CHANNEL's networks from PACKAGE (a folder or NAME-VERSION). CHANNEL: SV1..SV4 (the "
                   "singular vector's real and imaginary networks) or one of SV1_re, SV2_re, SV2_im, ... "
                   "Repeatable.")
@_new_package_options
@_clean_errors
def combine(base: str, takes: tuple[str, ...], out_dir: Path, name: str, version: str,
            metrics_path: Path | None, reading_note: str | None) -> None:
    """Write a package made of BASE (a folder or NAME-VERSION) with some channels' networks taken from others.

    The seven networks are independent and each keeps its channel range, so every channel of the new package
    gives exactly what its source gave. The sources must share architecture, MRF sequence, SVD basis and input
    normalisation. The manifest records each channel's source; the protocol ranges are the sources'
    intersection. Evaluate the result ('synthmrf evaluate --model DIR') before installing it.
    """
    from pipeline.model.combine import combine_packages

    sources: dict[str, Path] = {}
    for take in takes:
        channel, sep, ref = take.partition("=")
        if not sep or not channel.strip() or not ref.strip():
            raise click.BadParameter(f"{take!r}: expected CHANNEL=PACKAGE, e.g. SV4=synthmrf-phantom-0.3",
                                     param_hint="--take")
        if channel.strip() in sources:
            raise click.BadParameter(f"{channel.strip()!r} is given twice", param_hint="--take")
        sources[channel.strip()] = _package_folder(ref.strip())
    path = _note(combine_packages(_package_folder(base), sources, out_dir, name=name, version=version,
                                  metrics=_read_metrics(metrics_path)), reading_note)
    manifest = json.loads((path / "manifest.json").read_text())
    for channel, entry in manifest["training"]["combined_from"].items():
        click.echo(f"{channel}: {entry['package']}")
    click.echo(f"wrote {path}")


@model.command("interpolate")
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Weight of B: every weight is (1 - alpha) A + alpha B.")
@_new_package_options
@_clean_errors
def interpolate(model_a: str, model_b: str, alpha: float, out_dir: Path, name: str, version: str,
                metrics_path: Path | None, reading_note: str | None) -> None:
    """Write a package whose weights lie between A and B (folders or NAME-VERSION), e.g. a model and its fine-tune.

    Weight-space ensembling (WiSE-FT, Wortsman et al. 2022): a fine-tune can gain on its training world and lose
    on data it never saw; the weights between it and its parent often keep much of the gain and recover the
    robustness. A and B must agree in architecture, MRF sequence, SVD basis, input normalisation and channel
    ranges (a fine-tune keeps its parent's). The protocol ranges are the union of theirs. Evaluate the result
    ('synthmrf evaluate --model DIR') on data neither trained on before installing it.
    """
    from pipeline.model.combine import interpolate_packages

    path = _note(interpolate_packages(_package_folder(model_a), _package_folder(model_b), alpha, out_dir, name=name,
                                      version=version, metrics=_read_metrics(metrics_path)), reading_note)
    click.echo(f"wrote {path}")


@model.command("fluid")
@click.argument("base")
@click.argument("fluid")
@click.option("--gate", "gate", nargs=2, type=click.FloatRange(min=0.0, min_open=True), default=(200.0, 400.0),
              show_default=True, metavar="FROM TO",
              help="T2 (ms) of BASE's own map where the fluid network's share starts rising from 0, and where it "
                   "reaches 1.")
@_new_package_options
@_clean_errors
def fluid(base: str, fluid: str, gate: tuple[float, float], out_dir: Path, name: str, version: str,
          metrics_path: Path | None, reading_note: str | None) -> None:
    """Write a package that is BASE with FLUID (folders or NAME-VERSION) as its fluid network.

    An MPRAGE shows almost nothing of CSF's T2, so a model gives there the prior it was trained with; fine-tuning
    a model's own networks toward another CSF prior also moves its tissue values. A composite package keeps
    BASE's networks: each voxel is matched from BASE's channels, and only where that T2 exceeds FROM are its
    channels blended toward FLUID's (fully at TO) and matched again, so every voxel BASE reads under FROM keeps
    BASE's maps exactly. FLUID must share BASE's architecture, MRF sequence, SVD basis, input normalisation and
    signal channels (e.g. BASE fine-tuned with 'synthmrf train --init-from BASE' on 'phantom make --csf-t2-range').
    Inference costs up to twice BASE's network time. Evaluate the result ('synthmrf evaluate --model DIR') before
    installing it.
    """
    from pipeline.model.combine import attach_fluid

    if gate[0] >= gate[1]:
        raise click.BadParameter(f"FROM ({gate[0]:g}) must be below TO ({gate[1]:g})", param_hint="--gate")
    path = _note(attach_fluid(_package_folder(base), _package_folder(fluid), gate, out_dir, name=name,
                              version=version, metrics=_read_metrics(metrics_path)), reading_note)
    click.echo(f"wrote {path} (fluid network where {Path(base).name}'s T2 > {gate[0]:g} ms, fully from "
               f"{gate[1]:g} ms)")


@model.command("package")
@click.option("--run-dir", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Training run folder (best.pt, metrics.csv, train_config.json).")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The dataset the run was trained on (its manifest names the sequence).")
@click.option("--weights", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="best: per network the weights of its best validation epoch; last: the last epoch's weights "
                   "(when the validation MSE over all voxels cannot see what the run was for, e.g. a fluid network "
                   "fine-tuned on another CSF prior, whose few fluid voxels barely move it).")
@_new_package_options
def package_model(run_dir: Path, data_dir: Path, weights: str, out_dir: Path, name: str, version: str,
                  metrics_path: Path | None, reading_note: str | None) -> None:
    """Package a training run's weights with its channel ranges, SVD basis and provenance."""
    from training.packaging import package_run

    path = _note(package_run(run_dir, data_dir, out_dir, name=name, version=version,
                             metrics=_read_metrics(metrics_path), weights=weights), reading_note)
    click.echo(f"wrote {path}")
