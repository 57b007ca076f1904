"""Prometheus metrics of one node, in its own registry; served over HTTP only when a port is configured."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)


class NodeMetrics:
    """Counters and gauges the stages update; ``serve`` exposes them at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instances = Counter("synthmrf_instances_total", "C-STORE requests by outcome", ["outcome"],
                                 registry=self.registry)
        self.bytes = Counter("synthmrf_received_bytes_total", "Bytes of instances written to the spool",
                             registry=self.registry)
        self.identity_mismatches = Counter("synthmrf_identity_mismatches_total",
                                           "Instances whose StudyInstanceUID or PatientID differs from their series'",
                                           ["attribute"], registry=self.registry)
        self.connections_refused = Counter("synthmrf_connections_refused_total",
                                           "TCP connections closed at accept, by the limit they met", ["limit"],
                                           registry=self.registry)
        self.series = Counter("synthmrf_series_total", "Completed series by decision", ["decision"],
                              registry=self.registry)
        self.jobs = Counter("synthmrf_job_runs_total", "Processing runs by outcome", ["outcome"],
                            registry=self.registry)
        self.processing_seconds = Histogram("synthmrf_processing_seconds", "Processing time per run",
                                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=self.registry)
        self.deliveries = Counter("synthmrf_delivery_attempts_total", "Delivery attempts by destination and outcome",
                                  ["destination", "outcome"], registry=self.registry)
        self.queue_depth = Gauge("synthmrf_jobs_queued", "Jobs waiting to be processed", registry=self.registry)
        self.free_bytes = Gauge("synthmrf_spool_free_bytes", "Free space in the storage folder",
                                registry=self.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._instance_counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()

    def count_instance(self, outcome: str, nbytes: int) -> None:
        self.instances.labels(outcome).inc()
        with self._counts_lock:
            self._instance_counts[outcome] += 1
        if nbytes:
            self.bytes.inc(nbytes)

    def instance_summary(self) -> str:
        """C-STORE outcomes since start, e.g. '120 stored, 300 discarded, 2 out_of_resources'."""
        with self._counts_lock:
            counts = sorted(self._instance_counts.items())
        return ", ".join(f"{n} {outcome}" for outcome, n in counts) or "none"

    def count_refused_connection(self, limit: str) -> None:
        self.connections_refused.labels(limit).inc()

    def count_identity_mismatch(self, attribute: str) -> None:
        self.identity_mismatches.labels(attribute).inc()

    def observe_job(self, outcome: str, seconds: float) -> None:
        self.jobs.labels(outcome).inc()
        self.processing_seconds.observe(seconds)

    def observe_delivery(self, destination: str, outcome: str) -> None:
        self.deliveries.labels(destination, outcome).inc()

    def track(self, queued: Callable[[], float], free_bytes: Callable[[], float]) -> None:
        """Gauges read at scrape time."""
        self.queue_depth.set_function(queued)
        self.free_bytes.set_function(free_bytes)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return its port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._server.server_port)
        logger.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
