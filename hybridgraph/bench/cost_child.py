"""Child process of the `cost` suite: one mode's start-up cost in a fresh process, so no
compilation or capture done earlier by the parent is reused. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from hybridgraph.bench.table import make_prompt
from hybridgraph.engine import DTYPES, Engine, EngineConfig
from hybridgraph.model.loader import load_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_stats() -> dict[str, float]:
    """What torch.compile did in this process so far: frames compiled (one Dynamo graph
    each), seconds in Dynamo's compile entry (tracing + Inductor, or loading its cache) and
    the Inductor share of them. Read from torch's private counters: empty if they moved."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:
        return {}
    frames = compilation_time_metrics.get("_compile.compile_inner", [])  # one per frame
    return {"frames": len(frames), "compile_s": sum(frames),
            "inductor_s": sum(compilation_time_metrics.get("compile_fx_inner", []))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--dtype", required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--max-seq-len", type=int, required=True)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = EngineConfig(mode=args.mode, max_seq_len=args.max_seq_len)
    t0 = time.perf_counter()
    config.start_kernel_check(device, DTYPES[args.dtype])  # as Engine.load: during the load
    model, tok = load_model(args.model, device, DTYPES[args.dtype])
    _sync(device)
    load_s = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    engine = Engine(model, tok, config)
    _sync(device)
    ready_s = time.perf_counter() - t1
    dynamo = dynamo_stats()  # start-up's share only: before the first request
    res = engine.generate(make_prompt(10, engine.config.vocab_size), 1, stop_ids=[])
    first_token_s = time.perf_counter() - t1
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        kind = "cuda max_memory_allocated"
    else:
        # No allocator statistics on the CPU: the process's peak resident set instead.
        peak = reserved = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        kind = "process max RSS"
    graphs = engine.stats().get("graphs", {})
    # start_s: process work from the load's start to ready (the check overlaps the load).
    print(json.dumps({"mode": args.mode, "load_s": load_s, "ready_s": ready_s,
                      "start_s": load_s + ready_s,
                      "first_token_s": first_token_s, "first_ttft_ms": res.ttft_ms,
                      "weights_bytes": weights, "peak_bytes": peak, "peak_reserved_bytes": reserved,
                      "peak_kind": kind, "graphs": graphs.get("held", 0),
                      "graph_bytes": graphs.get("bytes_held", 0),
                      "phases_s": engine.startup_s, "dynamo": dynamo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
