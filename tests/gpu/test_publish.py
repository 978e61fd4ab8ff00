"""kernels/publish.py compiled: a CUDA graph's tokens written straight into page-locked
host memory (no copy after the graph), read by the host once the graph's event is done, on
every replay; masked rows untouched."""

from __future__ import annotations

import pytest
import torch

from .conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_publish_from_a_graph_into_host_memory() -> None:
    from hybridgraph.kernels.publish import publish
    ring = torch.full((8, 16), -1, dtype=torch.int64, pin_memory=True)
    ids = torch.zeros(5, dtype=torch.int64, device="cuda")
    pos = torch.tensor([0, 3, 9, 30, 7], device="cuda")
    active = torch.tensor([1, 1, 0, 1, 1], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids.add_(1)
        pos.add_(active)
        publish(ids, pos, ring, 4, active)
    torch.cuda.synchronize()
    ring.fill_(-1)
    ids.zero_()
    pos.copy_(torch.tensor([0, 3, 9, 30, 7]))
    for step in range(1, 11):
        graph.replay()
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        for j, p0 in enumerate((0, 3, 9, 30, 7)):
            if j == 2:
                assert (ring[:, 4 + j] == -1).all()  # masked: never written
            else:
                assert int(ring[(p0 + step) % 8, 4 + j]) == step


@pytest.mark.parametrize("vocab", [1000, 32000])
def test_greedy_finish_from_a_graph_into_host_memory(vocab: int) -> None:
    """The argmax's Finish (kernels/argmax.py) captured in a graph: each replay advances
    the active rows, and their tokens reach page-locked host memory at their positions'
    slots; a masked row neither moves nor publishes."""
    from hybridgraph.kernels.argmax import argmax
    from hybridgraph.kernels.publish import Finish
    from hybridgraph.kernels.workspace import Workspace
    ws = Workspace(1 << 16, 64, "cuda")
    ring = torch.full((8, 16), -1, dtype=torch.int64, pin_memory=True)
    x = torch.randn(5, vocab, device="cuda")
    ids = torch.full((16,), -1, dtype=torch.int64, device="cuda")
    start = [0, 3, 9, 30, 7]
    pos = torch.zeros(16, dtype=torch.int64, device="cuda")
    active = torch.tensor([1, 1, 0, 1, 1], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        argmax(x, ids, ws, finish=Finish(pos[:5], pos, ring, 0, active))
    torch.cuda.synchronize()
    ring.fill_(-1)
    pos[:5].copy_(torch.tensor(start))
    for step in range(1, 11):
        x[:, (7 * step) % vocab] = 1e4 * step  # each step its own winner
        graph.replay()
        torch.cuda.synchronize()
        assert ids[:5].tolist() == [(7 * step) % vocab] * 5
        for j, p0 in enumerate(start):
            if j == 2:
                assert int(pos[j]) == p0 and (ring[:, j] == -1).all()
            else:
                assert int(pos[j]) == p0 + step
                assert int(ring[(p0 + step) % 8, j]) == (7 * step) % vocab
    assert int(ws.counters.abs().sum()) == 0
