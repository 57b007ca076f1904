"""``synthmrf mrf ...``: MRF physics from the command line (simulate, match, dictionary)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dicom_node.commands.options import device_option
from pipeline.mrf.sequence import DEFAULT_RANK, DEFAULT_SEQUENCE, STORED_RANK

SEQUENCE_HELP = "Sequence file (path, or name in config/sequences)."
RANK = click.IntRange(1, STORED_RANK)


@click.group()
def mrf() -> None:
    """MR fingerprinting physics: EPG dictionary, SVD compression and matching."""


@mrf.command()
@click.option("--sequence", "sequence_name", default=DEFAULT_SEQUENCE, show_default=True, help=SEQUENCE_HELP)
@click.option("--rank", default=DEFAULT_RANK, show_default=True, type=RANK, help="Singular components K.")
@device_option
def dictionary(sequence_name: str, rank: int, device: str) -> None:
    """Build (or load from the cache) the dictionary and print what it holds.

    The dictionary is cached on disk (SYNTHMRF_CACHE_DIR, default ~/.cache/synthmrf) by sequence hash,
    grid and EPG settings, so the second call is instant.
    """
    from pipeline.mrf.dictionary import load_or_build_dictionary
    from pipeline.mrf.sequence import load_sequence

    seq = load_sequence(sequence_name)
    d = load_or_build_dictionary(seq, rank=rank, device=device, progress=True)
    t1, t2 = d.grid.t1_axis(), d.grid.t2_axis()
    info = {
        "sequence": seq.name, "sequence_hash": seq.hash(), "frames": seq.n_frames,
        "atoms": d.n_atoms, "t1_ms": [float(t1[0]), float(t1[-1]), t1.size],
        "t2_ms": [float(t2[0]), float(t2[-1]), t2.size], "relative_step": d.grid.step,
        "epg_states": d.n_states, "rank": d.rank,
        "energy_fraction": {str(k): round(d.energy_fraction(k), 6) for k in (1, 2, 4, 8, 15)},
    }
    click.echo(json.dumps(info, indent=2))


@mrf.command()
@click.option("--sequence", "sequence_name", default=DEFAULT_SEQUENCE, show_default=True, help=SEQUENCE_HELP)
@click.option("--t1", "t1_path", required=True, type=click.Path(exists=True, dir_okay=False), help="T1 map (ms).")
@click.option("--t2", "t2_path", required=True, type=click.Path(exists=True, dir_okay=False), help="T2 map (ms).")
@click.option("--pd", "pd_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Proton density map; voxels with PD = 0 are left empty.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Output SV.nii.gz.")
@click.option("--rank", default=DEFAULT_RANK, show_default=True, type=RANK, help="Singular components K.")
@click.option("--snr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Add complex Gaussian noise at this SNR: RMS coefficient magnitude over RMS noise magnitude, "
                   "averaged over voxels with PD > 0. Default: no noise.")
@click.option("--seed", default=0, show_default=True, help="Noise seed.")
@device_option
def simulate(sequence_name: str, t1_path: str, t2_path: str, pd_path: str, out_path: str, rank: int,
             snr: float | None, seed: int, device: str) -> None:
    """Compressed MRF coefficients (4-D complex64 NIfTI, last axis = component, phase-normalised)."""
    import numpy as np

    from pipeline.mrf.coefficients import add_complex_noise, phase_normalise
    from pipeline.mrf.dictionary import load_or_build_dictionary
    from pipeline.mrf.sequence import load_sequence
    from pipeline.mrf.simulate import simulate_coefficients
    from pipeline.volume_io import load_volume, save_volume

    seq = load_sequence(sequence_name)
    t1, affine = load_volume(t1_path)
    t2, _ = load_volume(t2_path)
    pd, _ = load_volume(pd_path)
    d = load_or_build_dictionary(seq, rank=rank, device=device, progress=True)
    coeffs = simulate_coefficients(seq, d, t1, t2, pd, device=device)
    if snr is not None:
        active = pd != 0
        level = float(np.linalg.norm(coeffs[active], axis=-1).mean()) if active.any() else 0.0
        coeffs = add_complex_noise(coeffs, level / (snr * np.sqrt(2 * rank)), np.random.default_rng(seed))
        coeffs[~active] = 0
    save_volume(out_path, phase_normalise(coeffs), affine)
    click.echo(f"wrote {out_path} ({coeffs.shape[-1]} components, sequence {seq.hash()[:12]})")


@mrf.command()
@click.option("--sequence", "sequence_name", default=DEFAULT_SEQUENCE, show_default=True, help=SEQUENCE_HELP)
@click.option("--svd", "svd_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Compressed coefficients (4-D complex NIfTI) made with the same sequence.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Match only where mask > 0 (default: where the coefficients are non-zero).")
@click.option("--method", type=click.Choice(["fast", "brute-force"]), default="fast", show_default=True,
              help="fast: exact branch and bound; brute-force: every atom, the reference.")
@device_option
def match(sequence_name: str, svd_path: str, out_dir: str, mask_path: str | None, method: str, device: str) -> None:
    """T1.nii.gz, T2.nii.gz (ms) and PD.nii.gz from compressed coefficients."""
    import numpy as np

    from pipeline.mrf.dictionary import load_or_build_dictionary
    from pipeline.mrf.matching import Matcher, match_volume
    from pipeline.mrf.sequence import load_sequence
    from pipeline.volume_io import load_volume, save_volume

    seq = load_sequence(sequence_name)
    coeffs, affine = load_volume(svd_path)
    if coeffs.ndim != 4 or not np.iscomplexobj(coeffs):
        raise click.BadParameter(f"expected a 4-D complex NIfTI, got {coeffs.ndim}-D {coeffs.dtype}",
                                 param_hint="--svd")
    mask = None
    if mask_path is not None:
        mask_data, _ = load_volume(mask_path)
        mask = mask_data > 0
    d = load_or_build_dictionary(seq, rank=coeffs.shape[-1], device=device, progress=True)
    maps = match_volume(coeffs, mask, Matcher(d, device=device), brute_force=method == "brute-force")
    out = Path(out_dir)
    for name, values in maps.items():
        save_volume(out / f"{name}.nii.gz", values, affine)
    click.echo(f"wrote {', '.join(str(out / f'{n}.nii.gz') for n in maps)}")


@mrf.command("demo")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("synthmrf-physics-demo"),
              show_default=True, help="Where the maps and the QC figure are written.")
@device_option
def physics_demo(workdir: Path, device: str) -> None:
    """The physics round trip: a numerical head phantom (known T1/T2/PD) is scanned with the default MRF
    sequence (EPG), noise is added (SNR 20), the signal is SVD-compressed and dictionary-matched, and the
    recovered maps are compared with the truth region by region. Exit status 0 only if every region is
    recovered within tolerance."""
    from pipeline.mrf.physics_demo import run_physics_demo

    report = run_physics_demo(workdir, device=device)
    click.echo(report.table())
    click.echo(f"maps: {workdir}/T1.nii.gz, T2.nii.gz, PD.nii.gz; QC figure: {report.figure}")
    if not report.plausible:
        raise click.ClickException("recovered values outside tolerance")
