"""GPU tests: marked `gpu`, skipped where CUDA is absent (CI stays green)."""

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

from hybridgraph.model.config import ModelConfig
from hybridgraph.model.loader import random_model
from hybridgraph.model.tokenizer import ByteTokenizer

# Every module here sets: pytestmark = [pytest.mark.gpu, needs_cuda]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


T = TypeVar("T")


def capture(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn run once on a side stream (so Triton's compiles and the workspaces of cuBLAS and
    torch.sort happen outside the capture), then captured in a CUDA graph. Capturing runs
    nothing: state fn changes is as the warm-up left it. Returns the graph and what fn
    returned inside it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replays_equal(graph: torch.cuda.CUDAGraph, out: torch.Tensor, expect: torch.Tensor,
                  times: int) -> bool:
    """Replays `graph` `times` times, poisoning `out` with NaN before each; True when every
    replay wrote exactly `expect` (a race between its kernels shows on some replay)."""
    for _ in range(times):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if not torch.equal(out, expect):
            return False
    return True


SMALL = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                    num_heads=8, num_kv_heads=4, max_position_embeddings=4096, name="small")


def small_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    return random_model(SMALL, torch.device("cuda"), dtype, seed)


@pytest.fixture
def tokenizer():
    return ByteTokenizer()
