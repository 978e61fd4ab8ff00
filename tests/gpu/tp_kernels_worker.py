"""One rank of the check that the Triton decode kernels serve a tensor-parallel rank
(tests/gpu/test_parallel.py starts 2).

Every rank loads its float16 shard with the NCCL all-reduce hook on each block, then
decodes the same steps two ways from the same cache: on the Triton kernels
(Steps(kernels="triton"), the default plan, PDL where the GPU has it, captured in a CUDA
graph with its all-reduces inside) and on the PyTorch blocks (Block.decode, eager). Both
make the same all-reduces in the same order on every rank, so no leader is needed. Then a
40-token prefill both ways (eager). Each rank writes OUT/kernels-rank{r}.json: the kernels
in use and why, the worst relative error of the kernel logits, and how many
well-separated greedy tokens were compared and differed (decode, then prefill).
Usage: python -m tests.gpu.tp_kernels_worker OUT MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hybridgraph.kernels.reference import rel_err
from hybridgraph.model.llama import Transformer
from hybridgraph.parallel.engine import shard_model
from hybridgraph.parallel.group import init_group
from hybridgraph.runtime.step import StepBuffers, Steps

ROWS, MAX_SEQ, WINDOW, STEPS = 3, 1024, 256, 12
MARGIN = 0.1  # a reference top-2 gap above the paths' difference (~0.02 at one GPU)


def _restore(model: Transformer, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for c, (k, v) in zip(model.caches, caches, strict=True):
        c.k.copy_(k)
        c.v.copy_(v)


def _snapshot(model: Transformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(c.k.clone(), c.v.clone()) for c in model.caches]


def compare(model: Transformer, bufs: StepBuffers, fast: Steps, slow: Steps) -> dict:
    """Kernel logits (graph-replayed) against the blocks' (eager), step by step."""
    b, dev = ROWS, bufs.ids.device
    gen = torch.Generator().manual_seed(11)  # on the CPU: every rank draws the same prompts
    bufs.prompt_ids[:b, :9] = torch.randint(0, model.config.vocab_size, (b, 9),
                                            generator=gen).to(dev)
    bufs.last_idx[:b] = torch.tensor([8, 4, 6], device=dev)
    worst, compared, differed = 0.0, 0, 0
    with torch.no_grad():
        first = slow.forward_prefill(b, 9).argmax(-1)
        bufs.ids[:b], bufs.pos[:b] = first, bufs.last_idx[:b] + 1
        caches = _snapshot(model)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on the capture stream (NCCL included)
            fast.forward_decode(b, WINDOW)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        _restore(model, caches)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            logits = fast.forward_decode(b, WINDOW)
        torch.cuda.synchronize()
        _restore(model, caches)
        for _ in range(STEPS):
            snap = _snapshot(model)
            expect = slow.forward_decode(b, WINDOW)
            _restore(model, snap)
            graph.replay()
            torch.cuda.synchronize()
            worst = max(worst, rel_err(logits, expect))
            top2 = expect.topk(2, dim=-1).values
            separated = (top2[:, 0] - top2[:, 1]) > MARGIN
            compared += int(separated.sum())
            differed += int((logits.argmax(-1) != expect.argmax(-1))[separated].sum())
            bufs.ids[:b] = expect.argmax(-1)
            bufs.pos[:b] += 1
    return {"rel_err": worst, "compared": compared, "differed": differed,
            "steps": STEPS * b}


def compare_prefill(model: Transformer, bufs: StepBuffers, fast: Steps, slow: Steps) -> dict:
    """A 40-token prefill, one prompt and ROWS, on the kernels (model/fast_prefill.py: O and
    down reduced by the hook before their adds) against the blocks' (eager both)."""
    dev, t = bufs.ids.device, 40
    gen = torch.Generator().manual_seed(12)
    bufs.prompt_ids[:ROWS, :t] = torch.randint(0, model.config.vocab_size, (ROWS, t),
                                               generator=gen).to(dev)
    bufs.last_idx[:ROWS] = torch.tensor([t - 1, 20, 7], device=dev)
    worst, compared, differed = 0.0, 0, 0
    with torch.no_grad():
        for b in (1, ROWS):
            expect = slow.forward_prefill(b, t)
            got = fast.forward_prefill(b, t)
            worst = max(worst, rel_err(got, expect))
            top2 = expect.topk(2, dim=-1).values
            separated = (top2[:, 0] - top2[:, 1]) > MARGIN
            compared += int(separated.sum())
            differed += int((got.argmax(-1) != expect.argmax(-1))[separated].sum())
    return {"prefill_rel_err": worst, "prefill_compared": compared,
            "prefill_differed": differed}


def main(out: Path, model_dir: str) -> int:
    tp = int(os.environ["WORLD_SIZE"])
    group = init_group(tp, "cuda")
    model, _ = shard_model(model_dir, group, torch.float16, allreduce="nccl", max_batch=ROWS)
    with torch.no_grad():  # peaked logits (the head is replicated): tokens well separated
        model.output.weight.mul_(50.0)
    model.setup_caches(ROWS, MAX_SEQ)
    bufs = StepBuffers(ROWS, MAX_SEQ, group.device)
    fast, slow = Steps(model, bufs, kernels="triton"), Steps(model, bufs)
    result: dict = {"kernels": fast.kernels, "kernels_reason": fast.kernels_reason}
    # Compare only where every rank runs the kernels, or their all-reduces fall out of step.
    everywhere = torch.tensor([int(fast.kernels == "triton")])
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=group.control)
    if everywhere.item():
        result.update(compare(model, bufs, fast, slow))
        result.update(compare_prefill(model, bufs, fast, slow))
    (out / f"kernels-rank{group.rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
