"""Dynamic ops: buckets, pad/truncate, and seeded sampling under all three backends.

Distribution tests use Pearson's chi-square against a fixed critical value at p = 0.001.
The noise is a deterministic hash of (seed, counter, token), so each test is reproducible:
it passes or fails the same way on every run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from hybridgraph.runtime.dynamic import (
    BACKENDS,
    DynamicOps,
    choose_bucket,
    dynamic_ops,
    fit_to_bucket,
    pow2_buckets,
    uniform_noise,
)

# Upper 0.1% points of the chi-square distribution, by degrees of freedom.
CHI2_CRIT_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458,
                  7: 24.322, 8: 26.124, 9: 27.877, 15: 37.697}
N_DRAWS = 20_000


def chi_square(counts: Tensor, probs: Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


class Params:
    """Per-row sampling tensors, as the engine's step buffers hold them."""

    def __init__(self, rows: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 1234, counter: Tensor | None = None) -> None:
        self.temperature = torch.full((rows,), temperature)
        self.top_k = torch.full((rows,), top_k, dtype=torch.int64)
        self.top_p = torch.full((rows,), top_p)
        self.seed = torch.full((rows,), seed, dtype=torch.int64)
        self.counter = torch.arange(rows, dtype=torch.int64) if counter is None else counter

    def args(self) -> tuple[Tensor, ...]:
        return self.temperature, self.top_k, self.top_p, self.seed, self.counter


def draw(logits: Tensor, p: Params, backend: str = "eager") -> Tensor:
    """One sample per row; rows share `logits` ([V]) unless it is already [B, V]."""
    rows = p.temperature.shape[0]
    batch = logits if logits.dim() == 2 else logits.expand(rows, -1).contiguous()
    return dynamic_ops(backend).sample(batch, *p.args())


# ---------------------------------------------------------------------------- backends

@pytest.fixture(scope="module")
def all_ops() -> dict[str, DynamicOps]:
    return {b: dynamic_ops(b) for b in BACKENDS}


def _random_batch(gen: torch.Generator, rows: int, vocab: int) -> tuple[Tensor, Params]:
    logits = torch.randn(rows, vocab, generator=gen) * 3
    p = Params(rows)
    # Mix greedy rows, hot and cold temperatures, with and without top-k / top-p.
    p.temperature = torch.rand(rows, generator=gen) * 2
    p.temperature[0] = 0.0
    p.top_k = torch.randint(0, vocab, (rows,), generator=gen)
    p.top_k[1] = 0
    p.top_p = torch.rand(rows, generator=gen).clamp(min=0.05)
    p.top_p[2] = 1.0
    p.seed = torch.randint(0, 2**62, (rows,), generator=gen)
    p.counter = torch.randint(0, 2**31, (rows,), generator=gen)
    return logits, p


def test_backends_agree_on_sampling(all_ops: dict[str, DynamicOps]) -> None:
    gen = torch.Generator().manual_seed(0)
    # One shape, many inputs: compile specialises per shape, so this costs one compile.
    for _ in range(25):
        logits, p = _random_batch(gen, 8, 64)
        out = {b: ops.sample(logits, *p.args()) for b, ops in all_ops.items()}
        assert torch.equal(out["compile"], out["eager"]), out
        assert torch.equal(out["torchscript"], out["eager"]), out
        best = {b: ops.greedy(logits, *p.args()) for b, ops in all_ops.items()}
        assert torch.equal(best["compile"], logits.argmax(-1))
        assert torch.equal(best["torchscript"], logits.argmax(-1))
        assert torch.equal(best["eager"], logits.argmax(-1))


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown dynamic backend 'numba'"):
        dynamic_ops("numba")


def test_ops_are_built_once() -> None:
    assert dynamic_ops("torchscript") is dynamic_ops("torchscript")
    assert dynamic_ops("eager").sampler("greedy") is dynamic_ops("eager").greedy
    assert dynamic_ops("eager").sampler("sample") is dynamic_ops("eager").sample


# --------------------------------------------------------------------- distributions

def test_temperature_sampling_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    for temperature in (1.0, 0.5, 2.0):
        tokens = draw(logits, Params(N_DRAWS, temperature=temperature))
        counts = torch.bincount(tokens, minlength=8)
        probs = torch.softmax(logits / temperature, -1)
        assert chi_square(counts, probs) < CHI2_CRIT_P001[7], (temperature, counts)


