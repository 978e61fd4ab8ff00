"""Where does a prefill's wall time go beyond its kernels? (issue 10 experiment)

    python scripts/ttft_probe.py [--model llama-2-7b] [--lengths 10,256,300,500]

For each prompt length: which graph serves it, the TTFT the engine gives (host ids in,
token id out), the served graph's replay alone (CUDA events) and the rest of the
prefill step pieces timed on the host, so a gap between TTFT and the kernels is placed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.table import make_prompt


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--lengths", default="10,256,300,500")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    cfg = BenchConfig(model=args.model, device="cuda", dtype="float16")
    engines = Engines(cfg)
    engine = engines.get(cfg.default_mode)
    runner = engine.runner
    for n in (int(x) for x in args.lengths.split(",")):
        prompt = make_prompt(n, engine.config.vocab_size)
        for _ in range(3):
            engine.generate(prompt, 1, stop_ids=[])
        plan = runner.plan("prefill", 1, n, "greedy")
        ttft = [engine.generate(prompt, 1, stop_ids=[]).ttft_ms for _ in range(args.runs)]
        wall = []
        for _ in range(args.runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(prompt, 1, stop_ids=[])
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
        replay = []
        if plan.served is not None:
            graph = runner.cache.graphs[plan.served].graph
            for _ in range(args.runs):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                replay.append(a.elapsed_time(b))
        step = []
        for _ in range(args.runs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            runner.run(plan)
            b.record()
            b.synchronize()
            step.append(a.elapsed_time(b))
        print({"len": n, "served": str(plan.served), "length": plan.length,
               "ttft_ms": med(ttft), "generate_wall_ms": med(wall),
               "replay_ms": med(replay) if replay else None, "run_step_ms": med(step)},
              flush=True)
    print(engine.stats().get("graphs"))


if __name__ == "__main__":
    main()
