"""UID checks: header values become folder and file names only after passing :func:`require_uid`.

A UID (PS3.5 9.1) is at most 64 characters of digits and dots, components separated by single dots.
Leading zeros inside a component are not allowed by the standard but some scanners write them; they
are accepted because they are harmless in a path. Anything else (``..``, ``/``, spaces, letters, an
empty component) is refused, so no header value can steer a path out of the spool.
"""

from __future__ import annotations

import re

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUIDError(ValueError):
    """A value that should be a UID is not one; the message names the attribute and the value."""


def is_uid(value: object) -> bool:
    """True if ``value`` is a string that can be used as a UID (and as a path component)."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def require_uid(value: object, what: str) -> str:
    """``value`` as a str if it is a valid UID, else :class:`InvalidUIDError` naming ``what``."""
    text = str(value).rstrip("\x00 ") if value is not None else ""
    if not is_uid(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidUIDError(f"{what}: not a valid UID (digits and dots, at most {MAX_UID_LENGTH} characters): "
                         f"{shown!r}")
    return text
