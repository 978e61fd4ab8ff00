"""One rank of the one-shot kernel's GPU check (tests/gpu/test_oneshot.py starts 2).

Every rank sets up the engine's symmetric buffer (parallel/symm.py) and sums random
messages with the custom ops (the one-shot Triton kernel), with and without a residual:
  eager   float16, bfloat16, float32; [rows, 4096] for rows 1, 3, 16, 64 and an odd size;
  graph   50 calls of mixed sizes (so consecutive calls chunk the buffer differently),
          half with a residual, captured in one CUDA graph and replayed 20 times with
          fresh inputs written between replays: a protocol bug shows as a wrong value.
Each rank gathers every rank's inputs (NCCL), so it knows the exact answer: per case,
rank 0 records whether the result equals `oneshot.reference` bit for bit (the float32
sum in rank order, rounded, plus the residual), its error against a float64 sum, and
whether every rank got the same bits. Written to OUT/oneshot.json.

A call whose peer never pushes spins forever on the GPU: faulthandler's watchdog (a C thread, so a
main thread stuck in a CUDA call cannot hold it up) ends this process after WATCHDOG_S
without progress, and the launcher then stops the other rank.
Usage: python -m tests.gpu.oneshot_worker OUT
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hybridgraph.kernels import oneshot
from hybridgraph.parallel import symm
from hybridgraph.parallel.group import init_group

HIDDEN = 4096
ROWS = (1, 3, 16, 64)
ODD = 1001                      # elements: masked tails, no 16-byte vectors
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRAPH_CALLS, REPLAYS = 50, 20
GRAPH_ROWS = (1, 3, 16, 2)      # cycled over the graph's calls
WATCHDOG_S = 150                # re-armed before every case


def _gather(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> list[torch.Tensor]:
    """Every rank's x, in rank order."""
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return list(out.unbind(0))


def _check(got: torch.Tensor, parts: list[torch.Tensor], residual: torch.Tensor | None,
           group: dist.ProcessGroup, world: int) -> dict:
    want = oneshot.reference(parts, residual)
    exact = sum(p.double() for p in parts)
    if residual is not None:
        exact = exact + residual.double()
    scale = max(exact.abs().max().item(), 1e-30)
    copies = _gather(got, group, world)
    return {"ref_equal": bool(torch.equal(got, want)),
            "rel_err": (got.double() - exact).abs().max().item() / scale,
            "same_on_ranks": all(torch.equal(c, copies[0]) for c in copies),
            "shape": list(got.shape), "dtype": str(got.dtype)}


def _call(x: torch.Tensor, residual: torch.Tensor | None, name: str) -> torch.Tensor:
    if residual is None:
        return torch.ops.hybridgraph.symm_all_reduce(x, name)
    return torch.ops.hybridgraph.symm_all_reduce_add(x, residual, name)


def main(out: Path) -> int:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    world = int(os.environ["WORLD_SIZE"])
    g = init_group(world, "cuda")
    dev, pg = g.device, g.group
    staging = symm.create(pg, dev, max(ROWS) * HIDDEN, DTYPES)   # 1 MB: 64 x 4096 fp32
    gen = torch.Generator(dev).manual_seed(1234 + g.rank)        # each rank its own values
    cases: dict = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")

        def rand(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.randn(*shape, generator=gen, device=dev, dtype=dtype)

        shapes = [(r, HIDDEN) for r in ROWS] + [(ODD,)]
        for shape in shapes:
            for with_res in (False, True):
                faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
                x = rand(*shape)
                assert not staging.refusal(x), staging.refusal(x)
                # One residual on every rank, as the model's is: rank 0's.
                residual = _gather(rand(*shape), pg, world)[0] if with_res else None
                got = _call(x, residual, staging.name)
                key = f"{name}/eager/{'x'.join(map(str, shape))}/{'res' if with_res else 'sum'}"
                cases[key] = _check(got, _gather(x, pg, world), residual, pg, world)

        # Graph: GRAPH_CALLS calls of mixed sizes, half with a residual, in one graph.
        faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
        shapes = [(GRAPH_ROWS[k % len(GRAPH_ROWS)], HIDDEN) for k in range(GRAPH_CALLS)]
        xs = [rand(*s) for s in shapes]
        res = [rand(*s) if k % 2 else None for k, s in enumerate(shapes)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):       # warm-up off the graph: compiles every variant
            for x, r in zip(xs, res, strict=True):
                _call(x, r, staging.name)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [_call(x, r, staging.name) for x, r in zip(xs, res, strict=True)]
        for replay in range(REPLAYS):
            faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
            for x, r in zip(xs, res, strict=True):   # fresh inputs between replays
                x.copy_(rand(*x.shape))
                if r is not None:   # one residual on every rank, as the model's is: rank 0's
                    r.copy_(rand(*x.shape))
                    dist.broadcast(r, src=0, group=pg)
            graph.replay()
            torch.cuda.synchronize()
            worst: dict = {"ref_equal": True, "same_on_ranks": True, "rel_err": 0.0}
            for x, r, o in zip(xs, res, outs, strict=True):
                got = _check(o, _gather(x, pg, world), r, pg, world)
                worst["ref_equal"] &= got["ref_equal"]
                worst["same_on_ranks"] &= got["same_on_ranks"]
                worst["rel_err"] = max(worst["rel_err"], got["rel_err"])
            cases[f"{name}/graph/{replay}"] = worst
    torch.cuda.synchronize()
    dist.barrier(group=pg)
    faulthandler.cancel_dump_traceback_later()
    if g.leader:
        (out / "oneshot.json").write_text(json.dumps(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
