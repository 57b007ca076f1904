"""Node configuration: the shipped defaults file, environment overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import ConfigError, NodeConfig, config_from_mapping, load_config
from pipeline.result_kinds import DEFAULT_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS_FILE = ROOT / "config" / "synthmrf.toml"


def test_shipped_file_spells_out_the_defaults() -> None:
    from_file = load_config(DEFAULTS_FILE, environ={}).model_dump()
    defaults = NodeConfig().model_dump()
    assert from_file.pop("destinations") == [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                              "port": 4242, "tls": False, "tls_ca": None, "tls_cert": None,
                                              "tls_key": None, "outputs": list(DEFAULT_OUTPUTS)}]
    defaults.pop("destinations")
    assert from_file == defaults


def test_contract_keys_and_defaults() -> None:
    cfg = NodeConfig()
    assert (cfg.node.ae_title, cfg.node.host, cfg.node.port) == ("SYNTHMRF", "0.0.0.0", 11112)
    assert cfg.node.storage_dir == Path("var/synthmrf")
    assert cfg.node.allowed_calling_aets == []
    assert cfg.series.quiet_seconds == 30
    assert cfg.jobs.backend == "sqlite"
    assert cfg.pipeline.processor == "dicom_node.workers.pipeline_processor:PipelineProcessor"


def test_environment_overrides_every_kind_of_key() -> None:
    env = {
        "SYNTHMRF_NODE__PORT": "104",
        "SYNTHMRF_NODE__ALLOWED_CALLING_AETS": "PACS, SCANNER1",
        "SYNTHMRF_NODE__STORAGE_DIR": "/srv/synthmrf",
        "SYNTHMRF_SERIES__QUIET_SECONDS": "12.5",
        "SYNTHMRF_SERIES__EARLY_TRIGGER": "false",
        "SYNTHMRF_MPRAGE__NAME_PATTERNS": '["mprage", "bravo"]',
        "SYNTHMRF_JOBS__BACKEND": "postgres",
        "SYNTHMRF_JOBS__DATABASE_URL": "postgresql://synthmrf:secret@db.example:5432/synthmrf",
        "SYNTHMRF_METRICS__PORT": "9464",
        "SYNTHMRF_PIPELINE__MODEL": "",
        "SYNTHMRF_DESTINATIONS__PACS__PORT": "4243",
        "synthmrf_dispatch__max_attempts": "3",
        "SYNTHMRF_CACHE_DIR": "/tmp/not-node-config",  # other synthmrf variables are left alone
    }
    cfg = load_config(DEFAULTS_FILE, environ=env)
    assert cfg.node.port == 104
    assert cfg.node.allowed_calling_aets == ["PACS", "SCANNER1"]
    assert cfg.node.storage_dir == Path("/srv/synthmrf")
    assert cfg.series.quiet_seconds == 12.5 and cfg.series.early_trigger is False
    assert cfg.mprage.name_patterns == ["mprage", "bravo"]
    assert (cfg.jobs.backend, cfg.jobs.database_url) == ("postgres", "postgresql://synthmrf:secret@db.example:5432/synthmrf")
    assert cfg.metrics.port == 9464
    assert cfg.pipeline.model is None
    assert cfg.destination("pacs").port == 4243
    assert cfg.dispatch.max_attempts == 3


def test_environment_replaces_destinations_with_json() -> None:
    env = {"SYNTHMRF_DESTINATIONS": '[{"name": "a", "ae_title": "A", "host": "h", "port": 1}, '
                                    '{"name": "b", "ae_title": "B", "host": "h", "port": 2}]'}
    cfg = load_config(DEFAULTS_FILE, environ=env)
    assert [d.name for d in cfg.destinations] == ["a", "b"]


def test_environment_sets_and_overrides_sources() -> None:
    env = {"SYNTHMRF_SOURCES": '[{"name": "archive", "ae_title": "PACS", "host": "h", "port": 104}]',
           "SYNTHMRF_SOURCES__ARCHIVE__RETRIEVE": "get"}
    cfg = load_config(DEFAULTS_FILE, environ=env)
    assert [(s.name, s.port, s.retrieve) for s in cfg.sources] == [("archive", 104, "get")]


@pytest.mark.parametrize(("data", "env", "message"), [
    ({"node": {"portt": 1}}, {}, r"node\.portt: Extra inputs are not permitted"),
    ({"nodes": {}}, {}, r"nodes: Extra inputs are not permitted"),
    ({"node": {"ae_title": "WAY_TOO_LONG_AE_TITLE"}}, {}, r"node\.ae_title: .*an AE title is 1 to 16"),
    ({"node": {"tls_cert": "/c.pem"}}, {}, r"tls_cert and node\.tls_key: give both or neither"),
    ({"node": {"max_associations": 100}}, {},
     r"node\.max_connections \(64\) must be at least node\.max_associations \(100\)"),
    ({"node": {"max_connections": 20, "max_connections_per_peer": 30}}, {},
     r"node\.max_connections_per_peer \(30\) must be at most node\.max_connections \(20\)"),
    ({"pipeline": {"processor": "no_colon"}}, {}, r"pipeline\.processor: expected 'module:function'"),
    ({"mprage": {"name_patterns": ["("]}}, {}, r"mprage\.name_patterns: .*not a regular expression"),
    ({"destinations": [{"name": "x", "ae_title": "X", "host": "h", "port": 1}] * 2}, {},
     r"destinations: .*names must be unique, repeated: \['x'\]"),
    ({}, {"SYNTHMRF_NODE__NOPE": "1"}, r"SYNTHMRF_NODE__NOPE: unknown key 'nope' in \[node\]"),
    ({}, {"SYNTHMRF_NOSUCH__PORT": "1"}, r"SYNTHMRF_NOSUCH__PORT: unknown section 'nosuch'"),
    ({}, {"SYNTHMRF_DESTINATIONS__GHOST__PORT": "1"}, r"no destination named 'ghost'"),
    ({}, {"SYNTHMRF_SOURCES__GHOST__PORT": "1"}, r"no source named 'ghost'"),
    ({}, {"SYNTHMRF_SOURCES": '{"name": "x"}'}, r"SYNTHMRF_SOURCES: expected a JSON list of sources tables"),
    ({}, {"SYNTHMRF_NODE__PORT": "eleven"}, r"node\.port: .*(integer|int).*'eleven'"),
])
def test_invalid_configuration_names_the_key(data: dict[str, object], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(data, environ=env)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"configuration file not found"):
        load_config(tmp_path / "absent.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad, environ={})


def test_the_deploy_configurations_are_valid() -> None:
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    single = load_config(deploy / "synthmrf.toml", environ={})
    assert single.jobs.backend == "sqlite" and single.jobs.workers == 1
    shared = load_config(deploy / "synthmrf-scaleout.toml",
                         environ={"SYNTHMRF_JOBS__DATABASE_URL": "postgresql://u:p@db:5432/synthmrf"})
    assert (shared.jobs.backend, shared.jobs.database_url, shared.jobs.workers) == (
        "postgres", "postgresql://u:p@db:5432/synthmrf", 0)


def test_a_destination_wanting_the_summary_needs_it_made() -> None:
    dest = {"name": "viewer", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 104, "outputs": ["summary"]}
    with pytest.raises(ConfigError, match=r"\[pipeline\] summary"):
        config_from_mapping({"destinations": [dest]}, environ={})
    cfg = config_from_mapping({"destinations": [dest], "pipeline": {"summary": True}}, environ={})
    assert cfg.pipeline.summary and cfg.destinations[0].outputs == ["summary"]
