"""The model registry: installed and built-in model packages, and which one is active.

Installed packages live in ``<root>/<name>-<version>/``; the packages shipped with the product
(every package folder in :data:`pipeline.model.package.SHIPPED_DIR`) are always available as
"builtin". ``<root>/active.json`` holds ``{"active": "<name-version>", "history": [...]}``, written
atomically; with nothing activated, the newest built-in package is active. An install is staged in a
hidden folder inside the root, checked (manifest, checksums, loading, fit to the installation's
dictionary) and only then renamed into place, so a failed install leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.model.inference import features_for, network_input, synthesise_channels
from pipeline.model.package import (
    MANIFEST,
    SHIPPED_DIR,
    ModelPackage,
    PackageError,
    check_compatible,
    load_package,
    read_manifest,
    verify_checksums,
)
from pipeline.mrf.coefficients import CHANNEL_NAMES
from pipeline.mrf.dictionary import Dictionary, load_or_build_dictionary
from pipeline.mrf.sequence import DEFAULT_SEQUENCE, Sequence, load_sequence
from pipeline.protocol import PAPER_PROTOCOL

logger = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
DICTIONARY_RANK = 4
SMOKE_SHAPE = (256, 256, 2)
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


Source = Literal["builtin", "installed"]


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown model, nothing to roll back to, ...)."""


@dataclass(frozen=True)
class ModelEntry:
    """One available package: where it is, whether it is built in or installed, whether it is active."""

    name: str
    source: Source
    path: Path
    manifest: dict[str, object]
    active: bool

    @property
    def sequence_hash(self) -> str:
        seq = self.manifest.get("sequence")
        return str(seq.get("hash", "")) if isinstance(seq, dict) else ""

    @property
    def created(self) -> str:
        training = self.manifest.get("training")
        return str(training.get("created", "-")) if isinstance(training, dict) else "-"

    def metrics_summary(self, limit: int = 3) -> str:
        """Up to ``limit`` scalar metrics as ``key=value``; nested ones by their path (``a.b.c=0.95``).

        A top-level key that every metric shares (such as ``out_of_world``) is left out; ``model info`` shows all.
        """
        metrics = self.manifest.get("metrics")
        if not isinstance(metrics, dict):
            return "-"
        scalars = list(_scalar_leaves(metrics, ()))
        if len(scalars) > 1 and all(len(k) > 1 and k[0] == scalars[0][0][0] for k, _ in scalars):
            scalars = [(k[1:], v) for k, v in scalars]
        return " ".join(f"{'.'.join(k)}={v:.4g}" for k, v in scalars[:limit]) or "-"


def _scalar_leaves(tree: dict[str, object], path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], float]]:
    """The numbers in a nested dict with their key paths, depth first in the manifest's order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _scalar_leaves(value, (*path, str(key)))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield (*path, str(key)), float(value)


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`ModelRegistry.verify` checked; ``in_range_fraction`` is over the smoke mask's voxels."""

    name: str
    checks: tuple[str, ...]
    in_range_fraction: float


Entries = list[ModelEntry]
_Found = tuple[Source, Path, dict[str, object]]


