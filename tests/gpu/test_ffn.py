"""kernels/ffn.py on a CUDA GPU: gate/up and down in one launch give exactly what the two
GEMV launches give, at the presets' shapes with their default one-row configs, eagerly and
chained in a CUDA graph with PDL, over many replays (a down item reading h before its
tiles landed would show as a wrong answer on some replay)."""

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
@pytest.mark.parametrize("hidden,inter", [(4096, 11008), (2048, 8192), (2048, 5632),
                                          (256, 512)])
@pytest.mark.parametrize("pdl", [0, 1, 2])
def test_ffn_equals_the_two_gemvs(dtype, hidden, inter, pdl) -> None:
    if pdl and not pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90")
    from hybridgraph.kernels import ffn
    from hybridgraph.kernels import gemv as g
    from hybridgraph.kernels.workspace import Workspace
    ws = Workspace(1 << 22, 1 << 14, "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg13 = g.default_config(inter, hidden, sms, g.EPI_SILU, norm=True)
    cfg2 = g.default_config(hidden, inter, sms, g.EPI_RESID)
    assert ffn.fusable(hidden, inter, cfg13, cfg2)
    x, res = _rnd(1, hidden, dtype=dtype), _rnd(1, hidden, dtype=dtype)
    nw = 1 + _rnd(hidden, dtype=dtype, scale=0.2)
    w13 = _rnd(2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)
    w2 = _rnd(hidden, inter, dtype=dtype, scale=inter ** -0.5)

    def two(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        h = g.gemv(x, w13, _nan(1, inter, dtype=dtype), ws, cfg13, epi=g.EPI_SILU,
                   norm_w=nw, pdl=pdl)
        return g.gemv(h, w2, _nan(1, hidden, dtype=dtype), ws, cfg2, epi=g.EPI_RESID,
                      residual=res, pdl=pdl)

    def one(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return ffn.ffn(x, w13, nw, w2, res, _nan(1, inter, dtype=dtype),
                       _nan(1, hidden, dtype=dtype), ws, cfg13, cfg2, pdl=pdl)

    expect = two(x, res)
    out = one(x, res)
    assert torch.equal(out, expect)
    want = ref.gemv_ref(ref.swiglu_ref(x, w13, nw), w2, residual=res)
    assert ref.rel_err(out, want) < TOLERANCE[dtype]

    def chain() -> torch.Tensor:  # each launch reads the one before
        y = x
        for _ in range(4):
            y = one(y, y)
        return y

    expect = x
    for _ in range(4):
        expect = two(expect, expect)
    graph, got = capture(chain)
    assert replays_equal(graph, got, expect, 20)
    assert int(ws.counters.abs().sum()) == 0  # tile counters, ready[] and done all reset
