"""``synthmrf phantom ...``: the digital brain world."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.protocol import Family
from training.phantom.geometry import Orientation
from training.phantom.styles import DicomStyle, Vendor


@click.group()
def phantom() -> None:
    """Synthetic subjects with known T1/T2/PD, MPRAGE DICOM studies and simulated MRF."""


@phantom.command("make")
@click.option("--subjects", "-n", "n_subjects", type=click.IntRange(min=1), required=True,
              help="Number of subjects.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder (one sub-NNN folder per subject and manifest.json).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same arrays.")
@click.option("--style", type=click.Choice([s.value for s in DicomStyle]), default="classic",
              show_default=True, help="DICOM style of the MPRAGE series.")
@click.option("--vendor", type=click.Choice(["mixed"] + [v.value for v in Vendor]), default="mixed",
              show_default=True, help="Header style; mixed draws one per subject.")
@click.option("--orientation", type=click.Choice([o.value for o in Orientation]), default="sagittal",
              show_default=True, help="MPRAGE slice orientation.")
@click.option("--oblique-deg", type=float, default=15.0, show_default=True,
              help="Tilt of the oblique orientation.")
@click.option("--world", type=click.Choice(["v1", "v2", "v3", "v4"]), default="v1", show_default=True,
              help="v1: the paper's protocol at 3 T, narrow tissue priors, one partial-volume model. v2: protocol "
                   "family and timing, field strength, grid, tissue values, partial-volume model, anatomy (size, "
                   "atrophy, ventricles, lesions), bias and noise drawn per subject (ranges in the README); "
                   "--vendor, --orientation and --oblique-deg are then drawn too unless --vendor is given. v3: v2 "
                   "plus an individual cortex (boundary sharpness, fold-scale displacement, cortical thickness). "
                   "v4: v3 plus an individual segmentation (the brain re-segmented with moving boundaries).")
@click.option("--mrf/--no-mrf", default=True, show_default=True, help="Simulate the MRF coefficients.")
@click.option("--mrf-target", type=click.Choice(["subject", "expected"]), default="subject", show_default=True,
              help="subject: the MRF of the subject's own tissue values. expected (worlds v2-v4, for training): "
                   "the MRF keeps only what an MPRAGE shows: each tissue's T2 at its prior mean (no T2 field) and "
                   "the partial-volume mix at its mean; T1, PD, anatomy, the MPRAGE and the truth maps are as with "
                   "'subject'.")
@click.option("--grey-t2-scale", type=click.FloatRange(0.5, 2.0), default=1.0, show_default=True,
              help="Worlds v2-v4: multiply cortical grey matter's drawn T2 (its prior U(lo, hi) becomes "
                   "U(x lo, x hi)); every other draw stays the same, so a subject differs from its namesake of the "
                   "same seed in grey-matter T2 alone.")
@click.option("--csf-t2-range", type=(float, float), default=None, metavar="LOW HIGH",
              help="Worlds v2-v4: CSF's T2 prior in ms instead of U(500, 2000) (each subject's draw goes to the "
                   "same quantile of the new range); every other draw stays the same, so a subject differs from "
                   "its namesake of the same seed in CSF T2 alone.")
@click.option("--fast", is_flag=True, help="Half-resolution grids (smoke tests only, not for training).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Subjects made in parallel (each process peaks at about 2 GB).")
@click.option("--val-subjects", "n_val", type=click.IntRange(min=0), default=None,
              help="Validation subjects (default: the paper's 2 of 37, at least 1). A rerun into a finished "
                   "folder with another split rewrites only the manifest: subjects do not depend on it.")
@click.option("--test-subjects", "n_test", type=click.IntRange(min=0), default=None,
              help="Test subjects (default: the paper's 5 of 37, at least 1).")
def make(n_subjects: int, out: Path, seed: int, style: str, vendor: str, orientation: str, oblique_deg: float,
         world: str, mrf: bool, mrf_target: str, grey_t2_scale: float,
         csf_t2_range: tuple[float, float] | None, fast: bool, workers: int, n_val: int | None,
         n_test: int | None) -> None:
    """Write N phantom subjects and a manifest with a train/val/test split into OUT."""
    from training.phantom.dataset import make_dataset
    from training.phantom.subject import PhantomOptions

    try:
        options = PhantomOptions(orientation=Orientation(orientation), style=DicomStyle(style),
                                 vendor=None if vendor == "mixed" else Vendor(vendor), oblique_deg=oblique_deg,
                                 mrf=mrf, downsample=2 if fast else 1, world=world, mrf_target=mrf_target,
                                 grey_t2_scale=grey_t2_scale, csf_t2_range=csf_t2_range)
        manifest = make_dataset(n_subjects, out, seed=seed, options=options, workers=workers, n_val=n_val,
                                n_test=n_test)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"manifest: {manifest}")


@phantom.command("select")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New folder: manifest.json and one link per selected subject (nothing is copied).")
@click.option("--family", "families", multiple=True, type=click.Choice([f.value for f in Family]),
              help="Keep subjects of this protocol family (repeatable; default: every family).")
@click.option("--exclude-family", "exclude", multiple=True, type=click.Choice([f.value for f in Family]),
              help="Drop subjects of this protocol family (repeatable).")
@click.option("--field-strength", "fields_t", multiple=True, type=click.Choice(["1.5", "3"]),
              help="Keep subjects at this field strength in T (repeatable; default: both).")
@click.option("--unseen-by", "models", multiple=True, metavar="PKG|NAME",
              help="Drop the subjects this model package (folder, or installed/built-in NAME-VERSION) and the "
                   "packages it was fine-tuned from trained or validated on (repeatable).")
@click.option("--models-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("var/synthmrf/models"),
              envvar="SYNTHMRF_MODELS_DIR", show_default=True, help="Model registry for --unseen-by NAME.")
def select(source: Path, out: Path, families: tuple[str, ...], exclude: tuple[str, ...],
           fields_t: tuple[str, ...], models: tuple[str, ...], models_dir: Path) -> None:
    """Make a dataset of some of SOURCE's subjects, each keeping its train/val/test part.

    For cross-world checks, e.g. leave-one-protocol-family-out: train on
    `select SRC --out no-ge --exclude-family ir-fspgr`, evaluate on `select SRC --out ge --family ir-fspgr`
    with `synthmrf evaluate --split all`; or compare models on subjects none of them saw:
    `select SRC --out fresh --unseen-by PKG1 --unseen-by PKG2`.
    """
    from training.phantom.selection import select_subjects

    manifests: list[dict[str, object]] = []
    for ref in models:
        lineage, unknown = _lineage(ref, models_dir)
        manifests += lineage
        if unknown:
            click.echo(f"warning: {ref} descends from {unknown} (fine-tuned from it), which is not installed or "
                       "built in here: the subjects that one trained on are not known and not dropped", err=True)
    try:
        path = select_subjects(source, out, families=[Family(f) for f in families],
                               exclude=[Family(f) for f in exclude], fields_t=[float(f) for f in fields_t],
                               unseen_by=manifests)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = json.loads(path.read_text())
    parts = ", ".join(f"{len(ids)} {part}" for part, ids in manifest["split"].items())
    click.echo(f"{manifest['n_subjects']} subjects ({parts}): {path}")


@phantom.command("union")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New folder: manifest.json and one link per subject (nothing is copied).")
@click.option("--prefix", "prefixes", multiple=True,
              help="Prefix of each SOURCE's subject ids, once per SOURCE in order (default: the folder's name "
                   "and a hyphen), so that two worlds' sub-001 stay apart.")
def union(sources: tuple[Path, ...], out: Path, prefixes: tuple[str, ...]) -> None:
    """Make one dataset of the subjects of every SOURCE (at least two), each keeping its train/val/test part.

    To train on several worlds at once, e.g. `union v2s41 v4s71 --prefix s41- --prefix v4- --out mix`, then
    `synthmrf train --data mix`. The SOURCEs must share the MRF sequence, grids, file names and regions.
    """
    from training.phantom.selection import union_datasets

    if prefixes and len(prefixes) != len(sources):
        raise click.UsageError(f"--prefix: give it once per SOURCE ({len(sources)}), got {len(prefixes)}")
    chosen = prefixes or tuple(f"{s.resolve().name}-" for s in sources)
    try:
        path = union_datasets(list(zip(sources, chosen, strict=True)), out)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = json.loads(path.read_text())
    parts = ", ".join(f"{len(ids)} {part}" for part, ids in manifest["split"].items())
    click.echo(f"{manifest['n_subjects']} subjects ({parts}): {path}")


@phantom.command("ceiling")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["all", "train", "val", "test"]), default="all", show_default=True,
              help="Subjects of the manifest's split to describe.")
def ceiling(dataset: Path, split: str) -> None:
    """How much of each subject's tissue T1 and T2 an MPRAGE can reveal in DATASET's world.

    An MPRAGE is weighted by T1 and PD, next to nothing by T2, so two oracles bound any MPRAGE-only method:
    the tissue's mean over subjects (knows the tissue class only) and a line in the tissue's exact T1 and PD
    (in-sample). Prints each tissue's spread and correlations and the oracles' Lin's CCC and median absolute
    % error over (subject, tissue) pairs of WM, cortical GM and deep GM: compare with `synthmrf evaluate`'s
    regional CCC (approximately: no partial volume here).
    """
    from training.phantom.ceiling import identifiability_ceiling

    manifest = json.loads((dataset / "manifest.json").read_text())
    entries = manifest.get("subjects")
    if not isinstance(entries, list):
        raise click.ClickException(f"{dataset}: manifest.json has no 'subjects' list (a synthmrf phantom dataset)")
    if split != "all":
        wanted = set(manifest.get("split", {}).get(split, []))
        entries = [e for e in entries if str(e.get("id")) in wanted]
    try:
        result = identifiability_ceiling(entries)
    except ValueError as exc:
        raise click.ClickException(f"{dataset}: {exc}") from exc
    click.echo(f"{len(entries)} subjects ({split}), {result.n_pairs} (subject, tissue) pairs")
    click.echo(f"{'field':>5} {'tissue':<8} {'quantity':<6} {'mean':>7} {'SD':>6} {'CV %':>5} {'r(T1)':>6} "
               f"{'r(PD)':>6}")
    for s in result.spreads:
        click.echo(f"{s.field_strength_t:>4}T {s.tissue:<8} {s.quantity[:2].upper():<6} {s.mean:>7.0f} {s.sd:>6.1f} "
                   f"{100 * s.sd / s.mean:>5.1f} {s.corr_with_t1:>6.2f} {s.corr_with_pd:>6.2f}")
    click.echo(f"{'oracle':<18} {'CCC T1':>7} {'CCC T2':>7} {'MdAPE T1 %':>11} {'MdAPE T2 %':>11}")
    for name, ccc, err in (("class mean", result.ccc_class_mean, result.mdape_class_mean),
                           ("exact T1 and PD", result.ccc_exact_t1_pd, result.mdape_exact_t1_pd)):
        click.echo(f"{name:<18} {ccc['t1_ms']:>7.3f} {ccc['t2_ms']:>7.3f} {err['t1_ms']:>11.1f} {err['t2_ms']:>11.1f}")


def _lineage(ref: str, models_dir: Path) -> tuple[list[dict[str, object]], str | None]:
    """The manifests of package ``ref`` and of the packages it was fine-tuned from (``init_from``), as far as
    they are found; and the name of the first one not found (None if the chain ends)."""
    from pipeline.model.package import PackageError, read_manifest
    from pipeline.model.registry import ModelRegistry, RegistryError

    registry = ModelRegistry(models_dir)
    chain: list[dict[str, object]] = []
    current: str | None = ref
    while current is not None and len(chain) < 20:
        try:
            manifest = read_manifest(Path(current)) if Path(current).is_dir() else registry.info(current)
        except (PackageError, RegistryError, OSError, ValueError) as exc:
            if not chain:
                raise click.BadParameter(str(exc), param_hint="--unseen-by") from exc
            return chain, current
        chain.append(manifest)
        training = manifest.get("training")
        config = training.get("config") if isinstance(training, dict) else None
        current = config.get("init_from") if isinstance(config, dict) else None
    return chain, None
