"""One rank of the GPU symm_mem all-reduce check (tests/gpu/test_parallel.py starts N).

Every rank sets up a symmetric buffer for float16, bfloat16 and float32 messages (one
byte buffer, sized for ROWS x HIDDEN float32), then sums the same random messages with
the engine's op (parallel/symm.py: the one-shot Triton kernel) and with NCCL: eagerly
(contiguous, transposed and misaligned inputs, and one too big for the buffer, which the
op sends to NCCL), replayed from a CUDA graph with new values, and inside a
torch.compile'd function. Rank 0 writes, per case, whether the two sums are equal and
their largest difference, to OUT/allreduce.json.
Usage: python -m tests.gpu.allreduce_worker OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hybridgraph.parallel import symm
from hybridgraph.parallel.group import init_group

HIDDEN = 512
ROWS = 8                       # the buffer: ROWS x HIDDEN float32 elements
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _nccl(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _record(cases: dict, key: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (key, got.shape, got.dtype)
    diff = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
    cases[key] = {"equal": bool(torch.equal(got, want)), "max_diff": diff}


def main(out: Path) -> int:
    tp = int(os.environ["WORLD_SIZE"])
    g = init_group(tp, "cuda")
    dev, pg = g.device, g.group
    staging = symm.create(pg, dev, ROWS * HIDDEN, DTYPES)

    def op(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.hybridgraph.symm_all_reduce(x, staging.name)

    gen = torch.Generator(dev).manual_seed(1234 + g.rank)   # each rank its own values
    cases: dict = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")

        def rand(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

        inputs = {"row": rand(1, HIDDEN), "rows": rand(ROWS, HIDDEN),
                  "prefill3d": rand(2, 3, HIDDEN),
                  "transposed": rand(HIDDEN, 4).t(),              # not contiguous
                  "offset": rand(HIDDEN + 2)[2:],                 # starts 2 elements in
                  # one row more than the byte buffer holds in this dtype: NCCL, inside the op
                  "too_big": rand(ROWS * 4 // dtype.itemsize + 1, HIDDEN)}
        for key, x in inputs.items():
            before = x.clone()
            refused = staging.refusal(x)
            assert bool(refused) == (key == "too_big"), (key, refused)
            _record(cases, f"{name}/eager/{key}", op(x), _nccl(x, pg))
            assert torch.equal(x, before), f"{name}/{key}: the op changed its input"

        # Replayed from a CUDA graph, with values written after capture.
        static = rand(ROWS, HIDDEN)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op(static)                                           # warm-up off the graph
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = op(static)
        for i in range(3):
            static.copy_(rand(ROWS, HIDDEN))
            graph.replay()
            _record(cases, f"{name}/graph/{i}", got.clone(), _nccl(static, pg))

        # Compiled (Inductor, dynamic shapes): the op stays one opaque call.
        compiled = torch.compile(lambda x: op(x * 2) + 1, dynamic=True, fullgraph=True)
        for rows in (1, 3, ROWS, ROWS + 1):
            x = rand(rows, HIDDEN)
            _record(cases, f"{name}/compiled/{rows}", compiled(x), _nccl(x * 2, pg) + 1)
    torch.cuda.synchronize()
    dist.barrier(group=pg)
    if g.leader:
        (out / "allreduce.json").write_text(json.dumps(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
