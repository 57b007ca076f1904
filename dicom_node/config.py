"""The node's configuration: one pydantic model, loaded once from TOML and the environment, passed in.

Every key of ``[section]`` can be overridden by ``SYNTHMRF_<SECTION>__<KEY>`` (upper or lower case).
Values from the environment are read as JSON when they parse as JSON (numbers, booleans, lists,
``null``), otherwise as plain strings; a list also accepts comma-separated values. Destinations are a
list of tables: ``SYNTHMRF_DESTINATIONS`` (a JSON list) replaces them all, and
``SYNTHMRF_DESTINATIONS__<NAME>__<KEY>`` changes one key of the destination called NAME.

Defaults live here and only here; ``config/synthmrf.toml`` spells them out (a test keeps the two equal).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.retro.config import RetroSection, SourceConfig, check_ae_title
from pipeline.contrasts import DEFAULT_CONTRASTS, MAX_CONTRASTS, Contrast
from pipeline.result_kinds import DEFAULT_OUTPUTS, KINDS, SUMMARY

ENV_PREFIX = "SYNTHMRF_"
_PROCESSOR = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class ConfigError(ValueError):
    """The configuration file or an environment override is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeSection(_Section):
    """The DICOM listener (``[node]``)."""

    ae_title: str = "SYNTHMRF"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)  # 0: any free port (tests, the demo)
    storage_dir: Path = Path("var/synthmrf")
    allowed_calling_aets: list[str] = []  # empty: accept any caller
    accept_non_mr: bool = True  # accept every storage SOP class (see [ingress] keep_non_mr) so a PACS sees no refusals
    min_free_mb: int = Field(default=1024, ge=0)  # refuse instances (Out of Resources) when less would remain free
    fsync_directories: bool = False  # also fsync incoming/ after each rename (strict POSIX; ~2x the disk flushes)
    max_associations: int = Field(default=16, ge=1)
    # Open TCP connections, counted from accept (before an association request is read): over either cap a new
    # connection is closed at once. Keep max_connections above max_associations, so that a caller over the
    # association limit gets a DICOM rejection, not a closed socket.
    max_connections: int = Field(default=64, ge=1)
    max_connections_per_peer: int = Field(default=8, ge=1)  # from one IP address
    max_pdu: int = Field(default=1048576, ge=0)  # bytes we accept per PDU (a longer one ends the connection); 0: any
    event_driven: bool = True  # event-driven association reactors (fast_acceptor); false: pynetdicom's polling
    acse_timeout_s: float = Field(default=30.0, gt=0)  # also bounds a caller's TLS handshake
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=120.0, gt=0)  # idle association, or one read from a silent peer
    drain_timeout_s: float = Field(default=60.0, ge=0)  # SIGTERM: how long in-flight associations and jobs may finish
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key: the listener speaks TLS only
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, callers must present a certificate signed by this CA (mutual TLS)
    # Calling AE title -> the name its certificate must carry (subject CN or a DNS/IP subjectAltName): a bound
    # AE title arriving with any other certificate is refused (AE titles alone are easy to spoof). Needs tls_ca.
    tls_identities: dict[str, str] = {}

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "node.ae_title")

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, values: list[str]) -> list[str]:
        return [check_ae_title(v, "node.allowed_calling_aets") for v in values]

    @model_validator(mode="after")
    def _tls_pair(self) -> NodeSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("node.tls_cert and node.tls_key: give both or neither")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("node.tls_ca needs node.tls_cert and node.tls_key")
        if self.tls_identities and self.tls_ca is None:
            raise ValueError("node.tls_identities needs node.tls_ca (callers must present certificates)")
        if self.max_connections < self.max_associations:
            raise ValueError(f"node.max_connections ({self.max_connections}) must be at least node.max_associations "
                             f"({self.max_associations})")
        if self.max_connections_per_peer > self.max_connections:
            raise ValueError(f"node.max_connections_per_peer ({self.max_connections_per_peer}) must be at most "
                             f"node.max_connections ({self.max_connections})")
        return self


