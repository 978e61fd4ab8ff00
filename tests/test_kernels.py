"""The Triton kernels on the CPU through Triton's interpreter, and the kernel path's fallback.

Without a GPU the kernels run in the interpreter (TRITON_INTERPRET=1, set before they are
imported; on a CUDA machine tests/gpu covers them compiled). Float16 only: the
interpreter computes bfloat16 wrongly (its tl.dot and arithmetic on bf16 gave garbage with
triton 3.9), so bf16 is checked on the GPU. Tolerance: TOLERANCE[float16] against float32.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Triton decides interpreted or compiled when triton.language is first imported, so the
# switch is set before anything here imports it; if something already did, we skip.
_ALREADY = "triton.language" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
INTERPRET = (importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
             and not _ALREADY)
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"

from hybridgraph.kernels.selfcheck import TOLERANCE, check_kernels  # noqa: E402
from hybridgraph.model.config import ModelConfig  # noqa: E402
from hybridgraph.model.llama import no_reduce  # noqa: E402
from hybridgraph.model.loader import random_model  # noqa: E402
from hybridgraph.runtime.step import StepBuffers, Steps  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="needs triton, no GPU (tests/gpu covers it) and triton.language "
    "not yet imported compiled")
F16 = torch.float16
TOL = TOLERANCE[F16]


def _rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(F16)


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=F16)


@pytest.fixture
def ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 18, 1024, "cpu")


@needs_interpreter
@pytest.mark.parametrize("b,n,k,split,programs,dot", [
    (1, 100, 96, 1, 0, True), (3, 64, 160, 3, 0, True), (5, 200, 64, 2, 3, True),
    (1, 100, 96, 1, 0, False), (1, 64, 160, 3, 2, False), (1, 100, 160, 2, 0, False)])
def test_gemv_norm_and_residual(ws, b, n, k, split, programs, dot) -> None:
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    x, w, res, nw = _rnd(b, k), _rnd(n, k, scale=0.1), _rnd(b, n), 1 + _rnd(k, scale=0.2)
    half = 8 if not dot and split == 2 else 16  # the register path's small default tiles too
    cfg = g.GemvConfig(half=half, block_k=32, split_k=split, programs=programs, dot=dot)
    out = g.gemv(x, w, _nan(b, n), ws, cfg, norm_w=nw)
    assert ref.rel_err(out, ref.gemv_ref(x, w, nw)) < TOL
    out = g.gemv(x, w, _nan(b, n), ws, cfg, epi=g.EPI_RESID, residual=res)
    assert ref.rel_err(out, ref.gemv_ref(x, w, residual=res)) < TOL
    assert int(ws.counters.abs().sum()) == 0  # every split launch leaves them at zero


@needs_interpreter
@pytest.mark.parametrize("b,split,dot", [(3, 1, True), (3, 2, True), (1, 2, False)])
def test_gemv_swiglu_and_rope(ws, b, split, dot) -> None:
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    k, heads, kv, d, seq = 96, 6, 2, 32, 64
    x, nw = _rnd(b, k), 1 + _rnd(k, scale=0.2)
    cfg = g.GemvConfig(half=16, block_k=32, split_k=split, dot=dot)
    w13 = _rnd(2 * 40, k, scale=0.1)
    h = g.gemv(x, w13, _nan(b, 40), ws, cfg, epi=g.EPI_SILU, norm_w=nw)
    assert ref.rel_err(h, ref.swiglu_ref(x, w13, nw)) < TOL
    wqkv = _rnd((heads + 2 * kv) * d, k, scale=0.1)
    kc, vc = _rnd(4, kv, seq, d), _rnd(4, kv, seq, d)
    pos = torch.tensor([0, seq - 1, 17])[:b]
    ang = torch.rand(b, d // 2) * 6
    cos, sin = ang.cos().repeat(1, 2).to(F16), ang.sin().repeat(1, 2).to(F16)
    q = g.gemv(x, wqkv, _nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos, sin, heads, kv, nw)
    rows = torch.arange(b)
    assert ref.rel_err(q, q_ref) < TOL
    assert ref.rel_err(kc[rows, :, pos], k_ref) < TOL
    assert ref.rel_err(vc[rows, :, pos], v_ref) < TOL


@needs_interpreter
@pytest.mark.parametrize("heads,kv,d", [(4, 4, 32), (6, 2, 32), (9, 3, 64)])
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention(ws, heads, kv, d, splits) -> None:
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention
    b, seq, window = 3, 256, 128
    q, kc, vc = _rnd(b, heads * d), _rnd(b, kv, seq, d), _rnd(b, kv, seq, d)
    pos = torch.tensor([0, window - 1, 40])
    out = decode_attention(q, kc, vc, pos, window, _nan(b, heads * d), ws, block_t=32,
                           splits=splits)
    assert ref.rel_err(out, ref.decode_attention_ref(q, kc, vc, pos, window)) < TOL
    assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
def test_glue_kernels() -> None:
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, n = 3, 100
    x, res, nw = _rnd(b, n), _rnd(b, n), 1 + _rnd(n, scale=0.2)
    xs, xn = _nan(b, n), _nan(b, n)
    glue.add_rmsnorm(x, nw, 1e-5, xn, residual=res, sum_out=xs)
    assert ref.rel_err(xn, ref.rmsnorm_ref(x.float() + res.float(), nw, 1e-5)) < TOL
    gu = _rnd(b, 2 * 50)
    h = glue.silu_mul(gu, _nan(b, 50))
    assert ref.rel_err(h, torch.nn.functional.silu(gu[:, :50].float()) * gu[:, 50:].float()) < TOL


SMALL = ModelConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=512, name="t")


@needs_interpreter
@pytest.mark.parametrize("gemvs,b", [(("qkv", "wo", "w13", "w2", "head"), 3),
                                     (("qkv", "wo", "w13", "w2", "head"), 1), ((), 3)])
def test_triton_decode_matches_block_decode(gemvs, b) -> None:
    """Multi-row launches swap the one-row register configs for the tensor-core path;
    b=1 runs the register path (the default configs)."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode
    torch.manual_seed(0)
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    model.setup_caches(3, 512)
    model.prefill(torch.randint(0, 97, (3, 12)))
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs))
    ids, pos = torch.tensor([1, 2, 3])[:b], torch.tensor([12, 5, 300])[:b]
    snap = [(c.k.clone(), c.v.clone()) for c in model.caches]
    got = fast.forward(ids, pos, 512)
    written = [c.k.clone() for c in model.caches]
    for c, (k, v) in zip(model.caches, snap, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)
    expect = model.decode(ids, pos, 512)
    assert ref.rel_err(got, expect) < 4 * TOL  # two layers of fp16 roundings apart
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for mine, theirs in zip(written, (c.k for c in model.caches), strict=True):
        assert ref.rel_err(mine, theirs) < TOL


