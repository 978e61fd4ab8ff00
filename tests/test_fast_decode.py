"""The decode blocks on the Triton kernels (model/fast_decode.py) on the CPU through
Triton's interpreter (tests/triton_interpreter.py): TritonDecode against the model's own
blocks, the tensor-parallel all-reduce hook, KernelPlan, Steps' choice and fallback, and
short prefills on the kernels.
"""

from __future__ import annotations

import pytest
import torch

from hybridgraph.kernels.selfcheck import check_kernels
from hybridgraph.model.config import ModelConfig
from hybridgraph.model.llama import no_reduce
from hybridgraph.model.loader import random_model
from hybridgraph.runtime.step import StepBuffers, Steps
from tests.triton_interpreter import (
    F16,
    SMALL,
    TOL,
    needs_interpreter,
    only_written,
    restore_caches,
    rnd,
    snapshot_caches,
)


def _peaked_model(max_seq: int):
    """SMALL in fp16 with peaked logits (greedy tokens well separated), caches of 3 rows."""
    torch.manual_seed(0)
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    with torch.no_grad():
        model.output.weight.mul_(20.0)
    model.setup_caches(3, max_seq)
    return model


@needs_interpreter
@pytest.mark.parametrize("gemvs,b", [(("qkv", "wo", "w13", "w2", "head"), 3),
                                     (("qkv", "wo", "w13", "w2", "head"), 1), ((), 3)])
def test_triton_decode_matches_block_decode(gemvs, b) -> None:
    """Multi-row launches swap the one-row register configs for the tensor-core path;
    b=1 runs the register path (the default configs)."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _peaked_model(512)
    model.prefill(torch.randint(0, 97, (3, 12)))
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs))
    ids, pos = torch.tensor([1, 2, 3])[:b], torch.tensor([12, 5, 300])[:b]
    snap = snapshot_caches(model)
    got = fast.forward(ids, pos, 512)
    written = [c.k.clone() for c in model.caches]
    restore_caches(model, snap)
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
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _peaked_model(512)
    hooks = [_Doubling(in_place) for _ in model.layers]
    for layer, hook in zip(model.layers, hooks, strict=True):
        layer.all_reduce = hook
    model.prefill(torch.randint(0, 97, (3, 12)))
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False))
    # One row fuses gate/up and down on a rank too (down plain, the add after the sum).
    assert fast.fused_ffn == ("w13" in gemvs and "w2" in gemvs)
    ids, pos = torch.tensor([1, 2, 3])[:b], torch.tensor([12, 5, 300])[:b]
    snap = snapshot_caches(model)
    for hook in hooks:
        hook.calls = 0  # prefill called them too
    got = fast.forward(ids, pos, 512)
    assert [h.calls for h in hooks] == [2] * len(hooks)  # attention's and feed-forward's
    restore_caches(model, snap)
    expect = model.decode(ids, pos, 512)
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    # The hook matters: without it the same step's logits are far from these.
    for layer in model.layers:
        layer.all_reduce = no_reduce
    restore_caches(model, snap)
    assert ref.rel_err(model.decode(ids, pos, 512), expect) > 20 * TOL


class _DoublingAdd:
    """The fused hook beside _Doubling (Block.reduce_add): residual + twice the input, as a
    new tensor like the one-shot kernel's; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return residual + x * 2


@needs_interpreter
@pytest.mark.parametrize("gemvs,fused_adds", [
    (("qkv", "wo", "w13", "w2", "head"), 2), ((), 1), (("wo", "w2", "head"), 1)])