class IngressSection(_Section):
    """What the listener accepts and keeps (``[ingress]``). An instance over a limit is refused with 0xA700 (Out of
    Resources) and a log line naming the limit; the limits are read from the header, before pixel data is
    decoded, so a header that claims a huge image costs nothing. Defaults protect a 2-core / 24 GB node."""

    max_instance_mb: float = Field(default=1024.0, gt=0)  # the encoded data set of one instance
    max_pixels: int = Field(default=2**28, ge=1)  # Rows x Columns x frames x samples per pixel (2^28: 512 MB at 16 bit)
    # Elements and sequence items in one header, counted before it is parsed (parsed, each costs about 1 KB: 250,000
    # about 300 MB); a Legacy Converted Enhanced MR header of 400 frames holds about 6,500
    max_header_elements: int = Field(default=250_000, ge=100)
    max_instances_per_series: int = Field(default=5000, ge=1)  # an MPRAGE has 1 (enhanced) to ~400 instances
    keep_non_mr: bool = False  # non-MR instances (a PACS forwarding everything): acknowledged, and kept only if true
    keep_non_candidates: bool = False  # MR instances the [mprage] rules refuse by their own header: the same
    # Space promised to results: an instance is refused unless node.min_free_mb plus this many times the bytes of
    # every series received and not yet processed stays free (results of a 12 MB 192x192x150 series: 90 MB).
    result_space_factor: float = Field(default=8.0, ge=0)


class SeriesSection(_Section):
    """When a series is complete (``[series]``)."""

    quiet_seconds: float = Field(default=30.0, gt=0)  # complete after this long without a new instance
    early_trigger: bool = True  # complete as soon as the expected instance/frame count is reached ...
    settle_seconds: float = Field(default=2.0, ge=0)  # ... and this long has passed without a new instance
    # A series some of whose instances were refused for want of space waits this long for the sender's retry
    # (which completes it) before it is processed as it is.
    hold_refused_s: float = Field(default=900.0, ge=0)


class MprageSection(_Section):
    """Which series are MPRAGE-like 3D T1 volumes (``[mprage]``); see ``series_rules``."""

    require_3d: bool = True  # MRAcquisitionType 3D
    require_gradient_echo: bool = True  # ScanningSequence GR, or EchoPulseSequence GRADIENT (enhanced MR)
    require_inversion: bool = True  # ScanningSequence IR, InversionTime > 0, or InversionRecovery YES
    inversion_implied_by_name: bool = True  # a vendor name pattern stands in for absent inversion headers
    require_name_match: bool = False  # only series whose names match name_patterns
    name_patterns: list[str] = [
        r"mp.?rage",  # Siemens, GE, Philips research: MPRAGE / MP-RAGE / MP_RAGE
        r"tfl3d|\*tfl",  # Siemens turbo-FLASH 3D sequence name
        r"bravo",  # GE BRAVO (IR-prepared FSPGR)
        r"ir.?fspgr|efgre3d",  # GE IR-FSPGR and its pulse sequence name
        r"t1w?.?3d.?tfe|3d.?t1w?.?tfe|t1w?.?tfe|tfe.?t1",  # Philips 3D T1 TFE
    ]
    exclude_patterns: list[str] = [r"localiz|scout|survey|aahead", r"\bmpr\b|reformat|_mpr_|\bmip\b"]
    exclude_image_types: list[str] = ["LOCALIZER", "DERIVED", "SECONDARY"]

    @field_validator("name_patterns", "exclude_patterns")
    @classmethod
    def _regex(cls, values: list[str]) -> list[str]:
        for v in values:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {v!r} ({exc})") from exc
        return values


class RetentionSection(_Section):
    """How long series folders are kept after their job ended (``[retention]``), in days, and what goes first
    when the disk fills."""

    ignored_days: float = Field(default=7.0, ge=0)  # not an MPRAGE
    processed_days: float = Field(default=14.0, ge=0)  # results delivered to every destination
    failed_days: float = Field(default=30.0, ge=0)  # rejected, failed, or a delivery in the dead-letter state
    sweep_interval_s: float = Field(default=3600.0, gt=0)
    # Below this much free space, finished series are removed before their time, oldest first (not MPRAGE and
    # delivered ones, then rejected and failed ones; never one waiting, in a job or not yet delivered), until it
    # is free again. Checked every jobs.takeover_s / 6. 0: off. Must exceed node.min_free_mb.
    high_water_free_mb: int = Field(default=4096, ge=0)


