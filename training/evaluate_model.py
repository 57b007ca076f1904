"""Evaluating a model package on held-out subjects: the paper's comparison, plus ground truth.

Per subject: "true" maps = dictionary matching of the subject's MRF coefficients (the paper's
reference); "dl" maps = matching of the coefficients the model synthesises from the MPRAGE; "truth" =
the phantom's ground truth. All three are compared with :func:`training.evaluation.report.evaluate_subjects`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.model.inference import synthesise_channels
from pipeline.model.package import ModelPackage, check_compatible
from pipeline.mrf.coefficients import from_channels
from pipeline.mrf.dictionary import load_or_build_dictionary
from pipeline.mrf.matching import Matcher, match_volume
from pipeline.volume_io import load_volume
from training.evaluation.report import EvaluationSummary, evaluate_subjects
from training.evaluation.subjects import SubjectMaps, load_phantom_subject
from training.preprocess import prepare_subject, subject_protocol

logger = logging.getLogger(__name__)

COMPARISONS = [("true", "dl"), ("truth", "true"), ("truth", "dl")]


def _subject_maps(dataset: Path, subject: str, package: ModelPackage, matcher: Matcher, cache: Path,
                  entry: dict[str, object]) -> SubjectMaps:
    base = load_phantom_subject(dataset, subject)
    prepared = prepare_subject(dataset / subject, cache, protocol=subject_protocol(entry))
    mask = base.brain_mask.astype(bool)
    volume = np.zeros(mask.shape, np.float32)
    volume[:, :, prepared.slices] = np.moveaxis(np.asarray(prepared.inputs, np.float32), 0, 2)
    volume *= np.float32(prepared.input_factor(package.normalisation))
    protocol = prepared.features if package.model.config.protocol_features else None
    channels = synthesise_channels(volume, mask, package, protocol=protocol)
    dl = match_volume(from_channels(channels), mask, matcher)
    coeffs, _ = load_volume(dataset / subject / "mrf_svd.nii.gz")
    true = match_volume(coeffs[..., :4], mask, matcher)
    return base.with_maps("true", true).with_maps("dl", dl)


def evaluate_package(dataset: Path, subjects: list[str], package: ModelPackage, out_dir: Path, cache: Path, *,
                     n_boot: int = 10_000, seed: int = 0, progress: bool = True) -> EvaluationSummary:
    """Write the evaluation report of ``package`` on ``subjects`` of ``dataset`` into ``out_dir``."""
    if not subjects:
        raise ValueError("subjects: nothing to evaluate")
    dictionary = load_or_build_dictionary(package.sequence, rank=4, progress=progress)
    check_compatible(package, dictionary)
    matcher = Matcher(dictionary)
    manifest = json.loads((dataset / "manifest.json").read_text())
    entries = {str(e.get("id")): e for e in manifest.get("subjects", []) if isinstance(e, dict)}

    def maps() -> Iterator[SubjectMaps]:
        for subject in tqdm(subjects, desc="evaluating", unit="subject", disable=not progress):
            yield _subject_maps(dataset, subject, package, matcher, cache, entries.get(subject, {}))

    return evaluate_subjects(maps(), COMPARISONS, out_dir, n_boot=n_boot, seed=seed)