def test_triton_decode_takes_the_fused_add_where_offered(gemvs, fused_adds) -> None:
    """With Block.reduce_add set, _reduced_tail gives it both residual adds (one where
    gate/up's norm kernel takes the add on cuBLAS: that one stays all_reduce + the norm
    kernel's add), and the logits are bit-equal to all_reduce-then-add's: the fused add
    rounds the same."""
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _peaked_model(512)
    for layer in model.layers:
        layer.all_reduce = _Doubling(in_place=False)
    model.prefill(torch.randint(0, 97, (3, 12)))
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False))
    ids, pos = torch.tensor([1, 2]), torch.tensor([12, 5])
    snap = snapshot_caches(model)
    unfused = fast.forward(ids, pos, 512)
    adds = [_DoublingAdd() for _ in model.layers]
    for layer, add in zip(model.layers, adds, strict=True):
        layer.reduce_add, layer.all_reduce.calls = add, 0
    restore_caches(model, snap)
    fused = fast.forward(ids, pos, 512)
    assert [a.calls for a in adds] == [fused_adds] * len(adds)
    assert [layer.all_reduce.calls for layer in model.layers] == [2 - fused_adds] * len(adds)
    assert torch.equal(fused, unfused)


@needs_interpreter
def test_kernels_reason_says_a_rank_is_tensor_parallel(monkeypatch) -> None:
    import hybridgraph.kernels.selfcheck as selfcheck
    from hybridgraph.model.fast_decode import triton_decode
    from hybridgraph.model.kernel_plan import KernelPlan
    monkeypatch.setattr(selfcheck, "check_kernels", lambda *_: (True, "ok"))  # no GPU here
    model = random_model(SMALL, torch.device("cpu"), F16, seed=1)
    model.setup_caches(1, 64)
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=False))
    assert fast is not None and reason == "ok"
    for layer in model.layers:
        layer.all_reduce = _Doubling(in_place=False)
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=False))
    assert fast is not None and "tensor parallel" in reason


@needs_interpreter
@pytest.mark.parametrize("gemvs,b", [(("qkv", "wo", "w13", "w2", "head"), 1),
                                     (("wo", "w2"), 1), (("qkv", "w13", "head"), 3)])
def test_gemv_launches_name_each_launch_of_a_forward(gemvs, b) -> None:
    """`bench profile` names a traced GEMV launch by its place in the forward: the order
    gemv_launches gives must be the order the forward launches them in."""
    from types import SimpleNamespace

    from hybridgraph.kernels import ffn, gemv
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _peaked_model(64)
    fast = TritonDecode(model, 3, KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False))
    layer = model.layers[0]
    name_of = {layer.attention.wqkv.weight.shape: "qkv", layer.attention.wo.weight.shape: "wo",
               layer.feed_forward.w13.weight.shape: "w13",
               layer.feed_forward.w2.weight.shape: "w2", model.output.weight.shape: "head"}
    assert len(name_of) == 5  # SMALL's shapes tell the projections apart
    seen: list[str] = []

    def traced(x, w, *args, **kwargs):
        seen.append(name_of[w.shape])
        return gemv.gemv(x, w, *args, **kwargs)

    def traced_ffn(*args, **kwargs):  # the fused feed-forward, one launch
        seen.append("w13+w2")
        return ffn.ffn(*args, **kwargs)

    fast._gemv = SimpleNamespace(**{**{n: getattr(gemv, n) for n in gemv.__all__},
                                    "gemv": traced})
    fast._ffn = SimpleNamespace(ffn=traced_ffn, fusable=ffn.fusable)
    fast.forward(torch.tensor([1, 2, 3])[:b], torch.tensor([4, 5, 6])[:b], 64)
    assert seen == fast.gemv_launches(b) and len(seen) > 0