class JobsSection(_Section):
    """The job queue and the pipeline workers (``[jobs]``).

    The job store is the queue: ``sqlite`` keeps it in ``<storage_dir>/jobs.sqlite`` (one machine: one
    ``serve`` per storage folder, any number of local ``worker`` processes); ``postgres`` keeps it in the
    PostgreSQL database at ``database_url`` (several machines: every ``serve`` and ``worker`` of the
    installation uses the same database and the same ``node.storage_dir`` on shared storage).
    """

    backend: Literal["sqlite", "postgres"] = "sqlite"
    database_url: str = ""  # postgresql://user:password@host:5432/dbname (backend 'postgres')
    workers: int = Field(default=1, ge=0)  # pipeline worker processes 'serve' runs; 0: receive and dispatch only
    devices: list[str] = []  # GPU sites: worker i sees CUDA device devices[i % len] (CUDA_VISIBLE_DEVICES)
    max_attempts: int = Field(default=2, ge=1)  # runs of a failing job (errors), and workers a job may kill
    retry_delay_s: float = Field(default=60.0, ge=0)  # first retry; doubles per attempt, at most 1 h
    poll_interval_s: float = Field(default=0.5, gt=0)  # longest a queued job waits for an idle worker to notice it
    takeover_s: float = Field(default=120.0, ge=5)  # a job whose worker has been silent this long runs elsewhere
    stop_timeout_s: float = Field(default=20.0, ge=0)  # SIGTERM: a worker's job is released, else it is killed

    @field_validator("backend", mode="before")
    @classmethod
    def _no_redis(cls, value: object) -> object:
        if value == "redis":
            raise ValueError("jobs.backend 'redis' was removed: the job store is the queue now; use 'sqlite' "
                             "(one machine) or 'postgres' with jobs.database_url (several machines)")
        return value

    @model_validator(mode="after")
    def _url(self) -> JobsSection:
        if self.backend == "postgres" and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("jobs.database_url: backend 'postgres' needs a postgresql://... URL")
        return self

    @property
    def heartbeat_s(self) -> float:
        """How often members renew their heartbeat: six times per takeover period."""
        return self.takeover_s / 6.0


# Processors named by their module before the re-cut of dicom_node (configuration files spell the default out).
MOVED_PROCESSORS = {"dicom_node.pipeline_processor:PipelineProcessor":
                    "dicom_node.workers.pipeline_processor:PipelineProcessor"}


_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ContrastConfig(_Section):
    """One ``[[pipeline.synthetic_contrasts]]`` entry (see :mod:`pipeline.contrasts`): timing in ms; ``ti_ms``
    empty for spin echo, one value for inversion recovery, two (TI1 > TI2) for double inversion."""

    name: str
    description: str
    tr_ms: float
    te_ms: float
    ti_ms: list[float] = []

    @model_validator(mode="after")
    def _valid(self) -> ContrastConfig:
        self.contrast()  # raises ValueError naming what is wrong
        return self

    def contrast(self) -> Contrast:
        return Contrast(self.name, self.description, self.tr_ms, self.te_ms, tuple(self.ti_ms))


DEFAULT_CONTRAST_CONFIGS = [ContrastConfig(name=c.name, description=c.description, tr_ms=c.tr_ms, te_ms=c.te_ms,
                                           ti_ms=list(c.ti_ms)) for c in DEFAULT_CONTRASTS]


