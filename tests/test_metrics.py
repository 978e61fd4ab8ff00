"""The server's Prometheus registry: its own, parseable, with every series from the start."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from hybridgraph.server.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}


def test_observations_and_scrape_time_reads() -> None:
    m = Metrics()
    depth = [3]
    m.watch(lambda: depth[0], lambda: 4, lambda: {"hits": 5, "captures": 2,
                                                  "bytes_held": 1024, "held": 2})
    m.finished("http", "length", 12.0, 30.0)
    m.finished("socket", None, float("nan"), 1.0)
    m.finished("socket", "cancelled", float("nan"), 1.0)
    m.refused("http")
    m.tokens([1.0, 2.0, 3.0])
    depth[0] = 7
    s = samples(m)
    assert s[("hybridgraph_requests_total", (("front", "http"), ("outcome", "length")))] == 1
    assert s[("hybridgraph_requests_total", (("front", "http"), ("outcome", "refused")))] == 1
    assert s[("hybridgraph_requests_total", (("front", "socket"), ("outcome", "error")))] == 1
    assert s[("hybridgraph_requests_total", (("front", "socket"), ("outcome", "stop")))] == 0
    assert s[("hybridgraph_ttft_seconds_count", (("front", "http"),))] == 1
    assert s[("hybridgraph_ttft_seconds_count", (("front", "socket"),))] == 0  # no NaNs
    assert s[("hybridgraph_inter_token_seconds_count", ())] == 3
    assert abs(s[("hybridgraph_inter_token_seconds_sum", ())] - 0.006) < 1e-9
    assert s[("hybridgraph_queue_depth", ())] == 7
    assert s[("hybridgraph_graph_hits_total", ())] == 5
    assert s[("hybridgraph_graph_fallbacks_total", ())] == 0
    assert s[("hybridgraph_graph_bytes_held", ())] == 1024


def test_each_server_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.refused("http")
    key = ("hybridgraph_requests_total", (("front", "http"), ("outcome", "refused")))
    assert samples(a)[key] == 1 and samples(b)[key] == 0


def test_no_graph_cache_reads_as_zeros() -> None:
    m = Metrics()
    m.watch(lambda: 0, lambda: 0, lambda: None)
    assert samples(m)[("hybridgraph_graphs_held", ())] == 0
