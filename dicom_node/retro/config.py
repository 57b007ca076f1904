"""Configuration of archives (``[[sources]]``) and of retrospective work (``[retro]``).

These models are fields of :class:`dicom_node.config.NodeConfig` (``sources`` and ``retro``); this
module imports nothing from ``dicom_node.config`` so that the two can be loaded in either order.

    [[sources]]
    name = "archive"                 # used on the command line: --source archive
    ae_title = "PACS"
    host = "10.0.0.5"
    port = 104
    retrieve = "move"                # "move": C-MOVE to the node's own AE; "get": C-GET (no route needed)
    # calling_ae_title = "SYNTHMRF"  # default: node.ae_title (the archive must know it for C-MOVE)
    # move_destination = "SYNTHMRF"  # default: node.ae_title
    connect_timeout_s = 10.0
    find_timeout_s = 120.0           # longest silence allowed between two C-FIND responses
    retrieve_timeout_s = 900.0       # longest silence between two C-MOVE/C-GET responses (tape, slow archives)
    max_associations = 1             # associations open at once to this archive (all synthmrf processes)
    slot_wait_s = 600.0              # longest wait for a free association (held by other passes or harvests);
                                     # then the pass fails and is retried (scheduled: after archive_retry_s)

    [retro]
    max_studies_per_run = 50         # a pass stops after this many studies with something to fetch
    # max_studies_per_hour = 20.0    # rate limit (default: none)
    # window = "20:00-06:00"         # passes only run between these local times (may cross midnight)
    max_queued_jobs = 4              # before each study, wait while this many node jobs are queued/processing
    retry_after_s = 3600.0           # a failed series is tried again by passes starting this much later
    max_attempts = 5                 # then it is given up (listed by 'synthmrf retro progress')
    archive_retry_s = 900.0          # a scheduled pass that could not reach the archive (or node) is retried then
    scheduler_poll_s = 30.0          # how soon a running node sees schedules changed by the CLI
    misfire_grace_s = 3600.0         # a schedule missed (node down) still runs if this late at most
    harvest_ae_title = "SYNTHMRF_HARVEST"  # storage SCP of a C-MOVE harvest (known to the archive)
    harvest_port = 11113
    harvest_mrf_pattern = "mrf.?svd" # SeriesDescription (regex, any case) of MRF SVD series
    harvest_split_seed = 0
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 chars, no backslash, no control chars
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def check_ae_title(value: str, what: str) -> str:
    """``value`` stripped if it is a valid AE title, else ValueError naming ``what``."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{what}: an AE title is 1 to 16 printable characters without backslash, got {value!r}")
    return value.strip()


def parse_window(text: str) -> tuple[datetime.time, datetime.time]:
    """``"HH:MM-HH:MM"`` as (start, end) local times; ValueError naming the value."""
    m = _WINDOW.match(text)
    if not m:
        raise ValueError(f"window: expected 'HH:MM-HH:MM' (local time), got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    try:
        start, end = datetime.time(h1, m1), datetime.time(h2, m2)
    except ValueError as exc:
        raise ValueError(f"window: not a time of day in {text!r} ({exc})") from exc
    if start == end:
        raise ValueError(f"window: start and end are equal in {text!r} (leave it out to run at any time)")
    return start, end


def in_window(window: str | None, now: datetime.datetime) -> bool:
    """True if ``now`` (local) lies in ``window`` (None: always); a window may cross midnight."""
    if window is None:
        return True
    start, end = parse_window(window)
    t = now.time()
    return start <= t < end if start < end else (t >= start or t < end)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceConfig(_Model):
    """One ``[[sources]]`` entry: an archive we query (C-FIND) and retrieve from (C-MOVE or C-GET)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["move", "get"] = "move"
    calling_ae_title: str | None = None  # None: node.ae_title
    move_destination: str | None = None  # None: node.ae_title
    connect_timeout_s: float = Field(default=10.0, gt=0)
    find_timeout_s: float = Field(default=120.0, gt=0)
    retrieve_timeout_s: float = Field(default=900.0, gt=0)
    max_associations: int = Field(default=1, ge=1, le=16)
    slot_wait_s: float = Field(default=600.0, gt=0)
    tls: bool = False  # DICOM over TLS to the archive (C-FIND, C-MOVE, C-GET)
    tls_ca: Path | None = None  # verify the archive's certificate against this CA (default: system CAs)
    tls_cert: Path | None = None  # our client certificate for an archive that requires mutual TLS, with tls_key
    tls_key: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "sources.ae_title")

    @field_validator("calling_ae_title", "move_destination")
    @classmethod
    def _optional_ae(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value, "sources.calling_ae_title/move_destination")


class RetroSection(_Model):
    """Retrospective passes, schedules and harvests (``[retro]``)."""

    max_studies_per_run: int = Field(default=50, ge=1)
    max_studies_per_hour: float | None = Field(default=None, gt=0)
    window: str | None = None
    max_queued_jobs: int = Field(default=4, ge=1)
    retry_after_s: float = Field(default=3600.0, ge=0)
    max_attempts: int = Field(default=5, ge=1)
    hold_incomplete_s: float = Field(default=86400.0, ge=0)
    archive_retry_s: float = Field(default=900.0, gt=0)
    scheduler_poll_s: float = Field(default=30.0, gt=0)
    misfire_grace_s: float = Field(default=3600.0, gt=0)
    harvest_ae_title: str = "SYNTHMRF_HARVEST"
    harvest_port: int = Field(default=11113, ge=0, le=65535)
    harvest_mrf_pattern: str = "mrf.?svd"
    harvest_split_seed: int = 0

    @field_validator("window")
    @classmethod
    def _window(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        parse_window(value)
        return value.strip()

    @field_validator("harvest_ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "retro.harvest_ae_title")

    @field_validator("harvest_mrf_pattern")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"retro.harvest_mrf_pattern: not a regular expression: {value!r} ({exc})") from exc
        return value
