"""Prometheus metrics for one server: counters and histograms as things happen, gauges read at scrape time.

Every server has its own :class:`~prometheus_client.CollectorRegistry`, so
several servers in one process (tests, benchmarks) never mix their counts.
Labels stay low-cardinality: op names, outcome codes, rejection reasons,
library and archive names; never a connection or a request id.
``GET /metrics`` serves :meth:`Metrics.exposition`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

# Roughly geometric, from sub-millisecond up: a cached text answers in ~0.2 ms, a busy queue takes seconds.
SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128)
CLIP_SECONDS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's metrics. ``state`` is called at each scrape for the gauges and the counters that the
    batcher, caches and server already keep (so nothing is counted twice)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("clap_ws_requests", "Requests answered, by op and outcome (ok or the error code)",
                                ["op", "outcome"], registry=r)
        self.items = Counter("clap_ws_items", "Sounds and texts in answered requests, by kind", ["kind"], registry=r)
        self.rejected = Counter("clap_ws_rejected", "Connections and requests refused, by reason", ["reason"],
                                registry=r)
        self.request_seconds = Histogram("clap_ws_request_seconds", "End-to-end time from receiving a request to "
                                         "its reply being ready, by op", ["op"], buckets=SECONDS, registry=r)
        self.queue_seconds = Histogram("clap_ws_queue_wait_seconds", "Time a job waited for the model",
                                       buckets=SECONDS, registry=r)
        self.model_seconds = Histogram("clap_ws_model_seconds", "Model time per batch", buckets=SECONDS, registry=r)
        self.batch_size = Histogram("clap_ws_batch_size", "Requests (jobs) per model batch", buckets=BATCH,
                                    registry=r)
        self.clip_seconds = Histogram("clap_ws_clip_seconds", "Length of each sound sent to the model, in seconds",
                                      buckets=CLIP_SECONDS, registry=r)
        self._state: Callable[[], dict] | None = None
        r.register(_StateCollector(self))

    def observe_state(self, state: Callable[[], dict]) -> None:
        """Read ``state()`` at every scrape; see :class:`_StateCollector` for its keys."""
        self._state = state

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges and counters read from the running server at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        if self.metrics._state is None:
            return
        s = self.metrics._state()
        for name, doc, value in (
                ("batches", "Model batches run", s["batches"]),
                ("dropped", "Queued work dropped because its client had gone", s["dropped"]),
                ("worker_restarts", "Times the watchdog restarted a dead inference worker", s["worker_restarts"]),
                ("model_windows", "10-s audio windows the model has run", s["audio_windows"])):
            yield CounterMetricFamily(f"clap_ws_{name}", doc, value=value)
        for cache in ("text", "audio"):
            family = CounterMetricFamily(f"clap_ws_{cache}_cache", f"{cache.title()} cache lookups and evictions",
                                         labels=["result"])
            for key, result in (("hits", "hit"), ("misses", "miss"), ("evictions", "eviction")):
                family.add_metric([result], s[f"{cache}_cache"][key])
            yield family
        for name, doc, value in (("queue_depth", "Jobs waiting for the model", s["queue_depth"]),
                                 ("queue_load", "Windows and texts waiting for the model", s["queue_load"]),
                                 ("connections", "Open WebSocket connections", s["connections"]),
                                 ("worker_alive", "1 while the inference worker runs", int(s["worker_alive"])),
                                 ("projection_version", "Version of the installed projection (0: none)",
                                  s["projection_version"])):
            yield GaugeMetricFamily(f"clap_ws_{name}", doc, value=value)
        for name, doc, sizes in (("library_items", "Items per loaded library", s["libraries"]),
                                 ("archive_items", "Items per archive", s["archives"])):
            gauge = GaugeMetricFamily(f"clap_ws_{name}", doc, labels=["name"])
            for label, count in sizes.items():
                gauge.add_metric([label], count)
            yield gauge
        info = InfoMetricFamily("clap_ws_build", "Version, model and where it runs")
        info.add_metric([], {k: str(v) for k, v in s["info"].items()})
        yield info
