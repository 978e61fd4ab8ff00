"""GraphRunner on the CPU: keys, lookup with larger-bucket fallback, the miss policies,
capture pending, and that replayed and eager steps give the eager engine's tokens.

CUDA graphs need a GPU, so a stand-in store "captures" a step by keeping its function and
"replays" it into the first call's output tensors: the runner's own logic (which graph,
which shape, what a miss does, what runs after the graph) is what is under test here. The
real capture and replay are tested in tests/gpu/.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.loader import load_model
from hybridgraph.runtime.graphs import CapturedGraph, GraphKey, HeldGraphs
from hybridgraph.runtime.modes import CAPTURE_POLICIES, MODE_SPECS
from hybridgraph.runtime.runner import GRAPH_MEMORY_FRACTION, GraphRunner, default_graph_bytes

MAX_SEQ = 64
PROMPTS = [[1, 72, 101, 108, 108, 111], [1] + list(range(40, 60)), [1, 9]]


class ReplayedFn:
    """Stands in for a CUDA graph: replay re-runs the function into the same output."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.output = fn, fn()

    def replay(self) -> None:
        out = self.fn()
        if out is not None:
            self.output.copy_(out)


class StandInCache(HeldGraphs):
    """GraphCache without CUDA: the real store and policy, a stand-in capture."""

    def __init__(self, fail: set[GraphKey] | None = None) -> None:
        super().__init__()
        self.fail = fail or set()

    def capture(self, key: GraphKey, fn: Callable[[], Any],
                prepare: Callable[[], None] | None = None) -> CapturedGraph | None:
        if key in self.fail:
            self.stats.capture_failures += 1
            return None
        if prepare is not None:
            prepare()
        graph = ReplayedFn(fn)
        return self.hold(key, CapturedGraph(graph, graph.output, 1))  # type: ignore[arg-type]


def engine_with_runner(mode: str, capture: str, cache: StandInCache,
                       coverage: list[int] | None = None) -> Engine:
    """An eager CPU engine whose runner acts as `mode`'s, over the stand-in store."""
    model, tok = load_model("tiny", "cpu", seed=0)
    engine = Engine(model, tok, mode="eager", max_batch=4, max_seq_len=MAX_SEQ)
    old = engine.runner
    engine.runner = GraphRunner(engine.steps, engine.ops, MODE_SPECS[mode],
                                CAPTURE_POLICIES[capture], batch_buckets=old.batch_buckets,
                                windows=[16, 32, MAX_SEQ],
                                prefill_lengths=coverage or old.prefill_lengths,
                                cache=cache)  # type: ignore[arg-type]
    return engine


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    model, tok = load_model("tiny", "cpu", seed=0)
    engine = Engine(model, tok, mode="eager", max_batch=4, max_seq_len=MAX_SEQ)
    return [r.tokens for r in engine.generate_batch(PROMPTS, 20, stop_ids=[])]


def test_keys_bucket_and_name_the_sampler_only_inside_graphs() -> None:
    hybrid = engine_with_runner("hybrid", "none", StandInCache()).runner
    graph = engine_with_runner("graph", "none", StandInCache()).runner
    assert hybrid.key("prefill", 2, 5, "sample") == GraphKey("prefill", 2, 8, "none")
    assert hybrid.key("decode", 1, 17, "sample") == GraphKey("decode", 1, 32, "sample")
    assert graph.key("decode", 1, 17, "sample") == GraphKey("decode", 1, 32, "none")
    keys = hybrid.keys([8])
    assert {k.sampler for k in keys if k.phase == "decode"} == {"greedy", "sample"}
    assert {k.length for k in keys if k.phase == "prefill"} == {8}
    assert [k.batch * k.length for k in keys] == sorted((k.batch * k.length for k in keys),
                                                        reverse=True)


def test_no_graphs_means_exact_shapes() -> None:
    model, tok = load_model("tiny", "cpu", seed=0)
    runner = Engine(model, tok, mode="eager", max_seq_len=MAX_SEQ).runner
    assert runner.cache is None and runner.stats() is None
    plan = runner.plan("decode", 1, 17, "greedy")
    assert (plan.served, plan.length) == (None, 17)
    assert runner.capture_ahead() == 0


