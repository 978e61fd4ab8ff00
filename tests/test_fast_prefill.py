"""Prefills on cuBLAS + glue + SDPA (model/fast_prefill.py) on the CPU through Triton's
interpreter: against Transformer.prefill (logits, the cache rows written, nothing else
touched), one prompt and several, GQA and MHA, the tensor-parallel all-reduce hook, and
Steps' choice between it, the short-prefill path and the model's blocks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hybridgraph.model.config import ModelConfig
from hybridgraph.model.loader import random_model
from hybridgraph.runtime.step import StepBuffers, Steps
from tests.triton_interpreter import (
    F16,
    SMALL,
    TOL,
    needs_interpreter,
    restore_caches,
    rnd,
    snapshot_caches,
)

MHA = replace(SMALL, num_kv_heads=4)  # SMALL is GQA


def _model(cfg: ModelConfig, rows: int = 4, max_seq: int = 96):
    """cfg in fp16 with peaked logits, caches of `rows` rows filled with stale values (so
    "untouched" means something)."""
    torch.manual_seed(0)
    model = random_model(cfg, torch.device("cpu"), F16, seed=1)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    model.setup_caches(rows, max_seq)
    for c in model.caches:
        c.k.copy_(rnd(*c.k.shape))
        c.v.copy_(rnd(*c.v.shape))
    return model


def _fast(model, **plan):
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    return TritonDecode(model, model.max_batch, KernelPlan(pdl=False, **plan))


@needs_interpreter
@pytest.mark.parametrize("cfg", [SMALL, MHA], ids=["gqa", "mha"])
@pytest.mark.parametrize("t,last,rows", [(40, [39], [2]), (17, [5], [0]), (1, [0], [3]),
                                         (33, [32, 10, 20], [3, 0, 1])])
def test_glue_prefill_matches_model_prefill(cfg, t, last, rows) -> None:
    """Logits of each row's last_idx within two layers of fp16 rounding of the model's,
    the same greedy token, each named cache row holding the model's keys and values at
    0..t-1, and every other cache entry as it was."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_prefill import glue_prefill
    model = _model(cfg)
    b = len(rows)
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    row_t, last_t = torch.tensor(rows), torch.tensor(last)
    before = snapshot_caches(model)
    with torch.no_grad():
        got = glue_prefill(_fast(model), ids, row_t, last_t)
        written = snapshot_caches(model)
        restore_caches(model, before)
        expect = model.prefill(ids, last_t, rows=row_t)
    assert got.shape == (b, cfg.vocab_size) and got.dtype == torch.float32
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    others = [r for r in range(model.max_batch) if r not in rows]
    for (k, v), c, (k0, v0) in zip(written, model.caches, before, strict=True):
        for r in rows:
            assert ref.rel_err(k[r, :, :t], c.k[r, :, :t]) < TOL
            assert ref.rel_err(v[r, :, :t], c.v[r, :, :t]) < TOL
            assert torch.equal(k[r, :, t:], k0[r, :, t:]) and torch.equal(v[r, :, t:], v0[r, :, t:])
        for r in others:
            assert torch.equal(k[r], k0[r]) and torch.equal(v[r], v0[r])


def test_gemm_parts_fills_one_wave_of_narrow_products() -> None:
    """llama-2-7b's down (k 11008, n 4096) on 132 SMs: 4 parts at 128 tokens (32 tiles), 2
    at 256 (64), none at 384 or 512 (96 and 128 tiles: one wave already); never when
    min_k is 0, when parts would keep less than min_k of K, or when K does not divide."""
    from hybridgraph.model.fast_prefill import gemm_parts
    assert [gemm_parts(m, 4096, 11008, 132, 2048) for m in (128, 256, 384, 512)] == [4, 2, 1, 1]
    assert gemm_parts(256, 4096, 11008, 132, 0) == 1
    assert gemm_parts(128, 4096, 4096, 132, 2048) == 2  # 4 parts would keep 1024 of K
    assert gemm_parts(128, 4096, 4112, 132, 16) == 2  # 4112 / 4 = 1028: rows not 16-byte
    assert gemm_parts(128, 4096, 4097, 132, 16) == 1


