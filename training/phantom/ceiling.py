"""How much of a subject's tissue T1 and T2 an MPRAGE can reveal in a phantom world: a ceiling for any
MPRAGE-only method, learned or not.

An MPRAGE's contrast is set by T1 and PD (and the protocol); its T2 weighting (T2* decay over a TE of 2-4 ms)
moves the signal by well under 1 % across a tissue's range of T2. So the most a method can know of a subject's
tissue value is its tissue class and, at best, the tissue's exact T1 and PD. Two oracles per field strength
and tissue, over the subjects of a dataset:

- *class mean*: the mean over subjects of the tissue's value (knows the tissue, nothing of the subject);
- *exact T1 and PD*: the least-squares line of the value on the tissue's own T1 and PD, fitted on the same
  subjects (optimistic: in-sample). For T1 it is exact by construction; for T2 it shows how much of T2 the
  world ties to T1 and PD.

Where T2 is drawn independently of T1 and PD, no MPRAGE-only method can beat the class-mean oracle on T2
beyond chance. The numbers are tissue-level (one value per subject and tissue), not regional means with
partial volume, so they bound the evaluation's regional CCC only approximately.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from training.evaluation.agreement import lin_ccc

QUANTITIES = ("t1_ms", "t2_ms")
BRAIN_TISSUES = ("wm", "gm", "deep_gm")  # the tissues of the evaluation's GM and WM regions
# Fewer subjects per field strength: the exact-T1/PD oracle (3 coefficients, in-sample) falls back to the class mean.
MIN_SUBJECTS_FOR_FIT = 12


@dataclass(frozen=True)
class TissueSpread:
    """One tissue's values over the subjects at one field strength."""

    field_strength_t: float
    tissue: str
    quantity: str
    n_subjects: int
    mean: float
    sd: float
    corr_with_t1: float
    corr_with_pd: float


@dataclass(frozen=True)
class Ceiling:
    """Per quantity: Lin's CCC and median absolute percent error of the two oracles over all (subject,
    tissue) pairs, and the spreads they come from."""

    spreads: list[TissueSpread]
    ccc_class_mean: dict[str, float]
    ccc_exact_t1_pd: dict[str, float]
    mdape_class_mean: dict[str, float]
    mdape_exact_t1_pd: dict[str, float]
    n_pairs: int


def field_strength_of(entry: Mapping[str, object]) -> float:
    """The entry's field strength in T, to the nearest 0.5 T (the oracles' grouping)."""
    acquisition = entry.get("acquisition")
    if not isinstance(acquisition, Mapping) or "field_strength_t" not in acquisition:
        raise ValueError(f"{entry.get('id')}: no acquisition.field_strength_t in its entry")
    return round(float(acquisition["field_strength_t"]) * 2) / 2


def _tissue(entry: Mapping[str, object], tissue: str) -> Mapping[str, float]:
    tissues = entry.get("tissues")
    if not isinstance(tissues, Mapping) or not isinstance(tissues.get(tissue), Mapping):
        raise ValueError(f"{entry.get('id')}: no tissues.{tissue} in its entry")
    return tissues[tissue]


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def identifiability_ceiling(entries: Sequence[Mapping[str, object]],
                            tissues: Sequence[str] = BRAIN_TISSUES) -> Ceiling:
    """The two oracles' agreement with the subjects' tissue values (``entries``: a phantom manifest's subject
    entries, each with ``tissues`` and ``acquisition``). Raises ValueError on fewer than 2 subjects or an entry
    without tissue values."""
    if len(entries) < 2:
        raise ValueError(f"need at least 2 subjects, got {len(entries)}")
    spreads: list[TissueSpread] = []
    truth: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    by_class: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    by_fit: dict[str, list[float]] = {q: [] for q in QUANTITIES}
    fields = sorted({field_strength_of(e) for e in entries})
    for field in fields:
        group = [e for e in entries if field_strength_of(e) == field]
        for tissue in tissues:
            values = {key: np.array([float(_tissue(e, tissue)[key]) for e in group])
                      for key in (*QUANTITIES, "pd")}
            design = np.column_stack([values["t1_ms"], values["pd"], np.ones(len(group))])
            for q in QUANTITIES:
                v = values[q]
                spreads.append(TissueSpread(field, tissue, q, len(group), float(v.mean()), float(v.std()),
                                            _corr(v, values["t1_ms"]), _corr(v, values["pd"])))
                truth[q] += list(v)
                by_class[q] += [float(v.mean())] * len(v)
                if len(group) >= MIN_SUBJECTS_FOR_FIT:
                    coef = np.linalg.lstsq(design, v, rcond=None)[0]
                    by_fit[q] += list(design @ coef)
                else:
                    by_fit[q] += [float(v.mean())] * len(v)

    def mdape(pred: list[float], ref: list[float]) -> float:
        return float(np.median(np.abs(np.subtract(pred, ref)) / np.asarray(ref)) * 100)

    return Ceiling(spreads=spreads,
                   ccc_class_mean={q: lin_ccc(np.array(truth[q]), np.array(by_class[q])) for q in QUANTITIES},
                   ccc_exact_t1_pd={q: lin_ccc(np.array(truth[q]), np.array(by_fit[q])) for q in QUANTITIES},
                   mdape_class_mean={q: mdape(by_class[q], truth[q]) for q in QUANTITIES},
                   mdape_exact_t1_pd={q: mdape(by_fit[q], truth[q]) for q in QUANTITIES},
                   n_pairs=len(truth["t1_ms"]))
