"""The split argmax kernel (kernels/argmax.py) compiled on a GPU: equal to torch.argmax for
every float type and the vocabularies of the presets, with and without PDL, launched
eagerly and replayed in a CUDA graph (the counters must come back to zero between
replays, or the second replay reduces too early)."""

from __future__ import annotations

import pytest
import torch

from .conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


@pytest.mark.parametrize("vocab", [100, 32000, 128256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pdl", [False, True])
def test_argmax_equals_torch_in_a_graph(vocab: int, dtype: torch.dtype, pdl: bool) -> None:
    from hybridgraph.kernels.argmax import argmax
    from hybridgraph.kernels.workspace import Workspace
    ws = Workspace(1 << 16, 64, "cuda")
    rows = 16
    x = torch.randn(rows, vocab, device="cuda").to(dtype)
    x[3, [5, vocab // 2, vocab - 1]] = 100.0  # ties in different slices: the first wins
    out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    argmax(x, out, ws, pdl=pdl)
    assert torch.equal(out, torch.argmax(x, dim=-1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax(x, out, ws, pdl=pdl)
    for seed in range(5):
        x.copy_(torch.randn(rows, vocab, device="cuda", generator=torch.Generator(
            "cuda").manual_seed(seed)).to(dtype))
        out.fill_(-1)
        graph.replay()
        assert torch.equal(out, torch.argmax(x, dim=-1)), seed
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0
