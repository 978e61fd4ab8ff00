"""The sampling kernel (kernels/sampling.py) in Triton's interpreter, on the CPU, against
`runtime.dynamic.sample` (the compiled sampler it would replace); and compiled for sm_90
by Triton's real compiler (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from hybridgraph.runtime.dynamic import sample as reference
from tests.triton_interpreter import needs_interpreter


def _params(rows: list[tuple[float, int, float, int, int]]):
    """(temperature, top_k, top_p, seed, counter) per row -> the sampler's tensors."""
    t, k, p, s, c = zip(*rows, strict=True)
    return (torch.tensor(t, dtype=torch.float32), torch.tensor(k, dtype=torch.int64),
            torch.tensor(p, dtype=torch.float32), torch.tensor(s, dtype=torch.int64),
            torch.tensor(c, dtype=torch.int64))


def _kernel(logits: torch.Tensor, params) -> torch.Tensor:
    from hybridgraph.kernels.sampling import sample
    from hybridgraph.kernels.workspace import Workspace
    ws = Workspace(1 << 14, 64, "cpu")
    out = torch.full((logits.shape[0],), -1, dtype=torch.int64)
    sample(logits, *params, out, ws)
    assert int(ws.counters.abs().sum()) == 0
    return out


ROWS = [(1.0, 0, 1.0, 7, 3), (0.7, 40, 1.0, 1, 10), (1.3, 0, 0.9, 2, 11),
        (0.8, 5, 0.5, 3, 12), (0.0, 0, 1.0, 4, 13), (1.0, 1, 1.0, 5, 14),
        (2.0, 0, 0.05, 6, 15), (1.0, 3000, 0.95, 2**40 + 9, 2**33 + 5)]


@needs_interpreter
@pytest.mark.parametrize("vocab", [50, 2500, 32000])
@pytest.mark.parametrize("peaked", [False, True])
def test_kernel_draws_the_compiled_samplers_tokens(vocab: int, peaked: bool) -> None:
    """Every row a different mix of temperature, top-k, top-p, seed and counter (greedy,
    top-k 1, top-p past one block of 1024, seeds and counters past 32 bits), flat and peaked
    logits: the same tokens as runtime.dynamic.sample, for several counters."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(ROWS), vocab, generator=gen) * (6.0 if peaked else 1.0)
    for step in range(4):
        params = _params([(t, k, p, s, c + step) for t, k, p, s, c in ROWS])
        assert torch.equal(_kernel(logits, params), reference(logits, *params)), step


@needs_interpreter
def test_kernel_follows_the_distribution() -> None:
    """Over 400 counters, top-k 3 of logits (2, 1, 0, ...): only the first three tokens,
    in proportions within 4 sigma of softmax(2, 1, 0)."""
    vocab = 40
    logits = torch.full((1, vocab), -20.0)
    logits[0, :3] = torch.tensor([2.0, 1.0, 0.0])
    draws = torch.tensor([int(_kernel(logits, _params([(1.0, 3, 1.0, 9, c)]))[0])
                          for c in range(400)])
    assert int(draws.max()) <= 2
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), dim=0)
    for tok in range(3):
        got = float((draws == tok).float().mean())
        sigma = float((want[tok] * (1 - want[tok]) / 400) ** 0.5)
        assert abs(got - float(want[tok])) < 4 * sigma, (tok, got)


@needs_interpreter
def test_kernel_refuses_what_it_does_not_serve() -> None:
    params = _params([(1.0, 0, 1.0, 0, 0)])
    with pytest.raises(ValueError, match="float32"):
        _kernel(torch.zeros(1, 10, dtype=torch.float16), params)


@needs_interpreter
def test_self_check_passes_the_samplers_and_catches_a_wrong_draw(monkeypatch) -> None:
    """kernels/selfcheck's sampler check on the interpreter: both samplers pass; a sampler
    that draws the least likely token whenever temperature > 0 fails it."""
    from hybridgraph.kernels import sampling, selfcheck
    from hybridgraph.kernels.workspace import Workspace
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    ws = Workspace(1 << 14, 64, "cpu")
    assert selfcheck._samplers(logits, ws, pdl=False) == {"argmax": 0.0, "sample": 0.0}
    worst = logits.argmin(-1)

    def wrong(logits, temperature, top_k, top_p, seed, counter, out, ws, pdl=False):
        return out.copy_(torch.where(temperature > 0, worst, logits.argmax(-1)))

    monkeypatch.setattr(sampling, "sample", wrong)
    assert selfcheck._samplers(logits, ws, pdl=False)["sample"] == float("inf")


def test_sample_kernels_compile_for_hopper() -> None:
    """The interpreter accepts what the compiler refuses: compile both for sm_90 for real."""
    pytest.importorskip("triton")
    from tests.triton_interpreter import compile_for_hopper
    common = {"temp_ptr": "*fp32", "topk_ptr": "*i64", "V": "i32", "stride_s": "i32",
              "CHUNK": "i32"}
    mass = dict(common, sorted_ptr="*fp32", mass_ptr="*fp32")
    draw = dict(common, sorted_ptr="*fp32", idx_ptr="*i64", topp_ptr="*fp32",
                seed_ptr="*i64", cnt_ptr="*i64", mass_ptr="*fp32", best_ptr="*fp32",
                count_ptr="*i32", out_ptr="*i64", stride_i="i32")
    for kernel, sig in (("_chunk_mass_kernel", mass), ("_draw_kernel", draw)):
        variants = [(sig, {"SPLITS": splits, "BLOCK": 1024, "USE_PDL": pdl}, {})
                    for splits, pdl in ((1, False), (16, True), (64, False))]
        err, _ = compile_for_hopper("hybridgraph.kernels.sampling", kernel, variants)
        assert err == "", (kernel, err)
