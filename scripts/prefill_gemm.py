"""How fast are a long prefill's projection matmuls on cuBLAS? (issue 10 experiment)

    python scripts/prefill_gemm.py [--model llama-2-7b] [--tokens 256,500,512]

A 500-token llama-2-7b prefill is matmul-bound (~6.7 TFLOP against ~750 TFLOP/s), yet its
TTFT was 13.2 ms against a ~9 ms floor. This times F.linear (cuBLAS, what the Inductor
prefill block calls) for each projection of one layer at each prompt length, in a CUDA
graph of many calls (warm-up, median of several replays), and prints the achieved TFLOP/s
and the number of 128x128 output tiles against the SM count (a tile count just above a
multiple of the SMs leaves the last wave mostly idle). With --splits, also the same product
split over K as one strided-batched GEMM (torch.bmm over views of x and W: no copy), whose
[s, M, N] partials a following glue kernel would sum: more tiles for a narrow projection.
One JSON row per measurement, all of them also in $OUT/prefill_gemm-MODEL.json when OUT is
set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch

from hybridgraph.model.config import preset


def time_us(fn, calls: int = 20, reps: int = 7) -> float:
    """Median microseconds per call of fn, replayed `calls` at a time from a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def emit(rows: list[dict], row: dict) -> None:
    """Keep a measurement and print it as one JSON line."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def save(rows: list[dict], name: str) -> None:
    """All rows, with the GPU's name, to $OUT/name when OUT is set."""
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], name), "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--tokens", default="256,500,512")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--splits", default="1", help="K splits to time, e.g. 1,2,4")
    args = ap.parse_args()
    cfg = preset(args.model)
    dtype = getattr(torch, args.dtype)
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    splits = [int(v) for v in args.splits.split(",")]
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"qkv": (h, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd),
              "o": (cfg.num_heads * hd, h), "w13": (h, 2 * f), "w2": (f, h)}
    rows = []
    for m in (int(t) for t in args.tokens.split(",")):
        total_us, total_flops = 0.0, 0.0
        for name, (k, n) in shapes.items():
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = torch.randn(n, k, device=dev, dtype=dtype) / math.sqrt(k)
            flops = 2.0 * m * n * k
            tiles = math.ceil(m / 128) * math.ceil(n / 128)
            for s in splits:
                if k % s:
                    continue
                out = torch.empty(s, m, n, device=dev, dtype=dtype)
                if s == 1:
                    fn = lambda x=x, w=w, out=out: torch.matmul(x, w.t(), out=out[0])  # noqa: E731
                else:  # [s, M, K/s] and [s, N, K/s] views: split j reads columns j*K/s..
                    xs = x.view(m, s, k // s).transpose(0, 1)
                    ws = w.view(n, s, k // s).transpose(0, 1)
                    fn = lambda xs=xs, ws=ws, out=out: torch.bmm(xs, ws.transpose(1, 2), out=out)  # noqa: E731
                us = time_us(fn)
                if s == 1:
                    total_us += us
                    total_flops += flops
                emit(rows, {"tokens": m, "proj": name, "k": k, "n": n, "split": s,
                            "us": round(us, 2), "tflops": round(flops / us / 1e6, 1),
                            "tiles_128": tiles * s, "waves": round(tiles * s / sms, 2),
                            "partials_mb": round((s - 1) * m * n * x.element_size() / 1e6, 2)})
        layers_ms = total_us * cfg.num_layers / 1e3
        emit(rows, {"tokens": m, "proj": "layer", "us": round(total_us, 2),
                    "tflops": round(total_flops / total_us / 1e6, 1),
                    "all_layers_ms": round(layers_ms, 3)})
    save(rows, f"prefill_gemm-{args.model}.json")


if __name__ == "__main__":
    main()
