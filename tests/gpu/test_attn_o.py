"""kernels/attn_o.py on a CUDA GPU: attention and O in one launch give what
decode_attention then the O GEMV give (O exactly, on the attention half's output), at the
presets' head layouts with O's default one-row config, eagerly and chained in a CUDA graph
with PDL over many replays (an O item reading the attention output before it landed would
show as a wrong answer on some replay)."""

from __future__ import annotations

import pytest
import torch

from hybridgraph.kernels import reference as ref
from hybridgraph.kernels.selfcheck import TOLERANCE, pdl_supported

from .conftest import capture, needs_cuda, replays_equal

pytestmark = [pytest.mark.gpu, needs_cuda]


def _rnd(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("heads,kv,d", [(32, 32, 128), (32, 4, 64), (32, 8, 64), (9, 3, 64)])
@pytest.mark.parametrize("pdl,early_kv", [(0, False), (2, True)])
@pytest.mark.parametrize("p,window", [(0, 64), (700, 1024)])
def test_attention_o_equals_the_two_launches(dtype, heads, kv, d, pdl, early_kv, p,
                                             window) -> None:
    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels.attention import decode_attention
    from hybridgraph.kernels.attn_o import attention_o, fusable
    from hybridgraph.kernels.workspace import Workspace
    ws = Workspace(1 << 22, 1 << 14, "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    hidden, hd, seq = heads * d, heads * d, 1024
    cfg = g.default_config(hidden, hd, sms, g.EPI_RESID)
    cfg = cfg._replace(prefetch=g.idle_prefetch(hd, cfg))  # as TritonDecode sets O's
    assert fusable(cfg)
    kc, vc = _rnd(2, kv, seq, d, dtype=dtype), _rnd(2, kv, seq, d, dtype=dtype)
    wo = _rnd(hidden, hd, dtype=dtype, scale=hd ** -0.5)
    q = _rnd(1, hd, dtype=dtype)
    pos = torch.tensor([p], device="cuda")

    def two(x: torch.Tensor) -> torch.Tensor:
        o = decode_attention(x, kc, vc, pos, window, _nan(1, hd, dtype=dtype), ws,
                             pdl=pdl, early_kv=early_kv)
        return g.gemv(o, wo, _nan(1, hidden, dtype=dtype), ws, cfg, epi=g.EPI_RESID,
                      residual=x, pdl=pdl)

    def one(x: torch.Tensor, o: torch.Tensor | None = None) -> torch.Tensor:
        o = _nan(1, hd, dtype=dtype) if o is None else o
        return attention_o(x, kc, vc, pos, window, o, wo, x, _nan(1, hidden, dtype=dtype),
                           ws, cfg, pdl=pdl, early_kv=early_kv)

    # The O half runs gemv's own code on the attention half's output: exactly its result.
    o = _nan(1, hd, dtype=dtype)
    out = one(q, o)
    assert torch.equal(out, g.gemv(o, wo, _nan(1, hidden, dtype=dtype), ws, cfg,
                                   epi=g.EPI_RESID, residual=q))
    # The attention half compiles inside another launch (O's stages): equal to the
    # attention kernel's own launch within rounding, and to the float32 reference.
    o2 = decode_attention(q, kc, vc, pos, window, _nan(1, hd, dtype=dtype), ws, pdl=pdl,
                          early_kv=early_kv)
    assert ref.rel_err(o, o2) < TOLERANCE[dtype]
    assert ref.rel_err(out, two(q)) < TOLERANCE[dtype]
    want = ref.gemv_ref(ref.decode_attention_ref(q, kc, vc, pos, window), wo, residual=q)
    assert ref.rel_err(out, want) < TOLERANCE[dtype]

    def chain() -> torch.Tensor:  # each launch reads the one before (q and residual)
        y = q
        for _ in range(4):
            y = one(y)
        return y

    expect = chain()
    graph, got = capture(chain)
    assert replays_equal(graph, got, expect, 20)  # every replay as the eager launches
    assert int(ws.counters.abs().sum()) == 0  # combine, tile, ready and done reset