@dataclass(frozen=True)
class _State:
    active: str | None
    history: list[str]


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: ``1.10`` after ``1.9``; numbers before words within a position."""
    parts = re.split(r"[.+_]", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def _package_dirs(folder: Path) -> Iterator[Path]:
    if folder.is_dir():
        yield from sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                          and (p / MANIFEST).is_file())


def _label(manifest: dict[str, object], where: Path) -> str:
    name, version = manifest.get("name"), manifest.get("version")
    for field, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not _SAFE_PART.fullmatch(value):
            raise PackageError(f"{where / MANIFEST}: {field} must be letters, digits, '.', '_', '+' or '-', "
                               f"got {value!r}")
    return f"{name}-{version}"


def _load(path: Path, name: str, device: str | torch.device = "cpu") -> ModelPackage:
    """:func:`load_package`, with any failure to build the model reported as a :class:`PackageError`."""
    try:
        return load_package(path, device=device)
    except PackageError:
        raise
    except (RuntimeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise PackageError(f"{name}: cannot be loaded ({type(exc).__name__}: {exc})") from exc


def _unpack(source: Path, staging: Path) -> Path:
    """Copy or extract ``source`` into ``staging``; return the package folder inside it."""
    if source.is_dir():
        return Path(shutil.copytree(source, staging / source.name))
    target = staging / "unpacked"
    if source.name.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(source, "r:gz") as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise PackageError(f"{source}: not a readable .tar.gz archive ({exc})") from exc
    elif source.suffix == ".zip":
        try:
            with zipfile.ZipFile(source) as archive:
                archive.extractall(target)
        except (zipfile.BadZipFile, OSError) as exc:
            raise PackageError(f"{source}: not a readable .zip archive ({exc})") from exc
    else:
        raise PackageError(f"{source}: expected a package folder, a .tar.gz or a .zip archive")
    if (target / MANIFEST).is_file():
        return target
    inner = list(_package_dirs(target))
    if len(inner) != 1:
        raise PackageError(f"{source}: the archive must hold one package folder (with {MANIFEST}), found {len(inner)}")
    return inner[0]


def _smoke_input() -> tuple[np.ndarray, np.ndarray]:
    """A normalised disk-shaped 'brain' (bright rim, darker core) on a model-sized grid."""
    x, y = np.meshgrid(np.arange(SMOKE_SHAPE[0]), np.arange(SMOKE_SHAPE[1]), indexing="ij")
    r = np.hypot(x - SMOKE_SHAPE[0] / 2, y - SMOKE_SHAPE[1] / 2) / (0.4 * SMOKE_SHAPE[0])
    disk = r < 1
    image = np.where(disk, 0.5 + 0.5 * r, 0.0).astype(np.float32)
    volume = np.repeat(image[:, :, None], SMOKE_SHAPE[2], axis=2)
    return volume / volume.max(), np.repeat(disk[:, :, None], SMOKE_SHAPE[2], axis=2)


class ModelRegistry:
    """Model packages under ``root`` plus the built-in ones in ``shipped_dir``.

    ``sequence`` is the MRF sequence this installation matches against (default: the shipped
    default sequence); a package must have been trained with it and with its dictionary's basis.
    """

    def __init__(self, root: Path, *, shipped_dir: Path = SHIPPED_DIR, sequence: Sequence | None = None) -> None:
        self.root = Path(root)
        self.shipped_dir = Path(shipped_dir)
        self._sequence = sequence
        self._dictionary: Dictionary | None = None

    # ---- state -------------------------------------------------------------------------------

    def _state(self) -> _State:
        path = self.root / ACTIVE_FILE
        if not path.is_file():
            return _State(None, [])
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{path}: not valid JSON ({exc})") from exc
        if (not isinstance(doc, dict) or not isinstance(doc.get("active"), str | None)
                or not isinstance(doc.get("history"), list) or not all(isinstance(h, str) for h in doc["history"])):
            raise RegistryError(f"{path}: expected {{\"active\": name, \"history\": [names]}}, got {doc!r}")
        return _State(doc["active"], doc["history"])

    def _write_state(self, active: str, history: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".active-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"active": active, "history": history}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / ACTIVE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise changes to the registry between processes."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- lookup ------------------------------------------------------------------------------

    def _available(self) -> dict[str, _Found]:
        """Packages by name-version; a folder with an unreadable manifest is skipped with a warning."""
        found: dict[str, _Found] = {}
        folders: tuple[tuple[Source, Path], ...] = (("builtin", self.shipped_dir), ("installed", self.root))
        for source, folder in folders:
            for path in _package_dirs(folder):
                try:
                    manifest = read_manifest(path)
                    found.setdefault(_label(manifest, path), (source, path, manifest))
                except PackageError as exc:
                    logger.warning("skipping %s: %s", path, exc)
        return found

    @staticmethod
    def _default_builtin(available: dict[str, _Found]) -> str | None:
        builtins = [name for name, (source, _, _) in available.items() if source == "builtin"]
        if not builtins:
            return None
        return max(builtins, key=lambda n: (_version_key(str(available[n][2]["version"])), n))

    def active_name(self) -> str | None:
        """The active package's name-version: the activated one, else the newest built-in one.

        An activated built-in package that an upgrade of synthmrf replaced (no longer shipped, never
        installed) gives way to the newest built-in package of the same model name, with a warning: an
        upgrade must not leave a node without a model.
        """
        active = self._state().active
        available = self._available()
        if active is None:
            return self._default_builtin(available)
        if active not in available:
            newest = self._default_builtin(available)
            if newest is not None and active.startswith(f"{available[newest][2]['name']}-"):
                logger.warning("model %s is activated but no longer ships with this installation; using the "
                               "built-in %s that replaced it ('synthmrf model activate' makes it explicit)",
                               active, newest)
                return newest
        return active

    def _find(self, name: str) -> _Found:
        available = self._available()
        if name not in available:
            known = ", ".join(sorted(available)) or "none"
            raise RegistryError(f"model {name!r}: not installed and not built in (available: {known})")
        return available[name]

    def path_of(self, name: str | None = None) -> Path:
        """The folder of package ``name`` (default: the active one), installed or built in."""
        return self._find(self._resolve(name))[1]

    def _resolve(self, name: str | None) -> str:
        if name is not None:
            return name
        active = self.active_name()
        if active is None:
            raise RegistryError("no active model: none is activated and no built-in package ships with this "
                                "installation (use 'synthmrf model install' and 'synthmrf model activate')")
        return active

    def dictionary(self) -> Dictionary:
        """The installation's rank-4 dictionary (built once, then cached on disk)."""
        if self._dictionary is None:
            sequence = self._sequence if self._sequence is not None else load_sequence(DEFAULT_SEQUENCE)
            self._dictionary = load_or_build_dictionary(sequence, rank=DICTIONARY_RANK)
        return self._dictionary

    # ---- operations --------------------------------------------------------------------------

    def list(self) -> Entries:
        """Every available package, built-in ones first, then installed, each sorted by name."""
        available = self._available()
        active = self.active_name()
        return [ModelEntry(name, source, path, manifest, name == active)
                for name, (source, path, manifest) in sorted(available.items(), key=lambda i: (i[1][0], i[0]))]

    def info(self, name: str | None = None) -> dict[str, object]:
        """The manifest of ``name`` (default: the active package)."""
        return self._find(self._resolve(name))[2]

    def install(self, source: Path, *, force: bool = False) -> str:
        """Install a package folder or a .tar.gz/.zip archive of one; return its name-version.

        The package must pass its checksums, load, and fit the installation's dictionary (sequence
        and SVD basis). An installed name-version is replaced only with ``force``; built-in ones never.
        """
        source = Path(source)
        if not source.exists():
            raise RegistryError(f"source: {source} does not exist")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".install-"))
        try:
            unpacked = _unpack(source, staging)
            try:
                manifest = read_manifest(unpacked)
                name = _label(manifest, unpacked)
                self._check_free(name, force)
                verify_checksums(unpacked, manifest)
                check_compatible(_load(unpacked, name), self.dictionary())
            except PackageError as exc:  # name the source, not the staging folder
                raise PackageError(str(exc).replace(str(unpacked), str(source))) from exc
            with self._lock():
                self._check_free(name, force)
                target = self.root / name
                if target.exists():
                    target.rename(staging / "replaced")
                unpacked.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("installed model %s from %s", name, source)
        return name

    def _check_free(self, name: str, force: bool) -> None:
        available = self._available()
        if name in available and available[name][0] == "builtin":
            raise RegistryError(f"model {name!r}: a built-in package has this name and version")
        if (self.root / name).exists() and not force:
            raise RegistryError(f"model {name!r}: already installed in {self.root / name} (use --force to replace it)")

    def verify(self, name: str | None = None) -> VerifyReport:
        """Checksums, loading, fit to the dictionary and a smoke inference of ``name`` (default: active)."""
        name = self._resolve(name)
        _, path, manifest = self._find(name)
        verify_checksums(path, manifest)
        package = _load(path, name)
        check_compatible(package, self.dictionary())
        volume, mask = _smoke_input()
        members = [(name, package)] + ([(f"{name} (fluid network)", package.fluid.package)] if package.fluid else [])
        in_range = 1.0
        for label, member in members:
            out = synthesise_channels(network_input(member, volume, mask, PAPER_PROTOCOL), mask, member,
                                      protocol=features_for(member, PAPER_PROTOCOL))[mask]
            if not np.all(np.isfinite(out)):
                raise PackageError(f"{label}: smoke inference produced non-finite channel values")
            lo, hi = member.channel_ranges[:, 0], member.channel_ranges[:, 1]
            reach_lo = lo - (hi - lo)  # tanh in [-1, 1] scaled by min + (max - min) * y
            tol = 1e-3 * (hi - lo)
            outside = np.any((out < reach_lo - tol) | (out > hi + tol), axis=0)
            if outside.any():
                channels = [c for c, bad in zip(CHANNEL_NAMES, outside, strict=True) if bad]
                raise PackageError(f"{label}: smoke inference values outside the channel ranges in "
                                   f"{', '.join(channels)}")
            in_range = min(in_range, float(np.mean((out >= lo - tol) & (out <= hi + tol))))
        return VerifyReport(name, ("checksums", "load", "sequence and basis", "smoke inference"), in_range)

    def activate(self, name: str) -> None:
        """Make ``name`` (installed or built in, with intact files) active; the previous one goes on the history."""
        with self._lock():
            _, path, manifest = self._find(name)
            verify_checksums(path, manifest)
            previous = self.active_name()
            if previous == name:
                return
            history = self._state().history
            self._write_state(name, history + [previous] if previous is not None else history)
        logger.info("activated model %s (previous: %s)", name, previous)

    def rollback(self) -> str:
        """Re-activate the previous active package; return its name."""
        with self._lock():
            state = self._state()
            history = state.history
            if not history:
                raise RegistryError(f"rollback: no previous model in {self.root / ACTIVE_FILE}")
            previous = history[-1]
            _, path, manifest = self._find(previous)
            verify_checksums(path, manifest)
            self._write_state(previous, history[:-1])
        logger.info("rolled back from model %s to %s", state.active, previous)
        return previous

    def active_package(self, *, device: str | torch.device = "cpu") -> ModelPackage:
        """Load the active package (checksums verified)."""
        return self.load(None, device=device)

    def load(self, name: str | None, *, device: str | torch.device = "cpu") -> ModelPackage:
        """Load package ``name`` (default: the active one), checksums verified."""
        resolved = self._resolve(name)
        return _load(self._find(resolved)[1], resolved, device)


def load_model(ref: str | None, models_dir: Path, *, device: str | torch.device = "cpu") -> ModelPackage:
    """A package folder, an installed or built-in NAME-VERSION, or (``None``) the active model."""
    if ref is not None and Path(ref).is_dir():
        return load_package(Path(ref), device=device)
    return ModelRegistry(models_dir).load(ref, device=device)
