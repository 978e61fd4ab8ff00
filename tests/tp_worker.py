"""One rank of the tensor-parallel CPU checks (tests/test_parallel.py starts N of these).

For each model source it runs, on every rank, the sharded model's prefill and decode
(logits), then a leader/follower Engine that generates greedy and seeded-sampled tokens.
Rank 0 writes logits (safetensors) and tokens (JSON) to the output directory.
Usage: python -m tests.tp_worker OUT_DIR SOURCE [SOURCE ...]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybridgraph.engine import Engine, SamplingParams
from hybridgraph.engine_config import EngineConfig
from hybridgraph.parallel.control import Leader, follow, lead
from hybridgraph.parallel.engine import shard_model
from hybridgraph.parallel.group import init_group
from hybridgraph.runtime.step import compiled_blocks

PROMPTS = [[5, 17, 42, 9, 33, 7, 21], [11, 3, 60]]
NEW = 8


def logits(model, compiled: bool = False) -> dict[str, torch.Tensor]:
    """The same calls tests/test_parallel.py makes on the one-rank model. compiled: through
    the blocks hybrid mode compiles (the all-reduce traced by torch.compile)."""
    blocks = {}
    if compiled:
        blocks = dict(zip(("prefill", "decode"), compiled_blocks(), strict=True))
    model.setup_caches(2, 32)
    ids = torch.tensor([PROMPTS[0][:5], PROMPTS[1] + [4, 8]])
    with torch.inference_mode():
        pre = model.prefill(ids, **({"block": blocks["prefill"]} if compiled else {}))
        dec = model.decode(torch.tensor([13, 14]), torch.tensor([5, 5]), 32,
                           **({"block": blocks["decode"]} if compiled else {}))
    return {"prefill": pre, "decode": dec}


def generate(engine: Engine) -> list[list[int]]:
    sampling = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=7)]
    return [r.tokens for r in engine.generate_batch(PROMPTS, NEW, sampling, stop_ids=[])]


def engine_of(model, tok, tp: int) -> Engine:
    return Engine(model, tok, EngineConfig(mode="eager", max_batch=2, max_seq_len=32, tp=tp))


def lead_tiny(tp: int) -> tuple[Engine, Leader] | None:
    """Rank 0: an engine over the sharded tiny model, leading the others. The others
    follow it until it stops, then get None."""
    group = init_group(tp, "cpu")
    engine = engine_of(*shard_model("tiny", group, torch.float32, seed=3), tp)
    if not group.leader:
        follow(engine, group)
        return None
    return engine, lead(engine, group)


def loop(out: Path, tp: int) -> int:
    """Generate forever (rank 0) / follow (others): the killed-rank check's target."""
    led = lead_tiny(tp)
    if led is None:
        return 0
    engine, _ = led
    generate(engine)
    (out / "looping").touch()
    while True:
        generate(engine)


def idle(out: Path, tp: int, seconds: float) -> int:
    """Generate, stay idle for `seconds`, generate again: followers must wait it out."""
    led = lead_tiny(tp)
    if led is None:
        return 0
    engine, leader = led
    first = generate(engine)
    time.sleep(seconds)
    assert generate(engine) == first
    leader.stop()
    (out / "idle-ok").touch()
    return 0


def main(out: Path, sources: list[str]) -> int:
    tp = int(os.environ["WORLD_SIZE"])
    if sources == ["--loop"]:
        return loop(out, tp)
    if sources[0] == "--idle":
        return idle(out, tp, float(sources[1]))
    group = init_group(tp, "cpu")
    for source in sources:
        model, tok = shard_model(source, group, torch.float32, seed=3)
        got = logits(model)
        if source == "tiny":
            got.update({f"{k}_compiled": v for k, v in logits(model, compiled=True).items()})
        engine = engine_of(model, tok, tp)
        name = Path(source).name
        if group.leader:
            save_file({k: v.contiguous() for k, v in got.items()}, str(out / f"{name}.safetensors"))
            leader = lead(engine, group)
            tokens = generate(engine)
            leader.stop()
            (out / f"{name}.json").write_text(json.dumps(tokens))
        else:
            follow(engine, group)
    group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