@needs_interpreter
def test_fused_feed_forward_gives_the_two_launches_logits() -> None:
    """KernelPlan.fuse_ffn (the default): one-row steps run gate/up and down as one launch
    (kernels/ffn.py). Down takes its fused config there (32-row programs), which sums
    in another order, so logits agree within rounding, the cache exactly; batches keep
    two launches. `bench profile` names the fused launch "w13+w2"."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _peaked_model(512)
    model.prefill(torch.randint(0, 97, (3, 12)))
    plain = TritonDecode(model, 3, KernelPlan(fuse_ffn=False))
    fused = TritonDecode(model, 3, KernelPlan())  # the default
    assert fused.fused_ffn and not plain.fused_ffn
    snap = snapshot_caches(model)
    for ids, pos in ((torch.tensor([1]), torch.tensor([12])),
                     (torch.tensor([1, 2, 3]), torch.tensor([12, 5, 300]))):
        expect = plain.forward(ids, pos, 512)
        written = [c.k.clone() for c in model.caches]
        restore_caches(model, snap)
        got = fused.forward(ids, pos, 512)
        assert ref.rel_err(got, expect) < 2 * TOL and torch.equal(got.argmax(-1),
                                                                   expect.argmax(-1))
        assert all(torch.equal(c.k, k) for c, k in zip(model.caches, written, strict=True))
        restore_caches(model, snap)
    assert fused.gemv_launches(1) == ["qkv", "wo", "w13+w2"] * 2 + ["head"]
    assert fused.gemv_launches(3) == plain.gemv_launches(3)


def test_plan_on_drops_pdl_where_the_gpu_lacks_it(monkeypatch) -> None:
    """One owner for the PDL rule: the plan TritonDecode runs and the reason
    triton_decode gives both come from plan_on."""
    import hybridgraph.kernels.selfcheck as selfcheck
    from hybridgraph.model.fast_decode import TritonDecode, triton_decode
    from hybridgraph.model.kernel_plan import KernelPlan, plan_on
    cpu = torch.device("cpu")
    assert plan_on(cpu, KernelPlan(pdl=True)).pdl is False  # no PDL off sm_90
    assert plan_on(cpu, KernelPlan(pdl=True, block_t=32)).block_t == 32
    model = random_model(SMALL, cpu, F16, seed=1)
    model.setup_caches(1, 64)
    assert TritonDecode(model, 1, KernelPlan(pdl=True)).plan.pdl is False
    monkeypatch.setattr(selfcheck, "cannot_run", lambda *_: None)  # as if a GPU were here
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=True), check=False)
    assert fast is not None and fast.plan.pdl is False and "without PDL" in reason
    fast, reason = triton_decode(model, 1, KernelPlan(pdl=False), check=False)
    assert fast is not None and reason == "ok"


def test_kernel_plan_rejects_unknown_projection() -> None:
    from hybridgraph.model.kernel_plan import KernelPlan
    with pytest.raises(ValueError, match="unknown projections"):
        KernelPlan(gemv=("qkv", "mlp"))
    with pytest.raises(ValueError, match="unknown projections"):
        KernelPlan(gemv_batched=("mlp",))


def test_kernel_plan_picks_projections_by_rows() -> None:
    from hybridgraph.model.kernel_plan import KernelPlan
    plan = KernelPlan(gemv=("wo", "w13"), gemv_batched=("w2",))
    assert plan.uses(1) == ("wo", "w13")
    assert plan.uses(2) == plan.uses(16) == ("w2",)
    assert KernelPlan(gemv=("wo",), gemv_batched=None).uses(8) == ("wo",)


def test_o_projection_prefetches_while_attention_runs() -> None:
    """The one-row O GEMV follows attention, which leaves HBM idle: it takes the deeper
    idle_prefetch rule (or the plan's wo_prefetch); the other projections keep theirs, and a
    kernel prefill's O the batched tiles with that prefetch.
    Hidden 4096 as llama-2-7b: O splits K in 2, so half a slice is 16 lines, not 4."""
    from dataclasses import replace

    from hybridgraph.kernels.gemv_config import EPI_RESID, default_config
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    wide = replace(SMALL, hidden_size=4096, num_heads=32, num_kv_heads=32, num_layers=1)
    model = random_model(wide, torch.device("cpu"), F16, seed=1)
    model.setup_caches(1, 64)
    fast = TritonDecode(model, 1, KernelPlan(pdl=False))
    assert fast.configs["wo"].prefetch == 16
    assert fast.configs["w2"].prefetch == fast.configs["qkv"].prefetch == 4
    assert TritonDecode(model, 1, KernelPlan(wo_prefetch=8)).configs["wo"].prefetch == 8
    # A kernel prefill's O launches early too: the batched rule's tiles, the same prefetch.
    batched = default_config(4096, 4096, 132, EPI_RESID, rows=2)
    assert fast.prefill_wo == batched._replace(prefetch=16) and batched.prefetch == 4


@needs_interpreter
def test_batches_over_max_rows_decode_on_the_blocks() -> None:
    """KernelPlan.max_rows: the kernels serve buckets up to it; Steps runs larger ones on
    the model's blocks, and the kernels refuse a batch they were not sized for."""
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
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

def _prefill_model():
    model = _peaked_model(64)
    for c in model.caches:  # stale contents, so "untouched" means something
        c.k.copy_(rnd(*c.k.shape))
        c.v.copy_(rnd(*c.v.shape))
    return model


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
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
    model = _prefill_model()
    plan = KernelPlan(pdl=False) if gemvs == "default" else \
        KernelPlan(gemv=gemvs, gemv_batched=gemvs, pdl=False)
    fast = TritonDecode(model, 3, plan)
    ids = torch.randint(0, SMALL.vocab_size, (t,))
    row, li = torch.tensor([2]), torch.tensor([last])
    before = snapshot_caches(model)
    with torch.no_grad():
        got = fast.prefill(ids, row, li)
        written = snapshot_caches(model)
        restore_caches(model, before)
        expect = model.prefill(ids[None], li, rows=row)
    assert got.shape == (1, SMALL.vocab_size) and got.dtype == torch.float32
    assert ref.rel_err(got, expect) < 4 * TOL  # two layers of fp16 roundings apart
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for (k, v), c, (k0, v0) in zip(written, model.caches, before, strict=True):
        assert ref.rel_err(k[2, :, :t], c.k[2, :, :t]) < TOL
        assert ref.rel_err(v[2, :, :t], c.v[2, :, :t]) < TOL
        rows, pos = torch.full((t,), 2), torch.arange(t)
        assert only_written(k0, k, rows, pos) and only_written(v0, v, rows, pos)


@needs_interpreter
def test_triton_prefill_refuses_what_it_does_not_serve() -> None:
    from hybridgraph.model.fast_decode import TritonDecode, prefill_window
    from hybridgraph.model.kernel_plan import KernelPlan
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
    more prompts or prefill_rows=0 run on glue_prefill (tests/test_fast_prefill.py)."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan
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
    before = snapshot_caches(model)
    with torch.no_grad():
        got = steps.forward_prefill(b, t)
        written = snapshot_caches(model)
        restore_caches(model, before)
        expect = model.prefill(bufs.prompt_ids[:b, :t], bufs.last_idx[:b],
                               rows=torch.arange(1, 1 + b))
    assert calls == ([t] if on_kernels else [])
    assert ref.rel_err(got, expect) < 4 * TOL
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for (k, _), c in zip(written, model.caches, strict=True):
        assert ref.rel_err(k[1:1 + b, :, :t], c.k[1:1 + b, :, :t]) < TOL
        assert torch.equal(k[0], c.k[0])  # row 0 is nobody's


@needs_interpreter
def test_head_dim_under_32_takes_qkv_off_the_batched_gemv() -> None:
    """RoPE row sets divide D/2 and tl.dot needs 16 rows: head_dim 16 (the tiny preset)
    runs a 2+ row QKV on cuBLAS + glue, one row still on the GEMV; and a short prefill,
    which runs batched, matches the model's."""
    from hybridgraph.kernels import reference as ref
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import PROJECTIONS
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64, name="d16")
    model = random_model(cfg, torch.device("cpu"), F16, seed=1)
    model.setup_caches(1, 64)
    fast = TritonDecode(model, 1)
    assert fast.plan.uses(1) == PROJECTIONS
    assert fast.plan.uses(2) == tuple(p for p in PROJECTIONS if p != "qkv")
    ids = torch.randint(0, 97, (7,))
    got = fast.prefill(ids, torch.tensor([0]), torch.tensor([6]))
    expect = model.prefill(ids[None], torch.tensor([6]))
    assert ref.rel_err(got, expect) < 4 * TOL
