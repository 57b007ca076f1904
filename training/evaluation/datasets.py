"""A dataset folder as the evaluation reads it: its manifest's split, entries and acquisition protocols."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.protocol import AcquisitionProtocol
from training.preprocess import PreparedSubject, manifest_entries, prepare_subject, subject_protocol

SPLITS = ("train", "val", "test", "all")
"""Subject selections: a part of the manifest's split, or ``"all"`` (every subject of the manifest)."""


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset folder (``manifest.json``, see :mod:`training.preprocess`) and its manifest."""

    root: Path
    manifest: dict[str, object]

    @classmethod
    def read(cls, root: Path) -> DatasetInfo:
        """Read ``root/manifest.json``."""
        path = root / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no dataset manifest (see the README's dataset layout)")
        return cls(root, json.loads(path.read_text()))

    @property
    def entries(self) -> dict[str, dict[str, object]]:
        """Per-subject manifest entries by subject id (empty for manifests without a ``subjects`` list)."""
        return manifest_entries(self.manifest)

    def split(self, name: str) -> list[str]:
        """Subject ids of the split part ``name``, or of every subject for ``"all"``."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {name!r}")
        split = self.manifest.get("split")
        parts = split if isinstance(split, dict) else {}
        if name != "all":
            return [str(s) for s in parts.get(name, [])]
        listed = [*self.entries, *(str(s) for part in ("train", "val", "test") for s in parts.get(part, []))]
        return list(dict.fromkeys(listed))

    @property
    def register(self) -> bool:
        """Whether the MPRAGE needs registering to the MRF grid (manifest ``mprage_registration``)."""
        return self.manifest.get("mprage_registration", "rigid") != "none"

    def protocol(self, subject: str) -> AcquisitionProtocol:
        """The subject's acquisition (:func:`training.preprocess.subject_protocol`)."""
        return subject_protocol(self.entries.get(subject, {}))

    def prepare(self, subject: str, cache: Path) -> PreparedSubject:
        """The subject's prepared arrays (:func:`training.preprocess.prepare_subject`, cached in ``cache``)."""
        return prepare_subject(self.root / subject, cache, register=self.register, protocol=self.protocol(subject))


def normalised_volume(prepared: PreparedSubject, shape: tuple[int, ...], normalisation: str) -> np.ndarray:
    """The prepared MPRAGE on the MRF grid (``shape``) in a model's ``normalisation``; zero on the slices
    that were not prepared (too little brain)."""
    volume = np.zeros(shape, np.float32)
    volume[:, :, prepared.slices] = np.moveaxis(np.asarray(prepared.inputs, np.float32), 0, 2)
    volume *= np.float32(prepared.input_factor(normalisation))
    return volume