class _Doubling:
    """A stand-in for a 2-rank all-reduce whose peer holds the same partial sum: the sum is
    twice the input. In place like NCCL's, or a new tensor like symm_mem's; counts calls."""

    def __init__(self, in_place: bool) -> None:
        self.in_place, self.calls = in_place, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x.mul_(2) if self.in_place else x * 2


@needs_interpreter
@pytest.mark.parametrize("gemvs,b,in_place", [
    (("qkv", "wo", "w13", "w2", "head"), 1, True), (("qkv", "wo", "w13", "w2", "head"), 3, False),
    ((), 3, True), (("wo", "w2", "head"), 1, False), (("w13",), 2, True)])
def test_triton_decode_honours_the_all_reduce_hook(gemvs, b, in_place) -> None:
    """A tensor-parallel rank's blocks sum attention's and feed-forward's partial outputs
    over the ranks (Block.all_reduce) before the residual add: the kernels do the same,
    with O and down on the GEMV or cuBLAS, the add alone or in the norm kernel."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode
    torch.manual_seed(0)
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    hooks = [_Doubling(in_place) for _ in model.layers]
    for layer, hook in zip(model.layers, hooks, strict=True):
        layer.all_reduce = hook
    model.setup_caches(3, 512)
    model.prefill(torch.randint(0, 97, (3, 12)))
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False))
    ids, pos = torch.tensor([1, 2, 3])[:b], torch.tensor([12, 5, 300])[:b]
    snap = [(c.k.clone(), c.v.clone()) for c in model.caches]
    for hook in hooks:
        hook.calls = 0  # prefill called them too
    got = fast.forward(ids, pos, 512)
    assert [h.calls for h in hooks] == [2] * len(hooks)  # attention's and feed-forward's
    for c, (k, v) in zip(model.caches, snap, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)
    expect = model.decode(ids, pos, 512)
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    # The hook matters: without it the same step's logits are far from these.
    for layer, c, (k, v) in zip(model.layers, model.caches, snap, strict=True):
        layer.all_reduce = no_reduce
        c.k.copy_(k)
        c.v.copy_(v)
    assert ref.rel_err(model.decode(ids, pos, 512), expect) > 20 * TOL


@needs_interpreter
def test_kernels_reason_says_a_rank_is_tensor_parallel(monkeypatch) -> None:
    import hybridgraph.kernels.selfcheck as selfcheck
    from hybridgraph.model.fast_decode import KernelPlan, triton_decode
    monkeypatch.setattr(selfcheck, "check_kernels", lambda *_: (True, "ok"))  # no GPU here
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    model.setup_caches(1, 64)
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=False))
    assert fast is not None and reason == "ok"
    for layer in model.layers:
        layer.all_reduce = _Doubling(in_place=False)
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=False))
    assert fast is not None and "tensor parallel" in reason


def test_kernel_plan_rejects_unknown_projection() -> None:
    from hybridgraph.model.fast_decode import KernelPlan
    with pytest.raises(ValueError, match="unknown projections"):
        KernelPlan(gemv=("qkv", "mlp"))
    with pytest.raises(ValueError, match="unknown projections"):
        KernelPlan(gemv_batched=("mlp",))


def test_kernel_plan_picks_projections_by_rows() -> None:
    from hybridgraph.model.fast_decode import KernelPlan
    plan = KernelPlan(gemv=("wo", "w13"), gemv_batched=("w2",))
    assert plan.uses(1) == ("wo", "w13")
    assert plan.uses(2) == plan.uses(16) == ("w2",)
    assert KernelPlan(gemv=("wo",), gemv_batched=None).uses(8) == ("wo",)


@needs_interpreter
def test_batches_over_max_rows_decode_on_the_blocks() -> None:
    """KernelPlan.max_rows: the kernels serve buckets up to it; Steps runs larger ones on
    the model's blocks, and the kernels refuse a batch they were not sized for."""
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode
    from hybridgraph.runtime.step import StepBuffers, Steps
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    model.setup_caches(4, 64)
    bufs = StepBuffers(4, 64, torch.device("cpu"))
    steps = Steps(model, bufs)
    # As Steps(kernels="triton") installs it on a GPU (its self-check needs CUDA).
    steps.fast = TritonDecode(model, 4, KernelPlan(max_rows=2, pdl=False))
    assert steps.fast.rows == 2
    bufs.ids[:4], bufs.pos[:4] = torch.tensor([1, 2, 3, 4]), torch.tensor([3, 4, 5, 6])
    calls = []
    real = steps.fast.forward
    steps.fast.forward = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    with torch.no_grad():
        steps.forward_decode(2, 64)
        steps.forward_decode(4, 64)
        with pytest.raises(ValueError, match="serves 2 rows"):
            real(bufs.ids[:3], bufs.pos[:3], 64)
    assert calls == [2]