@needs_interpreter
@pytest.mark.parametrize("t", [40, 7])
def test_glue_prefill_with_products_split_over_k_matches_model_prefill(t) -> None:
    """With every split allowed (prefill_split_k 16: O and down of the small model in 4
    parts), the parts summed by add_rmsnorm and by the last row's selection give the
    model's logits within the unsplit path's tolerance."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model import fast_prefill
    model = _model(SMALL)
    ids, row, last = torch.randint(0, 97, (1, t)), torch.tensor([1]), torch.tensor([t - 1])
    used = []
    real = fast_prefill.linear_parts
    try:
        fast_prefill.linear_parts = lambda x, w, parts: used.append(parts) or real(x, w, parts)
        with torch.no_grad():
            got = fast_prefill.glue_prefill(_fast(model, prefill_split_k=16), ids, row, last)
    finally:
        fast_prefill.linear_parts = real
    with torch.no_grad():
        expect = model.prefill(ids, last, rows=row)
    assert used == [4, 4] * SMALL.num_layers
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))


@needs_interpreter
def test_glue_prefill_sums_partials_through_the_all_reduce_hook() -> None:
    """A tensor-parallel rank's O and down give partial sums: glue_prefill adds them only
    after `layer.all_reduce`. A hook that doubles stands in for two ranks holding the same
    partial: the model's prefill under the same hook is the reference."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_prefill import glue_prefill
    model = _model(SMALL)
    calls = []
    for layer in model.layers:
        layer.all_reduce = lambda x: calls.append(x.shape) or x * 2
    ids, row, last = torch.randint(0, 97, (1, 24)), torch.tensor([1]), torch.tensor([23])
    with torch.no_grad():
        got = glue_prefill(_fast(model), ids, row, last)
        n = len(calls)
        expect = model.prefill(ids, last, rows=row)
    assert n == 2 * SMALL.num_layers  # O and down of every layer
    assert calls[n - 1] == (1, SMALL.hidden_size)  # the last down: the selected row only
    assert ref.rel_err(got, expect) < 4 * TOL


@needs_interpreter
def test_glue_prefill_refuses_more_tokens_than_the_cache() -> None:
    from hybridgraph.model.fast_prefill import glue_prefill
    model = _model(SMALL, max_seq=32)
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="the cache holds 32"):
        glue_prefill(_fast(model), torch.zeros(1, 33, dtype=torch.int64), one, one)


@needs_interpreter
@pytest.mark.parametrize("glue,b,t,path", [
    (True, 1, 10, "short"), (True, 1, 17, "glue"), (True, 2, 5, "glue"),
    (False, 1, 17, "blocks"), (False, 2, 5, "blocks")])
def test_steps_picks_the_prefill_path(glue, b, t, path) -> None:
    """Steps.forward_prefill with the kernels in use: one prompt of <= prefill_rows tokens
    on the decode kernels, any other on glue_prefill (KernelPlan.glue_prefill) or, with it
    off, on the model's blocks; all three give the model's logits."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model import fast_prefill
    model = _model(SMALL, rows=3, max_seq=64)
    bufs = StepBuffers(3, 64, torch.device("cpu"))
    steps = Steps(model, bufs)
    steps.fast = _fast(model, glue_prefill=glue)  # as Steps(kernels="triton") on a GPU
    seen = []
    short, real_glue = steps.fast.prefill, fast_prefill.glue_prefill
    steps.fast.prefill = lambda *a: seen.append("short") or short(*a)
    bufs.prompt_ids[:b, :t] = torch.randint(0, SMALL.vocab_size, (b, t))
    bufs.last_idx[:b] = torch.tensor([t - 1, t - 2])[:b]
    bufs.set_prefill_rows(1)
    before = snapshot_caches(model)
    try:
        fast_prefill.glue_prefill = lambda *a: seen.append("glue") or real_glue(*a)
        with torch.no_grad():
            got = steps.forward_prefill(b, t)
    finally:
        fast_prefill.glue_prefill = real_glue
    restore_caches(model, before)
    with torch.no_grad():
        expect = model.prefill(bufs.prompt_ids[:b, :t], bufs.last_idx[:b],
                               rows=torch.arange(1, 1 + b))
    assert seen == ([] if path == "blocks" else [path])
    assert ref.rel_err(got, expect) < 4 * TOL
