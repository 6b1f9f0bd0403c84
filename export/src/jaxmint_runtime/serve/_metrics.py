"""Prometheus text-format metrics: counters, histograms and gauges, thread-safe.

Only what the server needs, in the exposition format version 0.0.4:
``# HELP``/``# TYPE`` lines, cumulative ``_bucket{le=...}`` lines with ``_sum``
and ``_count`` for histograms, label values escaped.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

from jaxmint_runtime.bench import peak_rss_bytes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) and not x.is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, *values: str, amount: float = 1) -> None:
        with self._lock:
            self._values[values] = self._values.get(values, 0) + amount

    def get(self, *values: str) -> float:
        return self._values.get(values, 0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in items]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.bounds = sorted(float(b) for b in buckets)
        self._series: dict[tuple, list] = {}  # labels -> [bucket counts..., +Inf count, sum]
        self._lock = threading.Lock()

    def observe(self, value: float, *values: str) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            series = self._series.get(values)
            if series is None:
                series = self._series[values] = [0] * (len(self.bounds) + 1) + [0.0]
            series[i] += 1
            series[-1] += value

    def declare(self, *values: str) -> None:
        """Show this label set (with zero counts) before anything is observed."""
        with self._lock:
            self._series.setdefault(values, [0] * (len(self.bounds) + 1) + [0.0])

    def counts(self, *values: str) -> dict[float, int]:
        """Cumulative count per upper bound (``inf`` last), as Prometheus reports them."""
        with self._lock:
            series = list(self._series.get(values, [0] * (len(self.bounds) + 2)))
        out, running = {}, 0
        for bound, c in zip([*self.bounds, float("inf")], series[:-1], strict=True):
            running += c
            out[bound] = running
        return out

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            running = 0
            for bound, c in zip([*self.bounds, float("inf")], series[:-1], strict=True):
                running += c
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(series[-1])}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {running}")
        return lines


class Gauge:
    """A value read when metrics are scraped: ``read()`` returns {label values: value}."""

    def __init__(self, name: str, help: str, read: Callable[[], dict], labels: Sequence[str] = ()):
        self.name, self.help, self.labels, self.read = name, help, tuple(labels), read

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        lines += [
            f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in self.read().items()
        ]
        return lines


class Metrics:
    """The server's metrics; ``queue_depths`` and ``connections`` are read at scrape time."""

    def __init__(self, queue_depths: Callable[[], dict], connections: Callable[[], int]):
        self.requests = Counter(
            "jaxmint_inference_requests_total",
            "Infer requests to a served model, by model and HTTP status code.",
            ("model", "code"),
        )
        self.http = Counter(
            "jaxmint_http_requests_total",
            "All HTTP requests, by status code (including health, metadata and errors).",
            ("code",),
        )
        self.latency = Histogram(
            "jaxmint_inference_request_duration_seconds",
            "Time from a whole infer request received to its response ready.",
            (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            ("model",),
        )
        self.batch_size = Histogram(
            "jaxmint_batch_size",
            "Examples per batch run through the model (after merging requests).",
            (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            ("model",),
        )
        self.queue_depth = Gauge(
            "jaxmint_queue_depth",
            "Requests waiting for the model (not counting the batch running).",
            lambda: {(name,): depth for name, depth in queue_depths().items()},
            ("model",),
        )
        self.connections = Gauge(
            "jaxmint_open_connections", "Open client connections.", lambda: {(): connections()}
        )
        self.peak_rss = Gauge(
            "jaxmint_process_peak_rss_bytes",
            "Peak resident set size of the server process.",
            lambda: {(): peak_rss_bytes()},
        )

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.http,
            self.latency,
            self.batch_size,
            self.queue_depth,
            self.connections,
            self.peak_rss,
        ):
            lines += metric.render()
        return ("\n".join(lines) + "\n").encode()
