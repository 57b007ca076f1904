"""The UIDs synthmrf creates for its results: under the site's organisational root when one is configured
(``[pipeline] uid_root``, ``synthmrf process --uid-root``), else under pydicom's root (2.25-style randomness
either way: the rest of the UID is random)."""

from __future__ import annotations

import re

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_ROOT_LENGTH = 40  # leaves 24 characters of the 64 for the random part


def check_uid_root(root: str) -> str:
    """``root`` if it can prefix UIDs (digits and dots, no leading zeros, at most 40 characters), else ValueError."""
    if not _ROOT.match(root) or len(root) > MAX_ROOT_LENGTH:
        raise ValueError(f"uid_root: expected an organisational root like '1.2.826.0.1.3680043.10.1234' (digits and "
                         f"dots, no leading zeros, at most {MAX_ROOT_LENGTH} characters), got {root!r}")
    return root


def new_uid(root: str | None = None) -> str:
    """A new UID, under ``root`` when given."""
    if not root:
        return str(generate_uid())
    return str(generate_uid(prefix=f"{check_uid_root(root)}."))


def stable_uid(root: str | None, *names: str) -> str:
    """The same UID for the same ``names`` (and ``root``): an identifier of a thing, not of an instance."""
    prefix = f"{check_uid_root(root)}." if root else PYDICOM_ROOT_UID
    return str(generate_uid(prefix=prefix, entropy_srcs=list(names)))