@pytest.mark.parametrize("mode", ["graph", "hybrid"])
def test_replayed_steps_give_the_eager_tokens(mode: str, reference: list[list[int]]) -> None:
    cache = StandInCache()
    engine = engine_with_runner(mode, "on-demand", cache)
    out = [r.tokens for r in engine.generate_batch(PROMPTS, 20, stop_ids=[])]
    assert out == reference
    assert cache.stats.captures > 0 and cache.stats.fallbacks == 0
    before = cache.stats.captures
    assert [r.tokens for r in engine.generate_batch(PROMPTS, 20, stop_ids=[])] == reference
    assert cache.stats.captures == before and cache.stats.hits > 0   # all replays now


def test_a_larger_bucket_serves_and_the_prompt_is_padded_to_it(
        reference: list[list[int]]) -> None:
    cache = StandInCache()
    engine = engine_with_runner("hybrid", "none", cache, coverage=[4, 8, 32, MAX_SEQ])
    engine.runner.capture(GraphKey("prefill", 1, 32, "none"))
    plan = engine.runner.plan("prefill", 1, 6, "greedy")
    assert plan.key == GraphKey("prefill", 1, 8, "none")     # 6's own bucket: not held
    assert (plan.served, plan.length) == (GraphKey("prefill", 1, 32, "none"), 32)
    assert engine.generate(PROMPTS[0], 20, stop_ids=[]).tokens == reference[0]


def test_background_defers_the_capture_and_runs_eagerly(reference: list[list[int]]) -> None:
    cache = StandInCache()
    engine = engine_with_runner("hybrid", "background", cache)
    plan = engine.runner.plan("decode", 1, 17, "greedy")
    assert plan.served is None and plan.length == 32          # eager at the window's shape
    assert GraphKey("decode", 1, 32, "greedy") in engine.pending
    assert cache.stats.fallbacks == 1 and cache.stats.captures == 0
    engine.pending.clear()
    assert engine.generate(PROMPTS[0], 20, stop_ids=[]).tokens == reference[0]
    assert cache.stats.captures == 0 and engine.pending
    while engine.pending:
        engine.run_pending_captures(budget_s=10)
    fallbacks = cache.stats.fallbacks
    assert engine.generate(PROMPTS[0], 20, stop_ids=[]).tokens == reference[0]
    assert cache.stats.fallbacks == fallbacks                 # served by graphs now


def test_a_failed_capture_runs_eagerly_at_the_prompts_own_length(
        reference: list[list[int]]) -> None:
    bad = GraphKey("prefill", 1, 8, "none")
    cache = StandInCache(fail={bad})
    engine = engine_with_runner("graph", "on-demand", cache)
    plan = engine.runner.plan("prefill", 1, 6, "greedy")
    assert (plan.key, plan.served, plan.length) == (bad, None, 6)
    assert cache.stats.capture_failures == 1 and cache.stats.fallbacks == 1
    assert engine.generate(PROMPTS[0], 20, stop_ids=[]).tokens == reference[0]


def test_stats_report_the_store() -> None:
    cache = StandInCache()
    engine = engine_with_runner("hybrid", "on-demand", cache)
    engine.generate(PROMPTS[2], 4, stop_ids=[])
    graphs = engine.stats()["graphs"]
    assert graphs["held"] == len(cache.graphs) > 0
    assert graphs["captures"] == cache.stats.captures and graphs["pending"] == 0


def test_default_graph_budget_is_a_fraction_of_free_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    assert default_graph_bytes(torch.device("cuda")) == int(GRAPH_MEMORY_FRACTION * (8 << 30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 << 30))
    assert default_graph_bytes(torch.device("cuda")) == 1   # a budget, never "no limit"


def test_capture_ahead_runs_the_hook_between_the_dry_pass_and_the_first_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """after_dry_pass (Engine: wait for the kernels' self-check) runs once the dry pass has
    compiled and before anything is captured: a failed check then drops the kernels before
    a graph holds them."""
    engine = engine_with_runner("hybrid", "ahead", StandInCache(), coverage=[16])
    runner, order = engine.runner, []
    monkeypatch.setattr(runner, "compile_ahead", lambda keys: order.append("dry") or True)
    real_capture = runner.capture
    monkeypatch.setattr(runner, "capture",
                        lambda key: order.append("capture") or real_capture(key))
    held = runner.capture_ahead(after_dry_pass=lambda: order.append("check"))
    assert held > 0 and order[:3] == ["dry", "check", "capture"]
    assert order.count("dry") == order.count("check") == 1
