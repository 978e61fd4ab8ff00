"""One rank of the GPU tensor-parallel checks (tests/gpu/test_parallel.py starts N).

Every rank loads its shard of a checkpoint in DTYPE (default float32), sums over the
all-reduce ALLREDUCE picks (EngineConfig.allreduce, default nccl), and builds an engine
in MODE with KERNELS (default inductor; graphs captured ahead, so each decode step replays
a graph with its all-reduces inside); rank 0 generates greedy tokens and writes them, with
seeded sampled tokens (twice), its graph stats and the all-reduce in use, to OUT/tag(...).json, and every rank writes the
decode kernels it runs and why to OUT/tag(...).rank{r}.json.
Usage: python -m tests.gpu.tp_worker OUT MODEL_DIR MODE [DTYPE [ALLREDUCE [KERNELS]]]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from hybridgraph.engine import DTYPES, Engine, SamplingParams
from hybridgraph.engine_config import EngineConfig
from hybridgraph.parallel.control import follow, lead
from hybridgraph.parallel.engine import shard_model
from hybridgraph.parallel.group import init_group

PROMPTS = [[5, 17, 42, 9, 33, 7, 21], [11, 3, 60]]
NEW = 24


def engine_config(mode: str, tp: int, kernels: str = "inductor") -> EngineConfig:
    # Token-equality checks use the blocks on every rank and on the one-GPU reference: same
    # function, same roundings (the Triton kernels serve float16 and bfloat16 only).
    return EngineConfig(mode=mode, max_batch=2, max_seq_len=256, coverage="16,64",
                        kernels=kernels, tp=tp)


def generate(engine: Engine) -> list[list[int]]:
    return [r.tokens for r in engine.generate_batch(PROMPTS, NEW, stop_ids=[])]


def tag(mode: str, dtype: str = "float32", allreduce: str = "nccl",
        kernels: str = "inductor") -> str:
    return f"{mode}-{dtype}-{allreduce}" + ("" if kernels == "inductor" else f"-{kernels}")


def main(out: Path, model_dir: str, mode: str, dtype: str = "float32",
         allreduce: str = "nccl", kernels: str = "inductor") -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tp = int(os.environ["WORLD_SIZE"])
    group = init_group(tp, "cuda")
    config = engine_config(mode, tp, kernels)
    model, tok = shard_model(model_dir, group, DTYPES[dtype], allreduce=allreduce,
                             max_batch=config.max_batch)
    engine = Engine(model, tok, config)
    name = tag(mode, dtype, allreduce, kernels)
    stats = engine.stats()
    (out / f"{name}.rank{group.rank}.json").write_text(json.dumps({
        "kernels": stats["kernels"], "kernels_reason": stats["kernels_reason"]}))
    if not group.leader:
        follow(engine, group)
        return 0
    leader = lead(engine, group)
    tokens = generate(engine)
    # Seeded sampling (on the kernels' sampler where they run), twice: the same draws.
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=s) for s in (5, 6)]
    sampled = [[r.tokens for r in engine.generate_batch(PROMPTS, NEW, params, stop_ids=[])]
               for _ in range(2)]
    leader.stop()
    (out / f"{name}.json").write_text(json.dumps({
        "tokens": tokens, "sampled": sampled, "graphs": engine.stats().get("graphs"),
        "allreduce": group.allreduce, "allreduce_reason": group.allreduce_reason}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), *sys.argv[2:]))