def test_steps_rejects_unknown_kernels() -> None:
    model = random_model(SMALL, torch.device("cpu"), torch.float32, seed=0)
    with pytest.raises(ValueError, match="kernels must be one of"):
        Steps(model, StepBuffers(1, 64, torch.device("cpu")), kernels="cuda")


def test_triton_kernels_fall_back_without_a_gpu(caplog) -> None:
    """On a CPU the kernel path is refused with a reason, and decode still runs."""
    model = random_model(SMALL, torch.device("cpu"), torch.float32, seed=0)
    model.setup_caches(1, 64)
    bufs = StepBuffers(1, 64, torch.device("cpu"))
    with caplog.at_level("WARNING"):
        steps = Steps(model, bufs, kernels="triton")
    assert steps.kernels == "inductor" and steps.fast is None
    assert "CUDA" in steps.kernels_reason or "triton" in steps.kernels_reason
    assert "Triton decode kernels not used" in caplog.text
    assert steps.forward_decode(1, 64).shape == (1, SMALL.vocab_size)
    ok, reason = check_kernels(torch.device("cpu"), torch.float16)
    assert not ok and reason


# ------------------------------------------------ short prefills on the decode kernels

def _rope_inputs(b: int, d: int):
    ang = torch.rand(b, d // 2) * 6
    return ang.cos().repeat(1, 2).to(F16), ang.sin().repeat(1, 2).to(F16)


def _only_written(before: torch.Tensor, after: torch.Tensor, rows, pos) -> bool:
    """after equals before everywhere but cache[rows[i], :, pos[i]]."""
    restored = after.clone()
    restored[rows, :, pos] = before[rows, :, pos]
    return torch.equal(restored, before)


@needs_interpreter
@pytest.mark.parametrize("b,split,dot,rows", [
    (3, 1, True, [2, 0, 3]), (3, 2, True, "shared"), (1, 2, False, [3]), (5, 1, True, "shared")])
def test_gemv_rope_writes_the_named_cache_rows(ws, b, split, dot, rows) -> None:
    """RopeArgs.cache_rows: row i writes k and v into cache row cache_rows[i] at pos[i]
    (a permutation, or one row for all given with stride 0, as a prefill passes it); q is
    unchanged and nothing else in the caches moves."""
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels import reference as ref
    k, heads, kv, d, seq = 96, 6, 2, 32, 64
    x, nw = _rnd(b, k), 1 + _rnd(k, scale=0.2)
    wqkv = _rnd((heads + 2 * kv) * d, k, scale=0.1)
    kc, vc = _rnd(6, kv, seq, d), _rnd(6, kv, seq, d)
    kc0, vc0 = kc.clone(), vc.clone()
    pos = torch.tensor([0, seq - 1, 17, 5, 6])[:b]
    crow = torch.tensor([1]).expand(b) if rows == "shared" else torch.tensor(rows)
    cos, sin = _rope_inputs(b, d)
    cfg = g.GemvConfig(half=16, block_k=32, split_k=split, dot=dot)
    q = g.gemv(x, wqkv, _nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv, crow))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos, sin, heads, kv, nw)
    assert ref.rel_err(q, q_ref) < TOL
    assert ref.rel_err(kc[crow, :, pos], k_ref) < TOL
    assert ref.rel_err(vc[crow, :, pos], v_ref) < TOL
    assert _only_written(kc0, kc, crow, pos) and _only_written(vc0, vc, crow, pos)
    # None keeps today's mapping: row i writes cache row i.
    kc.copy_(kc0)
    g.gemv(x, wqkv, _nan(b, heads * d), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
           rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    assert _only_written(kc0, kc, torch.arange(b), pos)
    assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_reads_the_named_cache_rows(ws, splits) -> None:
    """cache_rows: row i attends to keys 0..pos[i] of cache row cache_rows[i] — rows of one
    sequence (a prefill's, stride 0) or any mapping — and None stays row i."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention
    heads, kv, d, seq, window, b = 6, 2, 32, 256, 128, 4
    q, kc, vc = _rnd(b, heads * d), _rnd(4, kv, seq, d), _rnd(4, kv, seq, d)
    pos = torch.tensor([0, 3, window - 1, 40])
    for crow in (torch.tensor([2]).expand(b), torch.tensor([3, 0, 2, 2])):
        out = decode_attention(q, kc, vc, pos, window, _nan(b, heads * d), ws, block_t=32,
                               splits=splits, cache_rows=crow)
        expect = ref.decode_attention_ref(q, kc[crow], vc[crow], pos, window)
        assert ref.rel_err(out, expect) < TOL
        other = ref.decode_attention_ref(q, kc, vc, pos, window)
        assert ref.rel_err(out, other) > 10 * TOL  # the index is honoured, not ignored
    out = decode_attention(q, kc, vc, pos, window, _nan(b, heads * d), ws, block_t=32,
                           splits=splits)
    assert ref.rel_err(out, ref.decode_attention_ref(q, kc, vc, pos, window)) < TOL
    assert int(ws.counters.abs().sum()) == 0


@needs_interpreter
def test_rope_kv_writes_the_named_cache_row() -> None:
    from hybridgraph.kernels import glue
    from hybridgraph.kernels import reference as ref
    b, heads, kv, d, seq = 5, 6, 2, 32, 64
    qkv = _rnd(b, (heads + 2 * kv) * d)
    kc, vc = _rnd(3, kv, seq, d), _rnd(3, kv, seq, d)
    kc0, vc0 = kc.clone(), vc.clone()
    pos, crow = torch.arange(b), torch.tensor([2]).expand(b)
    cos, sin = _rope_inputs(b, d)
    q = glue.rope_kv(qkv, cos, sin, pos, kc, vc, _nan(b, heads * d), heads, kv, cache_rows=crow)
    qf, kf, _ = qkv.float().split([heads * d, kv * d, kv * d], dim=-1)
    assert ref.rel_err(q, ref.rope_ref(qf.view(b, heads, d), cos, sin).reshape(b, -1)) < TOL
    assert ref.rel_err(kc[2, :, :b].transpose(0, 1), ref.rope_ref(kf.view(b, kv, d), cos, sin)) \
        < TOL
    assert torch.equal(vc[2, :, :b].transpose(0, 1), qkv[:, (heads + kv) * d:].view(b, kv, d))
    assert _only_written(kc0, kc, crow, pos) and _only_written(vc0, vc, crow, pos)


def test_cache_rows_must_be_an_index_vector() -> None:
    from hybridgraph.kernels.attention import check_cache_rows
    check_cache_rows(torch.tensor([1]).expand(4), 4, "x")
    for bad in (torch.tensor([1, 2]), torch.zeros(4), torch.zeros(2, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match="x: cache_rows"):
            check_cache_rows(bad, 4, "x")


def _prefill_model():
    torch.manual_seed(0)
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    model.setup_caches(3, 64)
    for c in model.caches:  # stale contents, so "untouched" means something
        c.k.copy_(_rnd(*c.k.shape))
        c.v.copy_(_rnd(*c.v.shape))
    return model


def _caches(model):
    return [(c.k.clone(), c.v.clone()) for c in model.caches]


def _restore(model, snap) -> None:
    for c, (k, v) in zip(model.caches, snap, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)


ALL = ("qkv", "wo", "w13", "w2", "head")


@needs_interpreter
@pytest.mark.parametrize("t,last,gemvs", [(1, 0, "default"), (5, 4, "default"),
                                          (16, 16 - 1, "default"), (16, 9, "default"),
                                          (5, 4, ALL), (16, 11, ())])
def test_triton_prefill_matches_model_prefill(t, last, gemvs) -> None:
    """TritonDecode.prefill: the logits of row `last` equal Transformer.prefill's within
    fp16 rounding, the one cache row named gets the model's keys and values at 0..t-1,
    and every other cache entry is left as it was. "default": T > 1 runs the batched plan
    (QKV and gate/up on cuBLAS + glue), T = 1 the one-row plan (all on the GEMV)."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode
    model = _prefill_model()
    plan = KernelPlan(pdl=False) if gemvs == "default" else \
        KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False)
    fast = TritonDecode(model, 3, plan)
    ids = torch.randint(0, SMALL.vocab_size, (t,))
    row, li = torch.tensor([2]), torch.tensor([last])
    before = _caches(model)
    with torch.no_grad():
        got = fast.prefill(ids, row, li)
        written = _caches(model)
        _restore(model, before)
        expect = model.prefill(ids[None], li, rows=row)
    assert got.shape == (1, SMALL.vocab_size) and got.dtype == torch.float32
    assert ref.rel_err(got, expect) < 4 * TOL  # two layers of fp16 roundings apart
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for (k, v), c, (k0, v0) in zip(written, model.caches, before, strict=True):
        assert ref.rel_err(k[2, :, :t], c.k[2, :, :t]) < TOL
        assert ref.rel_err(v[2, :, :t], c.v[2, :, :t]) < TOL
        rows, pos = torch.full((t,), 2), torch.arange(t)
        assert _only_written(k0, k, rows, pos) and _only_written(v0, v, rows, pos)


