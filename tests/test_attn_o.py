"""kernels/attn_o.py on the CPU through Triton's interpreter: attention and O in one launch
give exactly what decode_attention then the O GEMV give, leave the counters at zero, refuse
configs they cannot serve; and the kernel compiles for sm_90 (the GPU run:
tests/gpu/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import TOL, nan, needs_interpreter, rnd


@pytest.fixture
def ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 18, 1024, "cpu")


@needs_interpreter
@pytest.mark.parametrize("heads,kv,d,splits,early_kv,o_split", [
    (4, 4, 32, 1, False, 1),    # MHA, one split: each program stores and counts itself
    (8, 2, 32, 3, True, 2),     # GQA, combined splits, early keys, O split over K
    (6, 3, 16, 2, False, 3),    # odd groups, O's splits uneven over its 96 inputs
])
def test_attention_o_equals_attention_then_o(ws, heads, kv, d, splits, early_kv,
                                             o_split) -> None:
    from hybridgraph.kernels import gemv
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.attention import decode_attention
    from hybridgraph.kernels.attn_o import attention_o
    from hybridgraph.kernels.gemv_config import GemvConfig
    hidden, seq, window = 80, 128, 64
    cfg = GemvConfig(half=8, block_k=32, split_k=o_split, dot=False, prefetch=2)
    q, kc, vc = rnd(1, heads * d), rnd(2, kv, seq, d), rnd(2, kv, seq, d)
    wo, res = rnd(hidden, heads * d, scale=0.1), rnd(1, hidden)
    for p in (0, 37, window - 1):
        pos = torch.tensor([p])
        o = nan(1, heads * d)
        out = attention_o(q, kc, vc, pos, window, o, wo, res, nan(1, hidden), ws, cfg,
                          block_t=16, splits=splits, early_kv=early_kv)
        o2 = decode_attention(q, kc, vc, pos, window, nan(1, heads * d), ws, block_t=16,
                              splits=splits, early_kv=early_kv)
        two = gemv.gemv(o2, wo, nan(1, hidden), ws, cfg, epi=gemv.EPI_RESID, residual=res)
        assert torch.equal(o, o2) and torch.equal(out, two)
        want = ref.gemv_ref(ref.decode_attention_ref(q, kc, vc, pos, window), wo,
                            residual=res)
        assert ref.rel_err(out, want) < TOL
        assert int(ws.counters.abs().sum()) == 0  # combine, tile, ready and done counters


@needs_interpreter
def test_attention_o_reads_the_named_cache_row(ws) -> None:
    """A one-token prefill's row names its cache row (cache_rows), as decode_attention."""
    from hybridgraph.kernels import gemv
    from hybridgraph.kernels.attention import decode_attention
    from hybridgraph.kernels.attn_o import attention_o
    from hybridgraph.kernels.gemv_config import GemvConfig
    cfg = GemvConfig(half=8, block_k=32, split_k=2, dot=False)
    q, kc, vc = rnd(1, 64), rnd(3, 2, 64, 32), rnd(3, 2, 64, 32)
    wo, res, pos, rows = rnd(48, 64, scale=0.1), rnd(1, 48), torch.tensor([5]), torch.tensor([2])
    out = attention_o(q, kc, vc, pos, 32, nan(1, 64), wo, res, nan(1, 48), ws, cfg,
                      block_t=16, cache_rows=rows)
    o2 = decode_attention(q, kc, vc, pos, 32, nan(1, 64), ws, block_t=16, cache_rows=rows)
    assert torch.equal(out, gemv.gemv(o2, wo, nan(1, 48), ws, cfg, epi=gemv.EPI_RESID,
                                      residual=res))


def test_attention_o_refuses_what_it_cannot_serve(ws) -> None:
    from hybridgraph.kernels.attn_o import attention_o, fusable
    from hybridgraph.kernels.gemv_config import GemvConfig
    one = GemvConfig(half=8, block_k=32, dot=False)
    assert fusable(one)
    assert not fusable(GemvConfig(half=16))             # the tensor-core GEMV (2+ rows)
    assert not fusable(one._replace(programs=64))       # persistent programs
    assert not fusable(one._replace(num_warps=8))       # one launch, one width
    q, kc, vc = rnd(2, 64), rnd(2, 2, 64, 32), rnd(2, 2, 64, 32)
    with pytest.raises(ValueError, match="one row"):
        attention_o(q, kc, vc, torch.tensor([1, 2]), 32, nan(2, 64), rnd(48, 64), rnd(2, 48),
                    nan(2, 48), ws, one)
    with pytest.raises(ValueError, match="cannot share"):
        attention_o(q[:1], kc, vc, torch.tensor([1]), 32, nan(1, 64), rnd(48, 64),
                    rnd(1, 48), nan(1, 48), ws, one._replace(num_warps=8))


@needs_interpreter
def test_attention_o_compiles_for_hopper() -> None:
    from tests.triton_interpreter import compile_for_hopper
    sig = {n: "*fp16" for n in ("q_ptr", "kc_ptr", "vc_ptr", "o_ptr", "wo_ptr", "res_ptr",
                                "out_ptr")}
    sig.update({"pos_ptr": "*i64", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "crow_ptr": "*i64",
                "stride_crow": "i32", "scale": "fp32"})
    sig.update({n: "i32" for n in ("WINDOW", "KV_HEADS", "MAX_SEQ", "CHUNK", "N_ATTN",
                                   "HIDDEN", "HD", "TILES", "K_SPLIT", "READY_AT")})
    variants = [(sig, dict(REP=rep, D=64, D_PAD=64, BLOCK_R=16, BLOCK_T=64, SPLITS=splits,
                           USE_PDL=pdl, HAS_CROW=False, EARLY_KV=early, HALF=8, BLOCK_K=256,
                           PREFETCH=8, SPLIT_O=split_o), {"num_stages": 1})
                for rep, splits, pdl, early, split_o in ((8, 4, 2, True, 4), (4, 1, 1, False, 2),
                                                          (1, 2, 0, False, 1))]
    err, _ = compile_for_hopper("hybridgraph.kernels.attn_o", "attn_o_kernel", variants)
    assert err == "", err
