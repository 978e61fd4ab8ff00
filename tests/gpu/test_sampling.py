"""The sampling kernel (kernels/sampling.py) compiled on a GPU: the tokens of
`runtime.dynamic.sample` (eager, the reference every backend matches) for rows of mixed
parameters at the presets' vocabularies, launched eagerly and replayed in a CUDA graph
whose counters move between replays (as a decode graph's do)."""

from __future__ import annotations

import pytest
import torch

from hybridgraph.runtime.dynamic import sample as reference

from .conftest import capture, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]

ROWS = [(1.0, 0, 1.0, 7), (0.7, 40, 1.0, 1), (1.3, 0, 0.9, 2), (0.8, 5, 0.5, 3),
        (0.0, 0, 1.0, 4), (1.0, 1, 1.0, 5), (2.0, 0, 0.05, 6), (1.0, 3000, 0.95, 2**40 + 9)]


@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("pdl", [False, True])
def test_sample_kernel_draws_the_reference_tokens_in_a_graph(vocab: int, pdl: bool) -> None:
    from hybridgraph.kernels.sampling import sample
    from hybridgraph.kernels.workspace import Workspace
    dev = dict(device="cuda")
    t, k, p, s = zip(*ROWS, strict=True)
    params = [torch.tensor(t, **dev), torch.tensor(k, dtype=torch.int64, **dev),
              torch.tensor(p, **dev), torch.tensor(s, dtype=torch.int64, **dev),
              torch.zeros(len(ROWS), dtype=torch.int64, **dev)]
    gen = torch.Generator("cuda").manual_seed(vocab)
    logits = torch.randn(len(ROWS), vocab, generator=gen, **dev) * 4
    ws = Workspace(1 << 16, 64, "cuda")
    out = torch.full((len(ROWS),), -1, dtype=torch.int64, **dev)
    sample(logits, *params, out, ws, pdl=pdl)
    assert torch.equal(out, reference(logits, *params))
    graph, _ = capture(lambda: sample(logits, *params, out, ws, pdl=pdl))
    for counter in range(1, 6):
        params[4].fill_(counter)
        out.fill_(-1)
        graph.replay()
        assert torch.equal(out, reference(logits, *params)), counter
    torch.cuda.synchronize()
    assert int(ws.counters.abs().sum()) == 0