def test_wrong_temperature_would_be_detected() -> None:
    # The statistic has power: the T=1 draws are far from softmax(logits / 2).
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    counts = torch.bincount(draw(logits, Params(N_DRAWS)), minlength=8)
    assert chi_square(counts, torch.softmax(logits / 2, -1)) > 10 * CHI2_CRIT_P001[7]


def test_temperature_zero_is_greedy() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 50, generator=gen)
    assert torch.equal(draw(logits, Params(64, temperature=0.0)), logits.argmax(-1))


def test_top_k_keeps_only_the_k_most_likely() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, generator=gen)
    top5 = torch.topk(logits, 5).indices
    tokens = draw(logits, Params(N_DRAWS, top_k=5, temperature=1.5))
    assert torch.isin(tokens, top5).all()
    counts = torch.bincount(tokens, minlength=50)[top5]
    probs = torch.softmax(logits[top5] / 1.5, -1)
    assert chi_square(counts, probs) < CHI2_CRIT_P001[4]
    # top_k = 1 is greedy whatever the temperature.
    assert (draw(logits, Params(100, top_k=1, temperature=5.0)) == logits.argmax()).all()


def test_top_p_keeps_only_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.4, 0.02, 0.15, 0.25, 0.1, 0.03])
    logits = probs.log()
    # Sorted masses 0.4, 0.25, 0.15 cover 0.8 >= 0.7: the nucleus is tokens {1, 4, 3}.
    nucleus = torch.tensor([1, 4, 3])
    tokens = draw(logits, Params(N_DRAWS, top_p=0.7))
    assert torch.isin(tokens, nucleus).all()
    counts = torch.bincount(tokens, minlength=7)[nucleus]
    assert chi_square(counts, probs[nucleus] / probs[nucleus].sum()) < CHI2_CRIT_P001[2]
    # The most likely token always stays, however small top_p is.
    assert (draw(logits, Params(200, top_p=1e-6)) == 1).all()


def test_top_k_and_top_p_combine() -> None:
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1])
    # top_k 3 renormalises to 0.4, 0.33, 0.27; top_p 0.5 then keeps tokens {0, 1}.
    tokens = draw(probs.log(), Params(5000, top_k=3, top_p=0.5))
    assert set(tokens.unique().tolist()) == {0, 1}


def test_same_seed_and_counter_give_the_same_draw() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(100, generator=gen)
    counter = torch.arange(500)
    a = draw(logits, Params(500, seed=42, counter=counter))
    b = draw(logits, Params(500, seed=42, counter=counter.clone()))
    assert torch.equal(a, b)
    # A draw is a function of (seed, counter) alone, not of its row or batch.
    rows = draw(logits, Params(3, seed=42, counter=torch.tensor([7, 7, 7])))
    assert rows.tolist() == [int(a[7])] * 3
    other = draw(logits, Params(500, seed=43, counter=counter))
    assert (other != a).float().mean() > 0.5


def test_counters_and_seeds_decorrelate() -> None:
    # Uniform over 4 tokens: consecutive draws must be independent, i.e. every pair of
    # (token at counter c, token at counter c + 1) has probability 1/16.
    logits = torch.zeros(4)
    tokens = draw(logits, Params(N_DRAWS + 1, seed=9))
    pairs = torch.bincount(tokens[:-1] * 4 + tokens[1:], minlength=16)
    assert chi_square(pairs, torch.full((16,), 1 / 16)) < CHI2_CRIT_P001[15]
    # Same for neighbouring seeds at one counter.
    by_seed = Params(N_DRAWS + 1, counter=torch.zeros(N_DRAWS + 1, dtype=torch.int64))
    by_seed.seed = torch.arange(N_DRAWS + 1, dtype=torch.int64)
    tokens = draw(logits, by_seed)
    pairs = torch.bincount(tokens[:-1] * 4 + tokens[1:], minlength=16)
    assert chi_square(pairs, torch.full((16,), 1 / 16)) < CHI2_CRIT_P001[15]


def test_uniform_noise_is_strictly_inside_the_unit_interval() -> None:
    seeds = torch.tensor([0, 1, 2**62 - 1, 2**40 + 7])
    u = uniform_noise(seeds, torch.tensor([0, 2**31, 5, 2**40]), 4096)
    assert u.shape == (4, 4096)
    assert (u > 0).all() and (u < 1).all()
    assert abs(float(u.mean()) - 0.5) < 0.01
    # Rows with different seeds are different streams.
    assert not torch.equal(u[0], u[1])


