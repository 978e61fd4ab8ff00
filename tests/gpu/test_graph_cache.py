"""Issue 4 on the GPU: memory comes back, budgets, background capture, the rolling run."""

import gc

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.tokenizer import ByteTokenizer
from hybridgraph.runtime.runner import GRAPH_MEMORY_FRACTION

from .conftest import SMALL, needs_cuda, small_model

pytestmark = [pytest.mark.gpu, needs_cuda]


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, SMALL.vocab_size, (n,), generator=g).tolist()


def test_memory_comes_back_after_eviction():
    model = small_model()
    for shared in (True, False):
        # max_seq_len 1025: the longest prompt a cache of n positions takes is n - 1.
        e = Engine(model, ByteTokenizer(), mode="graph", max_seq_len=1025, capture="none",
                   shared_pool=shared)
        # One capture first: the capture stream's library state (cuBLAS workspace) is made
        # once per cache and stays; what must come back is everything graphs hold.
        e.capture_ahead([64])
        e.graphs.clear()
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved()
        for _ in range(3):  # and it must come back every time: no leak per cycle
            e.capture_ahead([128, 256, 512, 1024])
            held = torch.cuda.memory_reserved() - base
            assert held > 0 and e.graphs.stats.bytes_held > 0
            e.graphs.clear()
            gc.collect()
            torch.cuda.empty_cache()
            after = torch.cuda.memory_reserved() - base
            assert after <= 0.05 * held, (shared, held, after)
            assert e.graphs.stats.bytes_held == 0


def test_budget_too_small_for_any_graph_runs_eagerly_and_correctly():
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = Engine(small_model(), ByteTokenizer(), mode="eager", max_seq_len=512)
    tiny = Engine(small_model(), ByteTokenizer(), mode="hybrid", max_seq_len=512,
                  max_graph_bytes=1)
    assert len(tiny.graphs.graphs) == 0
    assert tiny.graphs.stats.capture_failures > 0
    for n in (4, 50, 130):
        assert tiny.generate(prompt(n, n), 12, stop_ids=[]).tokens == \
            eager.generate(prompt(n, n), 12, stop_ids=[]).tokens
    assert tiny.graphs.stats.fallbacks > 0


def test_background_capture_switches_in_without_changing_results():
    torch.backends.cuda.matmul.allow_tf32 = False
    e = Engine(small_model(), ByteTokenizer(), mode="hybrid", max_seq_len=512,
               coverage="exact", capture="background")
    p = prompt(77, 1)
    first = e.generate(p, 16, stop_ids=[]).tokens
    assert e.graphs.stats.fallbacks > 0 and e.pending
    while e.pending:
        e.run_pending_captures(budget_s=10)
    before = e.graphs.stats.fallbacks
    second = e.generate(p, 16, stop_ids=[]).tokens
    assert second == first
    assert e.graphs.stats.fallbacks == before  # served entirely by graphs now


def test_rolling_cache_of_20_graphs_over_500_distinct_lengths():
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = Engine(small_model(), ByteTokenizer(), mode="eager", max_seq_len=1024)
    rolling = Engine(small_model(), ByteTokenizer(), mode="hybrid", max_seq_len=1024,
                     coverage="exact",
                     capture="on-demand", max_graphs=20)
    for n in range(1, 501):
        p = prompt(n, n)
        assert rolling.generate(p, 2, stop_ids=[]).tokens == eager.generate(p, 2, stop_ids=[]).tokens, n
        assert len(rolling.graphs.graphs) <= 20
    assert rolling.graphs.stats.evictions > 400


def test_a_failed_capture_falls_back_to_eager_and_later_replays_stay_right():
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = Engine(small_model(), ByteTokenizer(), mode="eager", max_seq_len=512)
    e = Engine(small_model(), ByteTokenizer(), mode="hybrid", max_seq_len=512,
               coverage="16,64,128", capture="on-demand")
    real_step_fn = e.runner.step_fn

    def faulty(key):
        fn = real_step_fn(key)
        if key.phase == "prefill" and key.length == 64:
            def syncs():  # a host sync cannot be captured: this capture must fail
                out = fn()
                out.sum().item()
                return out
            return syncs
        return fn

    e.runner.step_fn = faulty  # fault injection, the one place a fake is allowed
    failures = e.graphs.stats.capture_failures
    p = prompt(40, 4)  # bucket 64: its capture fails, the request runs eagerly
    assert e.generate(p, 10, stop_ids=[]).tokens == eager.generate(p, 10, stop_ids=[]).tokens
    assert e.graphs.stats.capture_failures == failures + 1
    for n in (9, 100, 40):  # graphs captured after the failure replay correctly
        q = prompt(n, n)
        assert e.generate(q, 10, stop_ids=[]).tokens == eager.generate(q, 10, stop_ids=[]).tokens
    assert e.graphs.stats.capture_failures == failures + 1  # a failed key is not retried


def test_default_budget_is_a_fraction_of_free_memory():
    e = Engine(small_model(), ByteTokenizer(), mode="graph", max_seq_len=256, capture="none")
    free, _ = torch.cuda.mem_get_info()
    budget = e.stats()["graphs"]["max_bytes"]
    # Measured at construction, after the weights and KV cache: free memory has hardly
    # moved since (no graphs captured), so the budget is about that fraction of it now.
    assert 0.9 * GRAPH_MEMORY_FRACTION * free <= budget <= 1.1 * GRAPH_MEMORY_FRACTION * free
    given = Engine(small_model(), ByteTokenizer(), mode="graph", max_seq_len=256,
                   capture="none", max_graph_bytes=12345)
    assert given.stats()["graphs"]["max_bytes"] == 12345
