"""A dataset of some of another dataset's subjects (by protocol family and field strength, or those no given
model trained on), for cross-world checks such as leave-one-protocol-family-out: train on one selection,
evaluate on its complement; and the union of several datasets, to train on several worlds at once.

The new folder holds a manifest and one symbolic link per subject (nothing is copied); each subject keeps its
entry and its part of its source's train/val/test split, so the test subjects stay test subjects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Sequence
from pathlib import Path

from pipeline.protocol import Family
from training.preprocess import subject_protocol

MANIFEST_NAME = "manifest.json"  # as training.phantom.dataset names it (importing that module would load torch)
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
"""What a union's id prefix may hold: it becomes part of a folder name."""
SHARED_FIELDS = ("format", "sequence", "grids", "files", "labels")
"""Manifest fields every dataset of a union must agree on: the same MRF sequence, grids, file names and regions."""


def _matches(entry: dict[str, object], families: Collection[Family], exclude: Collection[Family],
             fields_t: Collection[float]) -> bool:
    protocol = subject_protocol(entry)
    if families and protocol.family not in families:
        return False
    if protocol.family in exclude:
        return False
    return not fields_t or any(abs(protocol.field_strength_t - f) < 0.25 for f in fields_t)


def trained_on(source_manifest: dict[str, object], model_manifests: Sequence[dict[str, object]]) -> set[str]:
    """The subject ids of a phantom dataset that models (their package manifests) trained or validated on: those
    of each model whose training dataset had the same phantom seed (subjects depend only on seed and index, so
    a same-seed dataset of another size or folder holds the same subjects), or was a union with a part of that
    seed (its ids without that part's prefix)."""
    seen: set[str] = set()
    seed = source_manifest.get("seed")
    for model in model_manifests:
        training = model.get("training")
        dataset = training.get("dataset") if isinstance(training, dict) else None
        if not isinstance(dataset, dict) or not isinstance(dataset.get("split"), dict):
            continue
        ids = [str(s) for part in ("train", "val") for s in dataset["split"].get(part, [])]
        if dataset.get("seed") == seed:
            seen.update(ids)
        parts = dataset.get("union_of")  # a union (:func:`union_datasets`): its same-seed sources' ids, unprefixed
        for part in parts if isinstance(parts, list) and seed is not None else []:
            if isinstance(part, dict) and part.get("seed") == seed:
                prefix = str(part.get("prefix", ""))
                seen.update(i[len(prefix):] for i in ids if i.startswith(prefix))
    return seen


def _check_out(out: Path, sources: Sequence[Path]) -> None:
    """Refuse an ``out`` that is one of ``sources`` or lies inside one, or that holds anything but a selection's
    links and manifest."""
    resolved = out.resolve()
    for source in sources:
        if resolved == source.resolve() or source.resolve() in resolved.parents:
            raise ValueError(f"{out}: is or lies inside the source {source}; choose a folder outside it")
    if out.exists() and any(p.name != MANIFEST_NAME and not p.is_symlink() for p in out.iterdir()):
        raise ValueError(f"{out}: holds files other than a selection's links; choose an empty or new folder")


def _link(out: Path, targets: dict[str, Path]) -> None:
    """Replace ``out``'s links (an earlier selection's; :func:`_check_out` allows nothing else) by ``targets``,
    resolved before anything is removed."""
    resolved = {name: target.resolve() for name, target in targets.items()}
    out.mkdir(parents=True, exist_ok=True)
    for link in out.iterdir():
        if link.is_symlink():
            link.unlink()
    for name, target in resolved.items():
        os.symlink(target, out / name, target_is_directory=True)


