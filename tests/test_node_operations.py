"""Operations: the Prometheus endpoint, JSON logs, TLS, the stock (polling) reactors, the Redis backend check."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from node_support import ca_signed, fast_processor, make_series, node_config, result_sink, tool, wait_until
from pydicom.dataset import Dataset

from dicom_node.config import ConfigError
from dicom_node.dimse.client import AssociationError, Peer, echo, store_files
from dicom_node.logs import CHATTY_LIBRARIES, JsonFormatter, configure_logging
from dicom_node.node import Node, NodeLockedError


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        n.stop(drain=False)


def test_metrics_endpoint_counts_instances(tmp_path: Path, node_factory: list[Node]) -> None:
    node = Node(node_config(tmp_path / "n", metrics={"port": 0}), processor=fast_processor).start()
    node_factory.append(node)
    series = make_series(tmp_path / "s", n=5, patient_id="MET")
    report = store_files(series.files, Peer("SYNTHMRF", "127.0.0.1", node.port), "METRICS")
    assert report.ok and len(report.stored) == 5
    assert node.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'synthmrf_instances_total{outcome="stored"} 5.0' in text
    assert "synthmrf_spool_free_bytes" in text and "synthmrf_jobs_queued" in text


def test_one_node_per_storage_folder(tmp_path: Path, node_factory: list[Node]) -> None:
    cfg = node_config(tmp_path / "n")
    node_factory.append(Node(cfg, processor=fast_processor).start())
    with pytest.raises(NodeLockedError, match=r"another synthmrf node is running on this storage folder"):
        Node(cfg, processor=fast_processor).start()


def test_stock_polling_reactors_still_work(tmp_path: Path, node_factory: list[Node]) -> None:
    with result_sink() as sink:
        node = Node(node_config(tmp_path / "n", destinations=[sink.destination()], node={"event_driven": False}),
                    processor=fast_processor).start()
        node_factory.append(node)
        series = make_series(tmp_path / "s", n=10, patient_id="POLL")
        assert store_files(series.files, Peer("SYNTHMRF", "127.0.0.1", node.port), "POLLING").ok
        [result] = wait_until(sink.results, 30, what="the result")
        assert result.comments == "from 10 frames of 10 instances"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (EC: quick to make)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_tls_listener(tmp_path: Path, node_factory: list[Node]) -> None:
    cert, key = self_signed(tmp_path)
    node = Node(node_config(tmp_path / "n", node={"tls_cert": str(cert), "tls_key": str(key)}),
                processor=fast_processor).start()
    node_factory.append(node)
    tls_peer = Peer("SYNTHMRF", "127.0.0.1", node.port, tls=True, tls_ca=cert)
    assert echo(tls_peer, "TLSCLIENT") == 0
    series = make_series(tmp_path / "s", n=3, patient_id="TLS")
    report = store_files(series.files, tls_peer, "TLSCLIENT")
    assert report.ok and len(report.stored) == 3
    with pytest.raises(AssociationError, match=r"association with SYNTHMRF@127.0.0.1:\d+ failed"):
        echo(Peer("SYNTHMRF", "127.0.0.1", node.port), "PLAIN", timeout_s=3)


def test_mutual_tls_binds_calling_ae_titles_to_certificates(tmp_path: Path, node_factory: list[Node],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    ca, certs = ca_signed(tmp_path, ["127.0.0.1", "mr1.radiology.example", "intruder.example"])
    server_cert, server_key = certs["127.0.0.1"]
    node = Node(node_config(tmp_path / "n", node={
        "tls_cert": str(server_cert), "tls_key": str(server_key), "tls_ca": str(ca),
        "tls_identities": {"SCANNER1": "mr1.radiology.example"}}), processor=fast_processor).start()
    node_factory.append(node)

    def peer(name: str | None) -> Peer:
        cert, key = certs[name] if name else (None, None)
        return Peer("SYNTHMRF", "127.0.0.1", node.port, tls=True, tls_ca=ca, tls_cert=cert, tls_key=key)

    series = make_series(tmp_path / "s", n=2, patient_id="MTLS")
    assert echo(peer("mr1.radiology.example"), "SCANNER1") == 0  # trusted: its AE title and its certificate
    assert store_files(series.files, peer("mr1.radiology.example"), "SCANNER1").ok
    assert echo(peer("intruder.example"), "OTHERAE") == 0  # an unbound AE title: the CA suffices
    with caplog.at_level(logging.WARNING, logger="dicom_node"):
        with pytest.raises(AssociationError):  # a bound AE title from another (valid) certificate
            echo(peer("intruder.example"), "SCANNER1", timeout_s=3)
        wait_until(lambda: "is not the one bound to that AE title" in caplog.text, 5, what="the refusal log line")
    assert "intruder.example" in caplog.text
    with pytest.raises((AssociationError, OSError)):  # no client certificate: the handshake fails
        echo(peer(None), "SCANNER1", timeout_s=3)
    with pytest.raises((AssociationError, OSError)):  # plain TCP
        echo(Peer("SYNTHMRF", "127.0.0.1", node.port), "SCANNER1", timeout_s=3)
    with pytest.raises(ConfigError, match=r"node\.tls_identities needs node\.tls_ca"):
        node_config(tmp_path / "m", node={"tls_cert": str(server_cert), "tls_key": str(server_key),
                                          "tls_identities": {"SCANNER1": "x"}})


def test_a_silent_tls_connection_does_not_block_the_listener(tmp_path: Path, node_factory: list[Node]) -> None:
    cert, key = self_signed(tmp_path)
    node = Node(node_config(tmp_path / "n", node={"tls_cert": str(cert), "tls_key": str(key), "acse_timeout_s": 1}),
                processor=fast_processor).start()
    node_factory.append(node)
    with socket.create_connection(("127.0.0.1", node.port)) as silent:  # connects, never says hello
        time.sleep(0.2)  # accepted by now
        assert echo(Peer("SYNTHMRF", "127.0.0.1", node.port, tls=True, tls_ca=cert), "TLSCLIENT", timeout_s=3) == 0
        silent.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # the node gave up on its handshake (acse_timeout_s)
            assert silent.recv(1) == b""


def test_the_removed_redis_backend_and_a_postgres_backend_without_url_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"jobs.backend 'redis' was removed: the job store is the queue"):
        node_config(tmp_path / "n", jobs={"backend": "redis"})
    with pytest.raises(ConfigError, match=r"backend 'postgres' needs a postgresql://"):
        node_config(tmp_path / "n", jobs={"backend": "postgres"})


def test_json_log_lines_carry_identifiers() -> None:
    record = logging.LogRecord("dicom_node.node.router", logging.INFO, __file__, 1, "series %s complete", ("1.2.3",),
                               None)
    record.series_uid = "1.2.3"
    record.job_id = "1.2.3-v1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "series 1.2.3 complete"
    assert (line["series_uid"], line["job_id"], line["level"]) == ("1.2.3", "1.2.3-v1", "INFO")
    assert "study_uid" not in line


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in ("pydicom", *CHATTY_LIBRARIES)}
    yield
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def test_pydicom_messages_quoting_values_never_reach_the_log(restore_logging: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings(record=True) as seen:
        configure_logging("DEBUG", "text")
        Dataset().PatientBirthDate = "1970013X"  # pydicom logs and warns "Invalid value for VR DA: '1970013X'"
        logging.getLogger("dicom_node.test").warning("a line of our own")
    err = capsys.readouterr().err
    assert "a line of our own" in err
    assert "1970013X" not in err
    assert not [w for w in seen if "1970013X" in str(w.message)]


def test_library_chatter_stays_out_of_an_info_log(restore_logging: None,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """highdicom logs about nine INFO lines per result series (90 per study): a service log at INFO keeps our
    lines and the libraries' warnings only."""
    configure_logging("INFO", "text")
    logging.getLogger("highdicom.base").info('copy attributes of module "General Study"')
    logging.getLogger("dicom2nifti.convert_ge").info("Reading and sorting dicom files")
    logging.getLogger("highdicom.base").warning("a library warning")
    logging.getLogger("dicom_node.test").info("a line of our own")
    err = capsys.readouterr().err
    assert "a line of our own" in err and "a library warning" in err
    assert "copy attributes" not in err and "sorting" not in err


def test_rejected_series_is_not_retried(tmp_path: Path, node_factory: list[Node]) -> None:
    from dicom_node.node.job_store import JobState
    from dicom_node.workers.processor import ProcessResult
    from pipeline.dicom_series import SeriesRejected

    calls: list[Path] = []

    def refuse(input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult:
        calls.append(input_dir)
        raise SeriesRejected(f"{input_dir.name}: too few slices for a 3D volume: 5 (need at least 40)")

    node = Node(node_config(tmp_path / "n", jobs={"max_attempts": 3}), processor=refuse).start()
    node_factory.append(node)
    series = make_series(tmp_path / "s", n=5, patient_id="REJ")
    assert store_files(series.files, Peer("SYNTHMRF", "127.0.0.1", node.port), "REJECT").ok
    [job] = wait_until(lambda: node.store.jobs([JobState.REJECTED]), 30, what="the rejection")
    assert job.reason == "input: too few slices for a 3D volume: 5 (need at least 40)"
    assert job.attempts == 1 and len(calls) == 1