class PipelineSection(_Section):
    """What turns a series folder into result DICOM files (``[pipeline]``)."""

    # module:function(input_dir, out_dir, *, model) -> object with .dicom_files, or module:Class taking this section
    processor: str = "dicom_node.workers.pipeline_processor:PipelineProcessor"
    model: str | None = None  # a package folder or NAME-VERSION; None: the registry's active model
    models_dir: Path = Path("var/synthmrf/models")  # the model registry (as 'synthmrf model --models-dir')
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    backend: Literal["auto", "torch", "onnxruntime"] = "auto"  # auto: ONNX Runtime for float32 on CPU, else torch
    derived_series: bool = True  # viewer-friendly derived MR series beside the Parametric Maps
    pd_map: bool = False  # also a PD Parametric Map
    # Process series whose acquisition lies outside the model's trained protocols (field strength, family,
    # timing) instead of rejecting them; provenance.json lists the reasons.
    allow_out_of_range: bool = False
    # The organisation's UID root for every UID of the results (e.g. "1.2.826.0.1.3680043.10.1234"); empty:
    # pydicom's root. Digits and dots, at most 40 characters (the rest of the 64 is random).
    uid_root: str | None = None
    # Synthetic contrasts from the maps (derived MR series "synthetic <name>, not acquired" when derived_series is
    # on); [] for none. Default: T1w, T2w, PDw spin echo, FLAIR and DIR at typical 3 T timing.
    synthetic_contrasts: list[ContrastConfig] = Field(default_factory=lambda: list(DEFAULT_CONTRAST_CONFIGS),
                                                      max_length=MAX_CONTRASTS)

    # Regional T1/T2/PD over the AAL3 atlas regions (regions.csv/json; DICOM Segmentation and TID 1500 report).
    regions: bool = True
    # The summary page (one Secondary Capture, "not for diagnosis"): made only when this is on; destinations
    # receive it when their outputs list "summary".
    summary: bool = False

    @field_validator("synthetic_contrasts")
    @classmethod
    def _unique_contrasts(cls, value: list[ContrastConfig]) -> list[ContrastConfig]:
        names = [c.name for c in value]
        if len(set(names)) != len(names) or {"T1", "T2", "PD", "Q"} & set(names):
            raise ValueError(f"pipeline.synthetic_contrasts: names must be unique and not T1, T2, PD or Q; got {names}")
        return value

    @field_validator("uid_root", mode="before")
    @classmethod
    def _uid_root(cls, value: object) -> object:
        if value in ("", None):
            return None
        if not isinstance(value, str) or not _UID_ROOT.match(value) or len(value) > 40:
            raise ValueError(f"pipeline.uid_root: expected an organisational root like '1.2.826.0.1.3680043.10.1234' "
                             f"(digits and dots, no leading zeros, at most 40 characters), got {value!r}")
        return value

    @field_validator("processor")
    @classmethod
    def _processor(cls, value: str) -> str:
        value = MOVED_PROCESSORS.get(value, value)
        if not _PROCESSOR.match(value):
            raise ValueError(f"pipeline.processor: expected 'module:function', got {value!r}")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model(cls, value: object) -> object:
        return None if value == "" else value