def union_datasets(sources: Sequence[tuple[Path, str]], out: Path) -> Path:
    """Write ``out/manifest.json`` with every subject of each ``(source, prefix)``, its id prefixed (``prefix`` +
    id, so two worlds' ``sub-001`` stay apart) and keeping its part of its source's split, in the sources' order;
    link their folders; return the manifest path. The top-level fields are the first source's, ``seed`` is None
    and ``union_of`` records each source's folder, prefix, seed and options. Raises ValueError unless there are
    two or more sources with distinct non-empty prefixes that agree on :data:`SHARED_FIELDS`."""
    if len(sources) < 2:
        raise ValueError(f"sources: a union needs at least 2 datasets, got {len(sources)}")
    prefixes = [prefix for _, prefix in sources]
    if any(not PREFIX_PATTERN.fullmatch(p) for p in prefixes) or len(set(prefixes)) != len(prefixes):
        raise ValueError(f"prefixes: must be distinct and made of letters, digits, '.', '_' and '-' only, got "
                         f"{prefixes} (name them with --prefix)")
    manifests = [json.loads((source / MANIFEST_NAME).read_text()) for source, _ in sources]
    for (source, _), manifest in zip(sources, manifests, strict=True):
        if not isinstance(manifest.get("subjects"), list):
            raise ValueError(f"{source / MANIFEST_NAME}: no 'subjects' list (synthmrf phantom make datasets only)")
        for name in SHARED_FIELDS:
            if manifest.get(name) != manifests[0].get(name):
                raise ValueError(f"{source}: its manifest's {name!r} differs from {sources[0][0]}'s; datasets of one "
                                 "union must share the MRF sequence, grids, file names and regions")
    _check_out(out, [source for source, _ in sources])
    union = dict(manifests[0])
    union["subjects"], union["split"] = [], {"train": [], "val": [], "test": []}
    targets: dict[str, Path] = {}
    for (source, prefix), manifest in zip(sources, manifests, strict=True):
        for entry in manifest["subjects"]:
            sid = prefix + str(entry["id"])
            union["subjects"].append({**entry, "id": sid})
            targets[sid] = source / str(entry["id"])
        split = manifest.get("split") if isinstance(manifest.get("split"), dict) else {}
        for part in ("train", "val", "test"):
            union["split"][part] += [prefix + str(s) for s in split.get(part, [])]
    if len(targets) != len(union["subjects"]):
        raise ValueError("prefixes: two subjects get the same id; choose prefixes that keep the sources apart")
    union["n_subjects"], union["seed"] = len(union["subjects"]), None
    union.pop("options", None)
    union["union_of"] = [{"dataset": str(source.resolve()), "prefix": prefix, "seed": m.get("seed"),
                          "options": m.get("options")} for (source, prefix), m in zip(sources, manifests, strict=True)]
    _link(out, targets)
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(union, indent=1) + "\n")
    return path


def select_subjects(source: Path, out: Path, *, families: Collection[Family] = (), exclude: Collection[Family] = (),
                    fields_t: Collection[float] = (), unseen_by: Sequence[dict[str, object]] = ()) -> Path:
    """Write ``out/manifest.json`` with the subjects of ``source`` whose acquisition is of one of ``families``
    (all if empty), none of ``exclude`` and one of ``fields_t`` (all if empty), and that none of the models
    ``unseen_by`` (package manifests) trained or validated on; link their folders; return the manifest path.
    Raises ValueError if nothing is selected or ``out`` holds another dataset."""
    manifest = json.loads((source / MANIFEST_NAME).read_text())
    entries = manifest.get("subjects")
    if not isinstance(entries, list):
        raise ValueError(f"{source / MANIFEST_NAME}: no 'subjects' list; only datasets with per-subject entries "
                         "(synthmrf phantom make) can be selected from")
    seen = trained_on(manifest, unseen_by)
    chosen = [e for e in entries if _matches(e, set(families), set(exclude), set(fields_t))
              and str(e["id"]) not in seen]
    if not chosen:
        raise ValueError(f"{source}: no subject matches ({len(seen)} seen by the models; families "
                         f"{sorted(f.value for f in families) or 'any'}, excluding "
                         f"{sorted(f.value for f in exclude) or 'none'}, fields "
                         f"{sorted(fields_t) or 'any'} T)")
    _check_out(out, [source])
    ids = [str(e["id"]) for e in chosen]
    _link(out, {sid: source / sid for sid in ids})
    split = manifest.get("split")
    split = split if isinstance(split, dict) else {}
    selected = dict(manifest)
    selected["subjects"] = chosen
    selected["n_subjects"] = len(chosen)
    selected["split"] = {part: [s for s in split.get(part, []) if s in ids] for part in ("train", "val", "test")}
    selected["selected_from"] = {"dataset": str(source.resolve()), "families": sorted(f.value for f in families),
                                 "excluded_families": sorted(f.value for f in exclude),
                                 "field_strengths_t": sorted(fields_t),
                                 "unseen_by": sorted({f"{m.get('name')}-{m.get('version')}" for m in unseen_by})}
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(selected, indent=1) + "\n")
    return path