def test_rows_are_sampled_independently() -> None:
    # One batch, per-row parameters: a greedy row next to a top-k row.
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 30, generator=gen)
    p = Params(2, counter=torch.tensor([3, 3]))
    p.temperature = torch.tensor([0.0, 1.0])
    p.top_k = torch.tensor([0, 2])
    out = dynamic_ops("eager").sample(logits, *p.args())
    assert int(out[0]) == int(logits[0].argmax())
    assert int(out[1]) in torch.topk(logits[1], 2).indices.tolist()


# ---------------------------------------------------------------------------- buckets

@pytest.mark.parametrize(("lo", "hi", "want"), [
    (1, 8, [1, 2, 4, 8]),
    (1, 10, [1, 2, 4, 8, 10]),
    (1, 1, [1]),
    (0, 4, [1, 2, 4]),
    (256, 2048, [256, 512, 1024, 2048]),
    (256, 1000, [256, 512, 1000]),
])
def test_pow2_buckets(lo: int, hi: int, want: list[int]) -> None:
    assert pow2_buckets(lo, hi) == want


def test_choose_bucket() -> None:
    buckets = [1, 2, 4, 8, 10]
    assert choose_bucket(4, buckets) == 4   # exact match is its own bucket
    assert choose_bucket(5, buckets) == 8
    assert choose_bucket(1, buckets) == 1
    assert choose_bucket(9, buckets) == 10
    with pytest.raises(ValueError, match="11 exceeds the largest bucket 10"):
        choose_bucket(11, buckets)


def fit(prompts: list, rows: int, cols: int, pad_id: int) -> tuple[list, list[int]]:
    """fit_to_bucket into fresh arrays (stale values in them, as staging reused holds)."""
    ids, last = np.full((rows, cols), 77, dtype=np.int64), np.full(rows + 2, 77, np.int64)
    got = fit_to_bucket(prompts, ids, last, pad_id)
    assert got == last[:rows].tolist() and last[rows:].tolist() == [77, 77]
    return ids.tolist(), got


def test_fit_to_bucket_pads_right_and_adds_dummy_rows() -> None:
    out, last = fit([[5, 6, 7, 8], [9, 10]], 4, 6, 0)
    assert out == [[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0],
                   [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert last == [3, 1, 0, 0]


def test_fit_to_bucket_pads_with_pad_id() -> None:
    out, last = fit([[5]], 1, 3, 2)
    assert out == [[5, 2, 2]] and last == [0]


def test_fit_to_bucket_truncates_from_the_left() -> None:
    out, last = fit([[1, 2, 3, 4, 5, 6, 7], (11, 12, 13)], 2, 4, 0)
    assert out == [[4, 5, 6, 7], [11, 12, 13, 0]]
    assert last == [3, 2]


def test_fit_to_bucket_exact_fit() -> None:
    out, last = fit([[3, 4, 5, 6]], 1, 4, 0)
    assert out == [[3, 4, 5, 6]] and last == [3]


def test_fit_to_bucket_refuses_empty_prompts_and_overflow() -> None:
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        fit([[1], []], 2, 4, 0)
    with pytest.raises(ValueError, match="3 prompts do not fit 2 rows"):
        fit([[1], [2], [3]], 2, 4, 0)


def test_compiled_samplers_and_blocks_import_dynamo_only_when_first_called() -> None:
    """lazy_compile: building the compile backend's samplers and the compiled blocks
    imports neither Dynamo nor Inductor (1-1.5 s of start-up an engine on the Triton
    kernels never uses); the first call compiles and gives the eager function's answer.
    In a fresh interpreter: this one may have imported Dynamo already."""
    import subprocess
    import sys
    code = """
import sys, torch
from hybridgraph.runtime.dynamic import dynamic_ops, greedy
from hybridgraph.runtime.step import compiled_blocks
ops = dynamic_ops("compile"); compiled_blocks()
print(sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules))
x = torch.randn(3, 40)
args = (torch.zeros(3), torch.zeros(3, dtype=torch.int64), torch.ones(3),
        torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
print(torch.equal(ops.greedy(x, *args), greedy(x, *args)), "torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True True", out