class DispatchSection(_Section):
    """Sending results to the destinations (``[dispatch]``)."""

    max_attempts: int = Field(default=8, ge=1)  # then the delivery is dead-lettered ('synthmrf jobs retry' revives it)
    backoff_initial_s: float = Field(default=10.0, ge=0)
    backoff_max_s: float = Field(default=1800.0, ge=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    calling_ae_title: str | None = None  # None: node.ae_title

    @field_validator("calling_ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else check_ae_title(value, "dispatch.calling_ae_title")


class MetricsSection(_Section):
    """Prometheus endpoint (``[metrics]``); off unless a port is given."""

    port: int | None = Field(default=None, ge=0, le=65535)
    host: str = "127.0.0.1"


class LoggingSection(_Section):
    """Log output of ``synthmrf serve`` (``[logging]``)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Destination(_Section):
    """One ``[[destinations]]`` entry: where results are sent with C-STORE."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = None  # verify the destination's certificate against this CA (default: system CAs)
    tls_cert: Path | None = None  # our client certificate for a destination that requires mutual TLS, with tls_key
    tls_key: Path | None = None
    # The kinds of result objects this destination receives (pipeline/result_kinds.py); a custom processor's
    # files are always sent. A kind the destination refuses by SOP class is recorded, not retried.
    outputs: list[str] = Field(default_factory=lambda: list(DEFAULT_OUTPUTS))

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return check_ae_title(value, "destinations.ae_title")

    @field_validator("outputs", mode="before")
    @classmethod
    def _outputs(cls, value: object) -> object:
        value = _coerce_list(value)
        unknown = [v for v in value if v not in KINDS] if isinstance(value, list) else []
        if unknown:
            raise ValueError(f"destinations.outputs: unknown kinds {unknown}; expected some of {list(KINDS)}")
        return value


class NodeConfig(_Section):
    """The whole configuration of a node."""

    node: NodeSection = NodeSection()
    ingress: IngressSection = IngressSection()
    series: SeriesSection = SeriesSection()
    mprage: MprageSection = MprageSection()
    retention: RetentionSection = RetentionSection()
    jobs: JobsSection = JobsSection()
    pipeline: PipelineSection = PipelineSection()
    dispatch: DispatchSection = DispatchSection()
    metrics: MetricsSection = MetricsSection()
    logging: LoggingSection = LoggingSection()
    destinations: list[Destination] = []
    sources: list[SourceConfig] = []  # archives for query/retrieve (dicom_node.retro.config)
    retro: RetroSection = RetroSection()

    @model_validator(mode="after")
    def _high_water_above_floor(self) -> NodeConfig:
        hw = self.retention.high_water_free_mb
        if hw and hw <= self.node.min_free_mb:
            raise ValueError(f"retention.high_water_free_mb ({hw}) must exceed node.min_free_mb "
                             f"({self.node.min_free_mb}), or be 0 (off)")
        return self

    @model_validator(mode="after")
    def _summary_made_when_sent(self) -> NodeConfig:
        wanting = [d.name for d in self.destinations if SUMMARY in d.outputs]
        if wanting and not self.pipeline.summary:
            raise ValueError(f"destinations {wanting} list 'summary' in outputs, but [pipeline] summary is false: "
                             "set it to true so the summary page is made")
        return self

    @model_validator(mode="after")
    def _unique_destinations(self) -> NodeConfig:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destinations: names must be unique, repeated: {duplicates}")
        return self

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"destination {name!r}: not configured (configured: {[d.name for d in self.destinations]})")

    @property
    def calling_ae_title(self) -> str:
        return self.dispatch.calling_ae_title or self.node.ae_title


def _env_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce_list(value: Any) -> Any:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


TABLE_LISTS = ("destinations", "sources")  # [[destinations]], [[sources]]: lists of named tables


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections = {name: info.annotation for name, info in NodeConfig.model_fields.items() if name not in TABLE_LISTS}
    tables = {name: [dict(d) for d in out.get(name, [])] for name in TABLE_LISTS}
    for key in sorted(environ):
        if not key.upper().startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX):].lower()
        if rest in TABLE_LISTS:
            parsed = _env_value(environ[key])
            if not isinstance(parsed, list) or not all(isinstance(d, dict) for d in parsed):
                raise ConfigError(f"{key}: expected a JSON list of {rest} tables")
            tables[rest] = [dict(d) for d in parsed]
            continue
        if "__" not in rest:
            continue  # other SYNTHMRF_* variables (cache and model folders) are not node configuration
        section, field = rest.split("__", 1)
        if section in TABLE_LISTS:
            name, _, entry_key = field.partition("__")
            match = [d for d in tables[section] if str(d.get("name", "")).lower() == name]
            if not match or not entry_key:
                raise ConfigError(f"{key}: no {section[:-1]} named {name!r} to override (or no key after the name)")
            match[0][entry_key] = _env_value(environ[key])
            continue
        model = sections.get(section)
        if model is None:
            raise ConfigError(f"{key}: unknown section {section!r} (sections: {sorted(sections)}, "
                              f"{', '.join(TABLE_LISTS)})")
        fields = model.model_fields  # type: ignore[union-attr]
        if field not in fields:
            raise ConfigError(f"{key}: unknown key {field!r} in [{section}] (keys: {sorted(fields)})")
        value = _env_value(environ[key])
        annotation = fields[field].annotation
        if get_origin(annotation) is list:
            value = _coerce_list(value)
        elif value == "" and type(None) in get_args(annotation):
            value = None
        out.setdefault(section, {})[field] = value
    for name, entries in tables.items():
        if entries or name in out:
            out[name] = entries
    return out


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: invalid configuration:\n  " + "\n  ".join(lines)


def config_from_mapping(data: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                        source: str = "configuration") -> NodeConfig:
    """Validate ``data`` (as parsed from TOML) with the environment's overrides applied."""
    merged = _apply_env(dict(data), os.environ if environ is None else environ)
    try:
        return NodeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read the TOML file at ``path`` (None: defaults only), apply the environment, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: configuration file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return config_from_mapping(data, environ, source=str(path) if path else "defaults")
