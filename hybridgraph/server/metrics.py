"""Prometheus metrics of one server (both fronts), served by the HTTP front at /metrics.

Each Server has its own registry (never the process-global one), so two servers in one
process, or a test's, never mix their counts. Histograms are observed where the numbers
are made: inter-token gaps from the engine's own per-token times on the worker thread
(prometheus-client is thread-safe), the rest on the event loop when a request finishes.
Queue depth and the graph cache are read at scrape time, never pushed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

FRONTS = ("socket", "http")
OUTCOMES = ("stop", "length", "cancelled", "error", "refused")
TTFT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (.0005, .001, .002, .004, .006, .008, .01, .015, .02, .03, .05, .1, .25, .5, 1)

# GraphStats counters exported as counters (monotonic); the rest of the cache as gauges.
_GRAPH_COUNTERS = ("hits", "misses", "fallbacks", "captures", "capture_failures", "evictions")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("hybridgraph_ttft_seconds", "Time to first token, from the "
                              "request's arrival (queueing included)", ["front"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("hybridgraph_inter_token_seconds", "Gap between a "
                                     "request's successive tokens, as the engine saw them",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram("hybridgraph_request_seconds", "Request arrival to result",
                                 ["front"], buckets=TTFT_BUCKETS, registry=r)
        self.requests = Counter("hybridgraph_requests", "Generate requests by front and "
                                "outcome (refused: turned away before the engine saw them; "
                                "on the socket, any refused frame)",
                                ["front", "outcome"], registry=r)
        for front in FRONTS:  # every series exists from the start, at 0
            for outcome in OUTCOMES:
                self.requests.labels(front, outcome)
            self.ttft.labels(front)
            self.latency.labels(front)
        self.queue_depth = Gauge("hybridgraph_queue_depth", "Requests waiting for the engine",
                                 registry=r)
        self.in_flight = Gauge("hybridgraph_in_flight", "Requests queued or running",
                               registry=r)

    def watch(self, queue_depth: Callable[[], int], in_flight: Callable[[], int],
              graph_stats: Callable[[], dict[str, Any] | None]) -> None:
        """Read these at scrape time (called on the event loop)."""
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)
        self.registry.register(_GraphCollector(graph_stats))

    # ------------------------------------------------------------------ observers

    def finished(self, front: str, finish_reason: str | None, ttft_ms: float,
                 latency_ms: float) -> None:
        """A request left the worker: finish_reason None means it failed."""
        self.requests.labels(front, finish_reason if finish_reason in OUTCOMES else "error").inc()
        if ttft_ms == ttft_ms:  # NaN when no token came (cancelled while queued)
            self.ttft.labels(front).observe(ttft_ms / 1e3)
        self.latency.labels(front).observe(latency_ms / 1e3)

    def refused(self, front: str) -> None:
        self.requests.labels(front, "refused").inc()

    def tokens(self, token_ms: Sequence[float]) -> None:
        for ms in token_ms:
            self.inter_token.observe(ms / 1e3)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _GraphCollector(Collector):
    def __init__(self, graph_stats: Callable[[], dict[str, Any] | None]) -> None:
        self.graph_stats = graph_stats

    def collect(self) -> Iterable[Metric]:
        # An engine without graphs (eager, CPU) reports zeros: the series always exist.
        g = self.graph_stats() or {}
        for name in _GRAPH_COUNTERS:
            yield CounterMetricFamily(f"hybridgraph_graph_{name}", f"Graph cache {name}",
                                      value=float(g.get(name, 0)))
        yield GaugeMetricFamily("hybridgraph_graphs_held", "Captured graphs held",
                                value=float(g.get("held", 0)))
        yield GaugeMetricFamily("hybridgraph_graph_bytes_held", "GPU bytes the held graphs "
                                "use (their pool's growth at capture)",
                                value=float(g.get("bytes_held", 0)))
