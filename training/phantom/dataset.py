"""A phantom dataset: subjects written in parallel, a train/val/test split and a JSON manifest."""

from __future__ import annotations

import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.mrf.dictionary import Dictionary, load_or_build_dictionary
from pipeline.mrf.sequence import Sequence, load_sequence
from training.phantom.anatomy import TISSUES, load_template
from training.phantom.regions import LABEL_NAMES
from training.phantom.subject import ENTRY, FILES, PhantomOptions, draw_subject, make_subject
from training.phantom.tissues import PRIORS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "synthmrf-phantom/1"
SETTINGS_NAME = "settings.json"  # seed and options: a rerun into the folder resumes only with the same ones
SPLIT_FRACTIONS = {"val": 2 / 37, "test": 5 / 37}  # the paper's 30 / 2 / 5 of 37 volunteers


def split_subjects(ids: list[str], seed: int, n_val: int | None = None,
                   n_test: int | None = None) -> dict[str, list[str]]:
    """Seeded split; ``n_val`` and ``n_test`` default to the paper's proportions (val and test get at least one
    subject from 3 subjects on). Raises ValueError if fewer than one training subject would remain."""
    n = len(ids)
    if n_val is None:
        n_val = max(1, round(n * SPLIT_FRACTIONS["val"])) if n >= 3 else 0
    if n_test is None:
        n_test = max(1, round(n * SPLIT_FRACTIONS["test"])) if n >= 2 else 0
    if n_val < 0 or n_test < 0 or n_val + n_test >= n:
        raise ValueError(f"split: {n_val} validation + {n_test} test subjects leave no training subject of {n}")
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**32 - 1,))).permutation(n)
    shuffled = [ids[i] for i in order]
    return {"train": sorted(shuffled[n_val + n_test:]), "val": sorted(shuffled[:n_val]),
            "test": sorted(shuffled[n_val:n_val + n_test])}


_worker_state: dict[str, tuple[Sequence | None, Dictionary | None]] = {}


def _physics(options: PhantomOptions) -> tuple[Sequence | None, Dictionary | None]:
    if not options.mrf:
        return None, None
    sequence = load_sequence(options.sequence)
    return sequence, load_or_build_dictionary(sequence, rank=options.rank, device="cpu")


def _init_worker(options: PhantomOptions) -> None:
    import torch

    torch.set_num_threads(1)  # one subject per process; threads would oversubscribe the cores
    _worker_state["physics"] = _physics(options)


def _made(index: int, out: Path) -> dict[str, object] | None:
    """The entry of subject ``index`` if an earlier, interrupted run of this dataset completed it."""
    path = out / f"sub-{index + 1:03d}" / ENTRY
    return dict(json.loads(path.read_text())) if path.is_file() else None


def _claim_folder(out: Path, settings: dict[str, object]) -> None:
    """Record what the folder is made with; refuse a folder that holds subjects made with other settings."""
    path = out / SETTINGS_NAME
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            raise ValueError(f"{out}: holds subjects made with other settings ({path}); use another folder")
        return
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _make_one(seed: int, index: int, options: PhantomOptions, out: Path) -> dict[str, object]:
    physics = _worker_state.get("physics") or _physics(options)
    sequence, dictionary = physics
    template = load_template()
    subject = draw_subject(seed, index, template, options)
    return make_subject(subject, template, options, out / subject.subject_id, sequence=sequence,
                        dictionary=dictionary)


def make_dataset(n_subjects: int, out: Path, *, seed: int = 0, options: PhantomOptions | None = None,
                 workers: int = 1, progress: bool = True, n_val: int | None = None,
                 n_test: int | None = None) -> Path:
    """Write ``n_subjects`` subjects and the manifest into ``out``; return the manifest path. ``n_val`` and
    ``n_test`` size the split (default: the paper's proportions).

    Subject i depends only on (seed, i), so the result does not depend on ``workers``. A rerun into the
    same folder with the same seed and options keeps the subjects an interrupted run completed.
    """
    if n_subjects < 1:
        raise ValueError(f"n_subjects: must be >= 1, got {n_subjects}")
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    split_subjects([str(i) for i in range(n_subjects)], seed, n_val, n_test)  # a bad split fails before any work
    options = options or PhantomOptions()
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, json.loads(json.dumps({"seed": seed, "options": _options_doc(options)}, default=str)))
    sequence, dictionary = _physics(options)  # builds the dictionary cache once, before any worker
    made = {i: entry for i in range(n_subjects) if (entry := _made(i, out)) is not None}
    todo = [i for i in range(n_subjects) if i not in made]
    if made:
        logger.info("%d of %d subjects already made in %s: resuming", len(made), n_subjects, out)
    bar = tqdm(total=n_subjects, initial=len(made), desc="phantom subjects", unit="subject", disable=not progress)
    if workers == 1:
        _worker_state["physics"] = (sequence, dictionary)
        for i in todo:
            made[i] = _make_one(seed, i, options, out)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(options,)) as pool:
            futures = {i: pool.submit(_make_one, seed, i, options, out) for i in todo}
            for i, future in futures.items():
                made[i] = future.result()
                bar.update()
    bar.close()
    entries = [made[i] for i in range(n_subjects)]
    split = split_subjects([str(e["id"]) for e in entries], seed, n_val, n_test)
    where = {sid: name for name, ids in split.items() for sid in ids}
    for e in entries:
        e["split"] = where[str(e["id"])]
    manifest = {
        "format": MANIFEST_FORMAT,
        "seed": seed,
        "n_subjects": n_subjects,
        # MPRAGE and MRF come from one warp of one anatomy: co-registered by construction.
        "mprage_registration": "none",
        "sequence": None if sequence is None else {"name": sequence.name, "hash": sequence.hash(),
                                                   "rank": options.rank},
        "options": _options_doc(options),
        "grids": {"mrf": _grid_doc(options.mrf_grid()), "mprage": _grid_doc(options.mprage_grid())},
        "files": FILES,
        "tissues": list(TISSUES),
        "tissue_priors": {name: asdict(p) for name, p in PRIORS.items()},
        "labels": {str(i + 1): name for i, name in enumerate(LABEL_NAMES)},
        "split": split,
        "subjects": entries,
    }
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    logger.info("phantom dataset of %d subjects written to %s", n_subjects, out)
    return path


def _options_doc(options: PhantomOptions) -> dict[str, object]:
    doc = {**asdict(replace(options, protocol=None)), "protocol": asdict(options.protocol)}  # type: ignore[arg-type]
    if options.mrf_target == "subject":  # the default: folders made before the option existed still match
        del doc["mrf_target"]
    if options.grey_t2_scale == 1.0:  # likewise
        del doc["grey_t2_scale"]
    if options.csf_t2_range is None:  # likewise
        del doc["csf_t2_range"]
    return doc


def _grid_doc(grid: object) -> dict[str, object]:
    return {"shape": list(grid.shape), "affine_ras": np.round(grid.affine, 6).tolist()}  # type: ignore[attr-defined]
