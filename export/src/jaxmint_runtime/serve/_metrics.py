"""The server's Prometheus metrics, kept and rendered by ``prometheus_client``.

Each `Server` has its own registry (two servers in one process never mix their
counts). Infer metrics are labelled by ``model`` and ``version``; the process
collector adds the standard ``process_cpu_seconds_total``,
``process_resident_memory_bytes`` and friends; queue depths and open connections
are read when ``/metrics`` is scraped. ``/metrics`` answers in the classic text
format, or in OpenMetrics when the scraper's ``Accept`` header asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from jaxmint_runtime.bench import peak_rss_bytes

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BUCKET = "jaxmint_batch_size_bucket"


class _ScrapeTime(Collector):
    """Gauges whose values are read at scrape time: queue depth per model, connections."""

    def __init__(self, queue_depths: Callable[[], dict], connections: Callable[[], int]):
        self.queue_depths, self.connections = queue_depths, connections

    def collect(self):
        depth = GaugeMetricFamily(
            "jaxmint_queue_depth",
            "Requests waiting for the model (not counting the batch running).",
            labels=("model", "version"),
        )
        for (model, version), value in self.queue_depths().items():
            depth.add_metric((model, version), value)
        yield depth
        yield GaugeMetricFamily(
            "jaxmint_open_connections", "Open client connections.", value=self.connections()
        )
        yield GaugeMetricFamily(
            "jaxmint_process_peak_rss_bytes",
            "Peak resident set size of the server process.",
            value=peak_rss_bytes(),
        )


class Metrics:
    """Counters and histograms of one server, with the calls the server makes.

    Args:
      queue_depths: returns {(model, version): requests waiting}, read at scrape time.
      connections: returns the number of open client connections.
    """

    def __init__(self, queue_depths: Callable[[], dict], connections: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self._children: dict[tuple, Any] = {}
        self._requests = Counter(
            "jaxmint_inference_requests_total",
            "Infer requests to a served model, by model, version and status code.",
            ("model", "version", "code"),
            registry=registry,
        )
        self._http = Counter(
            "jaxmint_http_requests_total",
            "All HTTP requests, by status code (including health, metadata and errors).",
            ("code",),
            registry=registry,
        )
        self._latency = Histogram(
            "jaxmint_inference_request_duration_seconds",
            "Time from a whole infer request received to its response ready.",
            ("model", "version"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._batch_size = Histogram(
            "jaxmint_batch_size",
            "Examples per batch run through the model (after merging requests).",
            ("model", "version"),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        ProcessCollector(registry=registry)
        registry.register(_ScrapeTime(queue_depths, connections))

    def _child(self, metric, *labels):
        """``metric.labels(*labels)``, kept: prometheus_client's lookup (a lock, label
        checks, a dict) showed in a profile of the server under load, three per request.
        Labels are the served models' names and versions and status codes, so the
        cache stays small."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*map(str, labels))
        return child

    def declare(self, model: str, version: str) -> None:
        """Show a model version's series (at zero) before its first request."""
        self._child(self._latency, model, version)
        self._child(self._batch_size, model, version)

    def infer(self, model: str, version: str, code: int, seconds: float | None = None) -> None:
        """Count one answered infer request; time it when it succeeded."""
        self._child(self._requests, model, version, code).inc()
        if seconds is not None:
            self._child(self._latency, model, version).observe(seconds)

    def batch(self, model: str, version: str, size: int) -> None:
        self._child(self._batch_size, model, version).observe(size)

    def http(self, code: int) -> None:
        self._child(self._http, code).inc()

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition body and its content type, as the ``Accept`` header asks."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    # -- reading back (tests, benchmarks) -------------------------------------------------
    def requests(self, model: str, code: int, version: str = "1") -> float:
        labels = {"model": model, "version": version, "code": str(code)}
        return self.registry.get_sample_value("jaxmint_inference_requests_total", labels) or 0.0

    def batch_counts(self, model: str, version: str = "1") -> dict[float, int]:
        """Cumulative batches per upper bound (``inf`` last), as Prometheus reports them."""
        labels = {"model": model, "version": version}
        out = {}
        for bound in [*BATCH_BUCKETS, float("inf")]:
            le = "+Inf" if bound == float("inf") else str(float(bound))
            sample = {**labels, "le": le}
            out[float(bound)] = int(self.registry.get_sample_value(BUCKET, sample) or 0)
        return out
