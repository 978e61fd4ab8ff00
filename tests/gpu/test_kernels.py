"""The Triton decode kernels against float32 references, and the kernel decode path against
the PyTorch one, on a CUDA GPU.

Tolerances (‖out − ref‖ / ‖ref‖ against float32): TOLERANCE in kernels/selfcheck.py,
2e-3 for float16 and 1.6e-2 for bfloat16 (operands rounded to 11 and 8 bits, float32
accumulation). Every output is poisoned with NaN first, so an unwritten element fails.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hybridgraph.kernels import reference as ref
from hybridgraph.kernels.selfcheck import TOLERANCE, check_kernels, pdl_supported

from .conftest import capture, needs_cuda, replays_equal, small_model

pytestmark = [pytest.mark.gpu, needs_cuda]

DTYPES = (torch.float16, torch.bfloat16)


def _rnd(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


def _ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 22, 1 << 14, "cuda")


def _pdl_options() -> tuple[bool, ...]:
    return (False, True) if pdl_supported(torch.device("cuda")) else (False,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 5, 16])
@pytest.mark.parametrize("n,k,split,programs", [(100, 96, 1, 0), (4096, 4096, 4, 0),
                                                (2048, 8192, 2, 50), (544, 2080, 3, 7)])
@pytest.mark.parametrize("pdl", _pdl_options())
def test_gemv_plain_and_residual(dtype, b, n, k, split, programs, pdl) -> None:
    from hybridgraph.kernels import gemv as g
    ws = _ws()
    x, w, res = _rnd(b, k, dtype=dtype), _rnd(n, k, dtype=dtype, scale=k ** -0.5), \
        _rnd(b, n, dtype=dtype)
    nw = 1 + _rnd(k, dtype=dtype, scale=0.2)
    cfg = g.GemvConfig(half=32, block_k=128, split_k=split, programs=programs)
    out = g.gemv(x, w, _nan(b, n, dtype=dtype), ws, cfg, norm_w=nw, pdl=pdl)
    assert ref.rel_err(out, ref.gemv_ref(x, w, nw)) < TOLERANCE[dtype]
    out = g.gemv(x, w, _nan(b, n, dtype=dtype), ws, cfg, epi=g.EPI_RESID, residual=res, pdl=pdl)
    assert ref.rel_err(out, ref.gemv_ref(x, w, residual=res)) < TOLERANCE[dtype]
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", [1, 3, 16])
@pytest.mark.parametrize("inter,k,split", [(8192, 2048, 2), (11008, 4096, 1), (72, 200, 2)])
def test_gemv_swiglu(dtype, b, inter, k, split) -> None:
    from hybridgraph.kernels import gemv as g
    ws = _ws()
    x, w13 = _rnd(b, k, dtype=dtype), _rnd(2 * inter, k, dtype=dtype, scale=k ** -0.5)
    nw = 1 + _rnd(k, dtype=dtype, scale=0.2)
    cfg = g.GemvConfig(half=16, block_k=64, split_k=split, programs=64)
    out = g.gemv(x, w13, _nan(b, inter, dtype=dtype), ws, cfg, epi=g.EPI_SILU, norm_w=nw)
    assert ref.rel_err(out, ref.swiglu_ref(x, w13, nw)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,d", [(32, 32, 128), (32, 8, 64), (9, 3, 64)])
@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("split", [1, 4])
def test_gemv_qkv_rope_writes_cache(dtype, heads, kv, d, b, split) -> None:
    from hybridgraph.kernels import gemv as g
    ws, hidden, seq = _ws(), heads * d, 512
    x = _rnd(b, hidden, dtype=dtype)
    w = _rnd((heads + 2 * kv) * d, hidden, dtype=dtype, scale=hidden ** -0.5)
    nw = 1 + _rnd(hidden, dtype=dtype, scale=0.2)
    kc, vc = _rnd(b, kv, seq, d, dtype=dtype), _rnd(b, kv, seq, d, dtype=dtype)
    pos = torch.randint(0, seq, (b,), device="cuda")
    pos[0] = seq - 1
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    q = g.gemv(x, w, _nan(b, heads * d, dtype=dtype), ws,
               g.GemvConfig(half=32, block_k=128, split_k=split), epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, w, cos[pos], sin[pos], heads, kv, nw)
    rows = torch.arange(b, device="cuda")
    assert ref.rel_err(q, q_ref) < TOLERANCE[dtype]
    assert ref.rel_err(kc[rows, :, pos], k_ref) < TOLERANCE[dtype]
    assert ref.rel_err(vc[rows, :, pos], v_ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,d", [(32, 32, 128), (32, 8, 64), (9, 3, 64)])
@pytest.mark.parametrize("b", [1, 7, 16])
@pytest.mark.parametrize("window", [256, 512, 1024, 2048, 4096])
def test_decode_attention(dtype, heads, kv, d, b, window) -> None:
    from hybridgraph.kernels.attention import decode_attention
    ws, seq = _ws(), 4096
    q = _rnd(b, heads * d, dtype=dtype)
    kc, vc = _rnd(b, kv, seq, d, dtype=dtype), _rnd(b, kv, seq, d, dtype=dtype)
    pos = torch.randint(0, window, (b,), device="cuda")
    pos[0] = 0
    pos[-1] = window - 1  # both ends of the window
    for pdl in _pdl_options():
        out = decode_attention(q, kc, vc, pos, window, _nan(b, heads * d, dtype=dtype), ws,
                               pdl=pdl)
        assert ref.rel_err(out, ref.decode_attention_ref(q, kc, vc, pos, window)) \
            < TOLERANCE[dtype]
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_glue_kernels(dtype) -> None:
    from hybridgraph.kernels import glue
    b, heads, kv, d, seq, hidden = 5, 9, 3, 64, 300, 1000
    x, res = _rnd(b, hidden, dtype=dtype), _rnd(b, hidden, dtype=dtype)
    nw = 1 + _rnd(hidden, dtype=dtype, scale=0.2)
    xs, xn = _nan(b, hidden, dtype=dtype), _nan(b, hidden, dtype=dtype)
    glue.add_rmsnorm(x, nw, 1e-5, xn, residual=res, sum_out=xs)
    assert ref.rel_err(xs, x.float() + res.float()) < TOLERANCE[dtype]
    assert ref.rel_err(xn, ref.rmsnorm_ref(x.float() + res.float(), nw, 1e-5)) < TOLERANCE[dtype]
    qkv = _rnd(b, (heads + 2 * kv) * d, dtype=dtype)
    kc, vc = _rnd(b, kv, seq, d, dtype=dtype), _rnd(b, kv, seq, d, dtype=dtype)
    pos = torch.tensor([0, 7, 100, 298, 299], device="cuda")
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    q = glue.rope_kv(qkv, cos, sin, pos, kc, vc, _nan(b, heads * d, dtype=dtype), heads, kv)
    qf, kf, vf = qkv.float().split([heads * d, kv * d, kv * d], dim=-1)
    rows = torch.arange(b, device="cuda")
    assert ref.rel_err(q, ref.rope_ref(qf.view(b, heads, d), cos[pos], sin[pos]).reshape(b, -1)) \
        < TOLERANCE[dtype]
    assert ref.rel_err(kc[rows, :, pos], ref.rope_ref(kf.view(b, kv, d), cos[pos], sin[pos])) \
        < TOLERANCE[dtype]
    assert torch.equal(vc[rows, :, pos], qkv[:, (heads + kv) * d:].view(b, kv, d))
    inplace = qkv.clone()  # q_out=None: q and k rotated inside qkv, caches as above
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    glue.rope_kv(inplace, cos, sin, pos, kc2, vc2, None, heads, kv)
    assert torch.equal(inplace[:, :heads * d], q)
    assert torch.equal(inplace[:, heads * d:(heads + kv) * d].view(b, kv, d), kc[rows, :, pos])
    assert torch.equal(inplace[:, (heads + kv) * d:], qkv[:, (heads + kv) * d:])
    assert torch.equal(kc2[rows, :, pos], kc[rows, :, pos])
    assert torch.equal(vc2[rows, :, pos], vc[rows, :, pos])
    gu = _rnd(b, 2 * 700, dtype=dtype)
    h = glue.silu_mul(gu, _nan(b, 700, dtype=dtype))
    expect = torch.nn.functional.silu(gu[:, :700].float()) * gu[:, 700:].float()
    assert ref.rel_err(h, expect) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hb", [2, 16])
def test_rope_kv_head_tiles_match_one_head_a_program(dtype, hb) -> None:
    """A long prefill's rope_kv takes several heads a program: what one head a program
    gives, in place (the glue prefill) and into q_out, at 300 rows of one cache row, and no
    other cache row touched. v is copied bit for bit; q and k agree within the dtype's
    tolerance (on an H100 a 16-head tile fuses the rotation's other product into its FMA:
    1 ulp apart in ~1 of 8 values)."""
    from hybridgraph.kernels import glue
    b, heads, kv, d, seq = 300, 32, 4, 64, 320
    qkv = _rnd(b, (heads + 2 * kv) * d, dtype=dtype)
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    pos, crow = torch.arange(b, device="cuda"), torch.tensor([1], device="cuda").expand(b)
    outs = []
    for h in (1, hb):
        for in_place in (False, True):
            kc, vc = _nan(2, kv, seq, d, dtype=dtype), _nan(2, kv, seq, d, dtype=dtype)
            q = qkv.clone() if in_place else _nan(b, heads * d, dtype=dtype)
            glue.rope_kv(q if in_place else qkv, cos, sin, pos, kc, vc,
                         None if in_place else q, heads, kv, cache_rows=crow,
                         heads_per_program=h)
            assert kc[0].isnan().all() and kc[1, :, b:].isnan().all() and vc[0].isnan().all()
            outs.append((q[:, :heads * d], kc[1, :, :b], vc[1, :, :b]))
    one = outs[0]
    for q, k, v in outs[1:]:
        assert torch.equal(v, one[2])
        assert ref.rel_err(q, one[0].float()) < TOLERANCE[dtype]
        assert ref.rel_err(k, one[1].float()) < TOLERANCE[dtype]


@pytest.mark.parametrize("pdl", [1, 2])
@pytest.mark.parametrize("b,kv,pos", [(1, 4, [256]), (1, 32, [63]), (3, 8, [0, 64, 500])])
def test_early_kv_attention_reads_this_steps_key_after_the_wait(pdl, b, kv, pos) -> None:
    """early_kv: attention reads the earlier steps' keys before its PDL wait, and the key
    at pos (the QKV kernel's, launched just before) after it: the same bits as reading
    them all after it, over the same splits. In a graph, with the key and value at pos
    set to NaN before every replay: a read before the QKV kernel's write would give NaN
    or the wrong answer on some replay."""
    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels.attention import attention_splits, decode_attention
    dtype, ws, heads, d, seq, k, window = torch.float16, _ws(), 32, 64, 1024, 2048, 512
    x, nw = _rnd(b, k, dtype=dtype), 1 + _rnd(k, dtype=dtype, scale=0.2)
    wqkv = _rnd((heads + 2 * kv) * d, k, dtype=dtype, scale=k ** -0.5)
    kc, vc = _rnd(b, kv, seq, d, dtype=dtype), _rnd(b, kv, seq, d, dtype=dtype)
    p = torch.tensor(pos, device="cuda")
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = g.default_config(wqkv.shape[0], k, sms, g.EPI_ROPE, norm=True, d_half=d // 2)
    rows = torch.arange(b, device="cuda")
    # early_kv's own rule splits finer; the other order over other splits would differ
    # in the combine's rounding, not in what was read.
    splits = attention_splits(b, kv, window, 64, sms, min_tiles=1)

    def step(early_kv: bool) -> torch.Tensor:
        q = g.gemv(x, wqkv, _nan(b, heads * d, dtype=dtype), ws, cfg, epi=g.EPI_ROPE,
                   norm_w=nw, rope=g.RopeArgs(cos, sin, p, kc, vc, heads, kv), pdl=pdl)
        return decode_attention(q, kc, vc, p, window, _nan(b, heads * d, dtype=dtype), ws,
                                splits=splits, pdl=pdl, early_kv=early_kv)

    expect = step(False).clone()
    assert torch.equal(step(True), expect)
    graph, out = capture(lambda: step(True))
    for _ in range(20):
        kc[rows, :, p] = float("nan")
        vc[rows, :, p] = float("nan")
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expect)


@pytest.mark.parametrize("mode", [1, 2])
def test_pdl_kernels_replay_in_a_cuda_graph(mode) -> None:
    """A chain of PDL launches captured in a graph gives the eager chain's result
    (mode 1: the next kernel may launch at once; 2: after the main loop)."""
    if not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    from hybridgraph.kernels import gemv as g
    ws, dtype = _ws(), torch.float16
    x = _rnd(4, 2048, dtype=dtype)
    ws_ = [_rnd(2048, 2048, dtype=dtype, scale=2048 ** -0.5) for _ in range(6)]
    cfg = g.GemvConfig(half=32, block_k=128, split_k=4)

    def chain() -> torch.Tensor:
        y = x
        for w in ws_:  # each step reads the one before: a race shows as a wrong answer
            y = g.gemv(y, w, torch.empty_like(y), ws, cfg, epi=g.EPI_RESID, residual=y,
                       pdl=mode)
        return y

    expect = chain().clone()
    graph, out = capture(chain)
    assert replays_equal(graph, out, expect, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pdl", _pdl_options())
def test_self_check_passes(dtype, pdl) -> None:
    assert check_kernels(torch.device("cuda"), dtype, pdl) == (True, "ok")


def _kernel_and_model_steps(gemvs, pdl, rows: int, split_k: int = 2048):
    """The model the two graph tests compare on: small, float16, with peaked logits (so
    greedy tokens are well separated), caches of `rows` rows of 1024 positions; returns
    (model, bufs, Steps on the kernels, Steps on the model's blocks). gemvs: the
    projections on the GEMV ("default": KernelPlan's); pdl: False, True or "late";
    split_k: KernelPlan.prefill_split_k."""
    from hybridgraph.model.kernel_plan import KernelPlan
    from hybridgraph.runtime.step import StepBuffers, Steps

    model = small_model(torch.float16, seed=3)
    with torch.no_grad():
        model.output.weight.mul_(50.0)
    max_seq = 1024
    model.setup_caches(rows, max_seq)
    bufs = StepBuffers(rows, max_seq, torch.device("cuda"))
    kw = dict(pdl=bool(pdl), pdl_late=pdl == "late", prefill_split_k=split_k)
    plan = KernelPlan(**kw) if gemvs == "default" else \
        KernelPlan(gemv=gemvs, gemv_batched=gemvs, **kw)
    fast = Steps(model, bufs, kernels="triton", plan=plan)
    slow = Steps(model, bufs)
    assert fast.kernels == "triton", fast.kernels_reason
    return model, bufs, fast, slow


@pytest.mark.parametrize("gemvs", [("qkv", "wo", "w13", "w2", "head"), ("wo", "w2"), (),
                                   "default"])
@pytest.mark.parametrize("pdl", _pdl_options() + ("late",))
def test_triton_decode_matches_the_model_in_graphs(gemvs, pdl) -> None:
    """Steps(kernels="triton"): captured decode logits within fp16 tolerance of the
    PyTorch block's, and the same greedy tokens over 12 steps wherever the reference's
    best logit leads the next by more than rounding (0.1; the paths differ by ~0.02):
    a near-tie may go either way and says nothing about the kernels."""
    b, window = 3, 256
    model, bufs, fast, slow = _kernel_and_model_steps(gemvs, pdl, b)
    gen = torch.Generator(device="cuda").manual_seed(11)
    bufs.prompt_ids[:b, :9] = torch.randint(0, 512, (b, 9), device="cuda", generator=gen)
    bufs.last_idx[:b] = torch.tensor([8, 4, 6], device="cuda")
    with torch.no_grad():
        first = slow.forward_prefill(b, 9).argmax(-1)
        bufs.ids[:b], bufs.pos[:b] = first, bufs.last_idx[:b] + 1
        caches = [(c.k.clone(), c.v.clone()) for c in model.caches]
        graph, logits_fast = capture(lambda: fast.forward_decode(b, window))
        for c, (k, v) in zip(model.caches, caches, strict=True):
            c.k.copy_(k)
            c.v.copy_(v)
        compared = 0
        for _ in range(12):
            snap = [(c.k.clone(), c.v.clone()) for c in model.caches]
            expect = slow.forward_decode(b, window)
            for c, (k, v) in zip(model.caches, snap, strict=True):
                c.k.copy_(k)
                c.v.copy_(v)
            graph.replay()
            assert ref.rel_err(logits_fast, expect) < TOLERANCE[torch.float16]
            top2 = expect.topk(2, dim=-1).values
            separated = (top2[:, 0] - top2[:, 1]) > 0.1
            compared += int(separated.sum())
            assert torch.equal(logits_fast.argmax(-1)[separated], expect.argmax(-1)[separated])
            bufs.ids[:b] = expect.argmax(-1)
            bufs.pos[:b] += 1
    assert compared >= 30  # of 36: the model's logits are mostly well separated


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split,programs", [(1, 0), (2, 0), (4, 40)])
@pytest.mark.parametrize("half", [8, 16])
def test_gemv_one_row_register_path(dtype, split, programs, half) -> None:
    """dot=False (one row multiplied in registers): every epilogue against its reference,
    at the row-set sizes the default configs use (16 and 32 rows a program)."""
    from hybridgraph.kernels import gemv as g
    ws, k, heads, kv, d, seq = _ws(), 2048, 16, 4, 128, 256
    cfg = g.GemvConfig(half=half, block_k=256, split_k=split, programs=programs, dot=False)
    x, nw = _rnd(1, k, dtype=dtype), 1 + _rnd(k, dtype=dtype, scale=0.2)
    w = _rnd(3000, k, dtype=dtype, scale=k ** -0.5)
    res = _rnd(1, 3000, dtype=dtype)
    out = g.gemv(x, w, _nan(1, 3000, dtype=dtype), ws, cfg, norm_w=nw)
    assert ref.rel_err(out, ref.gemv_ref(x, w, nw)) < TOLERANCE[dtype]
    out = g.gemv(x, w, _nan(1, 3000, dtype=dtype), ws, cfg, epi=g.EPI_RESID, residual=res)
    assert ref.rel_err(out, ref.gemv_ref(x, w, residual=res)) < TOLERANCE[dtype]
    h = g.gemv(x, w[:2000], _nan(1, 1000, dtype=dtype), ws, cfg, epi=g.EPI_SILU, norm_w=nw)
    assert ref.rel_err(h, ref.swiglu_ref(x, w[:2000], nw)) < TOLERANCE[dtype]
    wqkv = _rnd((heads + 2 * kv) * d, k, dtype=dtype, scale=k ** -0.5)
    kc, vc = _rnd(1, kv, seq, d, dtype=dtype), _rnd(1, kv, seq, d, dtype=dtype)
    pos = torch.tensor([seq - 1], device="cuda")
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    q = g.gemv(x, wqkv, _nan(1, heads * d, dtype=dtype), ws, cfg, epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos[pos], sin[pos], heads, kv, nw)
    assert ref.rel_err(q, q_ref) < TOLERANCE[dtype]
    assert ref.rel_err(kc[:, :, seq - 1], k_ref) < TOLERANCE[dtype]
    assert ref.rel_err(vc[:, :, seq - 1], v_ref) < TOLERANCE[dtype]
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0


# ------------------------------------------------ short prefills on the decode kernels

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,split,dot", [(1, 2, False), (10, 1, True), (16, 4, True)])
def test_gemv_rope_writes_the_named_cache_row(dtype, b, split, dot) -> None:
    """RopeArgs.cache_rows (stride 0, as a prefill passes it): rows at positions 0..b-1
    write keys and values into one cache row; nothing else in the caches moves."""
    from hybridgraph.kernels import gemv as g
    ws, heads, kv, d, seq = _ws(), 32, 8, 64, 256
    hidden = heads * d
    x, nw = _rnd(b, hidden, dtype=dtype), 1 + _rnd(hidden, dtype=dtype, scale=0.2)
    w = _rnd((heads + 2 * kv) * d, hidden, dtype=dtype, scale=hidden ** -0.5)
    kc, vc = _rnd(3, kv, seq, d, dtype=dtype), _rnd(3, kv, seq, d, dtype=dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    pos, crow = torch.arange(b, device="cuda"), torch.tensor([2], device="cuda").expand(b)
    ang = torch.rand(seq, d // 2, device="cuda") * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    q = g.gemv(x, w, _nan(b, heads * d, dtype=dtype), ws,
               g.GemvConfig(half=16 if not dot else 32, block_k=128, split_k=split, dot=dot),
               epi=g.EPI_ROPE, norm_w=nw,
               rope=g.RopeArgs(cos, sin, pos, kc, vc, heads, kv, crow))
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, w, cos[pos], sin[pos], heads, kv, nw)
    assert ref.rel_err(q, q_ref) < TOLERANCE[dtype]
    assert ref.rel_err(kc[2, :, :b].transpose(0, 1), k_ref) < TOLERANCE[dtype]
    assert ref.rel_err(vc[2, :, :b].transpose(0, 1), v_ref) < TOLERANCE[dtype]
    for after, before in ((kc, kc0), (vc, vc0)):
        assert torch.equal(after[:2], before[:2]) and torch.equal(after[2, :, b:], before[2, :, b:])
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv,d", [(32, 32, 128), (32, 8, 64), (9, 3, 64)])
@pytest.mark.parametrize("b", [1, 10, 16])
def test_decode_attention_reads_the_named_cache_row(dtype, heads, kv, d, b) -> None:
    """A prefill's rows (positions 0..b-1, one cache row, window the next power of two):
    row t attends to keys 0..t of that row, with the rows grouped a program (the rule:
    prompt_rows) and one a program."""
    from hybridgraph.kernels.attention import decode_attention
    from hybridgraph.model.fast_decode import prefill_window
    ws, seq = _ws(), 1024
    q = _rnd(b, heads * d, dtype=dtype)
    kc, vc = _rnd(3, kv, seq, d, dtype=dtype), _rnd(3, kv, seq, d, dtype=dtype)
    pos, crow = torch.arange(b, device="cuda"), torch.tensor([1], device="cuda").expand(b)
    window = prefill_window(b, seq)
    expect = ref.decode_attention_ref(q, kc[crow], vc[crow], pos, window)
    for pdl, rows in itertools.product(_pdl_options(), (None, 1)):
        out = decode_attention(q, kc, vc, pos, window, _nan(b, heads * d, dtype=dtype), ws,
                               pdl=pdl, cache_rows=crow, rows_per_program=rows)
        assert ref.rel_err(out, expect) < TOLERANCE[dtype]
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("gemvs", [("qkv", "wo", "w13", "w2", "head"), (), "default"])
@pytest.mark.parametrize("pdl", _pdl_options() + ("late",))
@pytest.mark.parametrize("t,last", [(1, 0), (5, 4), (10, 9), (16, 9), (16, 15)])
def test_triton_prefill_matches_the_model_in_graphs(gemvs, pdl, t, last) -> None:
    """Steps(kernels="triton").forward_prefill of one prompt of t <= 16 tokens, captured in
    a CUDA graph, into cache row 2: logits of row `last` within fp16 tolerance of the
    model's prefill (run into row 1), the same keys and values at 0..t-1, nothing else
    written; then greedy decoding from both rows (one batch, the model's blocks, the
    reference's token fed to both) gives the same tokens wherever the reference's best
    logit leads the next by more than 0.1 (test_triton_decode_matches_the_model_in_graphs)."""
    rows, window = 3, 256
    model, bufs, fast, slow = _kernel_and_model_steps(gemvs, pdl, rows)
    calls = []
    real = fast.fast.prefill
    fast.fast.prefill = lambda *a: calls.append(1) or real(*a)
    gen = torch.Generator(device="cuda").manual_seed(11)
    bufs.prompt_ids[0, :t] = torch.randint(0, 512, (t,), device="cuda", generator=gen)
    bufs.last_idx[0] = last
    with torch.no_grad():
        bufs.set_prefill_rows(1)
        expect = slow.forward_prefill(1, t)
        bufs.set_prefill_rows(2)
        snap = [(c.k.clone(), c.v.clone()) for c in model.caches]
        graph, got = capture(lambda: fast.forward_prefill(1, t))
        assert calls, "the prefill did not run on the kernels"
        for c, (k, v) in zip(model.caches, snap, strict=True):  # row 2 poisoned
            c.k.copy_(k)
            c.v.copy_(v)
            c.k[2].fill_(float("nan"))
            c.v[2].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert ref.rel_err(got, expect) < TOLERANCE[torch.float16]
        for c, (k, v) in zip(model.caches, snap, strict=True):
            for now, was in ((c.k, k), (c.v, v)):
                assert torch.equal(now[:2], was[:2])
                assert ref.rel_err(now[2, :, :t], was[1, :, :t]) < TOLERANCE[torch.float16]
                assert torch.isnan(now[2, :, t:]).all()  # past the prompt: not written
                now[2, :, t:] = 0  # so the decode below reads no NaN through masked lanes
        compared = 0
        logits = torch.stack((expect[0], got[0]))
        bufs.ids[:rows] = logits[0].argmax()
        bufs.pos[:rows] = last + 1
        for _ in range(12):
            top2 = logits[0].topk(2).values
            if top2[0] - top2[1] > 0.1:
                compared += 1
                assert int(logits[1].argmax()) == int(logits[0].argmax())
            bufs.ids[:rows] = logits[0].argmax()  # the reference's token, fed to both
            logits = slow.forward_decode(rows, window)[1:]
            bufs.pos[:rows] += 1
    assert compared >= 9  # of 12: the model's logits are mostly well separated


@pytest.mark.parametrize("b,t", [(1, 17), (1, 333), (3, 100)])
@pytest.mark.parametrize("pdl", _pdl_options())
@pytest.mark.parametrize("split_k", [2048, 16], ids=["split-rule", "split-all"])
def test_glue_prefill_matches_the_model_in_graphs(b, t, pdl, split_k) -> None:
    """Steps(kernels="triton").forward_prefill of prompts past the short path (cuBLAS +
    glue + FlashAttention, model/fast_prefill.py), captured in a CUDA graph: logits within
    fp16 tolerance of the model's blocks (eager) and the same greedy tokens, the same keys
    and values at 0..t-1 of each cache row written, nothing past t, no other row. With
    split_k 16 the small model's O and down run split over K (cuBLAS's batched GEMM, the
    parts summed by the glue), as llama-2-7b's down does at a few hundred tokens."""
    rows = 3
    model, bufs, fast, slow = _kernel_and_model_steps("default", pdl, rows, split_k)
    gen = torch.Generator(device="cuda").manual_seed(5)
    bufs.prompt_ids[:b, :t] = torch.randint(0, 512, (b, t), device="cuda", generator=gen)
    bufs.last_idx[:b] = torch.tensor([t - 1, t // 2, 3], device="cuda")[:b]
    with torch.no_grad():
        bufs.set_prefill_rows(0)
        expect = slow.forward_prefill(b, t)
        snap = [(c.k.clone(), c.v.clone()) for c in model.caches]
        graph, got = capture(lambda: fast.forward_prefill(b, t))
        for c, (k, v) in zip(model.caches, snap, strict=True):  # rows :b poisoned
            c.k.copy_(k)
            c.v.copy_(v)
            c.k[:b].fill_(float("nan"))
            c.v[:b].fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
    # Two paths of fp16 roundings (the model's attention repeats GQA keys, SDPA here
    # groups them), so twice the one-kernel tolerance.
    assert ref.rel_err(got, expect) < 2 * TOLERANCE[torch.float16]
    assert torch.equal(got.argmax(-1), expect.argmax(-1))
    for c, (k, v) in zip(model.caches, snap, strict=True):
        for now, was in ((c.k, k), (c.v, v)):
            assert ref.rel_err(now[:b, :, :t], was[:b, :, :t]) < TOLERANCE[torch.float16]
            assert torch.isnan(now[:b, :, t:]).all()
            assert torch.equal(now[b:], was[b:])