@needs_interpreter
def test_triton_prefill_refuses_what_it_does_not_serve() -> None:
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode, prefill_window
    model = _prefill_model()
    fast = TritonDecode(model, 3, KernelPlan(pdl=False, prefill_rows=4))
    one = torch.tensor([0])
    with pytest.raises(ValueError, match="serves 1..4 tokens"):
        fast.prefill(torch.zeros(5, dtype=torch.int64), one, one)
    with pytest.raises(ValueError, match="serves one"):
        fast.prefill(torch.zeros(2, 3, dtype=torch.int64), one, one)
    with pytest.raises(ValueError, match="one index"):
        fast.prefill(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 1]), one)
    with pytest.raises(ValueError, match="prefill_rows"):
        KernelPlan(prefill_rows=17)
    assert [prefill_window(t, 64) for t in (1, 2, 3, 5, 10, 16)] == [1, 2, 4, 8, 16, 16]
    assert prefill_window(16, 12) == 12


@needs_interpreter
@pytest.mark.parametrize("prefill_rows,b,t,on_kernels", [
    (16, 1, 10, True), (16, 1, 16, True), (16, 1, 17, False), (0, 1, 5, False),
    (16, 2, 5, False), (4, 1, 5, False)])
def test_steps_prefill_on_the_kernels(prefill_rows, b, t, on_kernels) -> None:
    """Steps.forward_prefill runs one prompt of <= KernelPlan.prefill_rows tokens on the
    kernels, into the cache row `bufs.rows` names, with `last_idx`'s logits; more tokens,
    more prompts or prefill_rows=0 run on the model's blocks, as before."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import KernelPlan, TritonDecode
    model = _prefill_model()
    bufs = StepBuffers(3, 64, torch.device("cpu"))
    steps = Steps(model, bufs)
    # As Steps(kernels="triton") installs it on a GPU (its self-check needs CUDA).
    steps.fast = TritonDecode(model, 3, KernelPlan(pdl=False, prefill_rows=prefill_rows))
    calls = []
    real = steps.fast.prefill
    steps.fast.prefill = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    bufs.prompt_ids[:b, :t] = torch.randint(0, SMALL.vocab_size, (b, t))
    bufs.last_idx[:b] = torch.tensor([t - 1, t - 2])[:b]
    bufs.set_prefill_rows(1)
    before = _caches(model)
    with torch.no_grad():
        got = steps.forward_prefill(b, t)
        written = _caches(model)
        _restore(model, before)
        expect = model.prefill(bufs.prompt_ids[:b, :t], bufs.last_idx[:b],
                               rows=torch.arange(1, 1 + b))
    assert calls == ([t] if on_kernels else [])
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for (k, _), c in zip(written, model.caches, strict=True):
        assert ref.rel_err(k[1:1 + b, :, :t], c.k[1:1 + b, :, :t]) < TOL
        assert torch.equal(k[0], c.k[0])  # row 0 is nobody's
