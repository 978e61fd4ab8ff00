"""Issue 3's measurement: TTFT (10 and 500 tokens) and decode ms/token in all four modes.

python benchmarks/modes.py --model llama-2-7b --dtype float16 --out benchmarks/results
Same process, same weights, same prompts for every mode; warm-up, then many runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from hybridgraph.bench.hw import copy_bandwidth
from hybridgraph.bench.table import make_prompt, summarize
from hybridgraph.engine import DTYPES, Engine
from hybridgraph.model.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--modes", default="eager,jit,graph,hybrid")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    bw = copy_bandwidth(torch.device("cuda"))
    model, tok = load_model(args.model, "cuda", DTYPES[args.dtype])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_ms = weight_bytes / bw * 1e3
    prompts = {n: make_prompt(n, model.config.vocab_size) for n in (10, 500)}
    rows = []
    for mode in args.modes.split(","):
        gc.collect()
        torch.cuda.empty_cache()
        t0 = time.perf_counter()
        engine = Engine(model, tok, mode=mode, max_seq_len=1024, coverage="pow2")
        startup = time.perf_counter() - t0
        row = {"mode": mode, "startup_s": startup}
        for n, p in prompts.items():
            for _ in range(3):
                engine.generate(p, 1)
            ttft = summarize([engine.generate(p, 1).ttft_ms for _ in range(args.runs)])
            row[f"ttft{n}_median_ms"], row[f"ttft{n}_p99_ms"] = ttft["median"], ttft["p99"]
        engine.generate(prompts[10], 129, stop_ids=[])
        per_token = []
        for _ in range(5):
            per_token += engine.generate(prompts[10], 129, stop_ids=[]).token_ms
        dec = summarize(per_token)
        row["decode_median_ms"], row["decode_mean_ms"] = dec["median"], dec["mean"]
        row["decode_p99_ms"] = dec["p99"]
        row["decode_floor_fraction"] = floor_ms / row["decode_median_ms"]
        row["graphs"] = engine.stats().get("graphs", {}).get("held", 0)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine

    gpu = torch.cuda.get_device_name()
    cfg = model.config
    head = (f"# Four modes: {cfg.name} ({args.dtype}) on {gpu}\n\n"
            f"torch {torch.__version__}; model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, vocab {cfg.vocab_size}; "
            f"weights {weight_bytes / 1e9:.2f} GB; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
            f"decode floor {floor_ms:.2f} ms/token. KV cache 1024 positions, coverage pow2. "
            f"TTFT: {args.runs} runs after 3 warm-ups; decode: 5 x 128 tokens after a 10-token "
            f"prompt.\n\n")
    table = ("| mode | TTFT 10 med (ms) | TTFT 10 P99 | TTFT 500 med (ms) | TTFT 500 P99 | "
             "decode med (ms/token) | decode P99 | floor / decode | start-up (s) |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    for r in rows:
        table += (f"| {r['mode']} | {r['ttft10_median_ms']:.2f} | {r['ttft10_p99_ms']:.2f} | "
                  f"{r['ttft500_median_ms']:.2f} | {r['ttft500_p99_ms']:.2f} | "
                  f"{r['decode_median_ms']:.3f} | {r['decode_p99_ms']:.3f} | "
                  f"{r['decode_floor_fraction']:.0%} | {r['startup_s']:.1f} |\n")
    print(head + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        slug = gpu.replace(" ", "-")
        (out / f"modes-{cfg.name}-{slug}.md").write_text(head + table)
        (out / f"modes-{cfg.name}-{slug}.json").write_text(json.dumps(
            {"gpu": gpu, "torch": torch.__version__, "dtype": args.dtype, "model": cfg.to_dict(),
             "copy_bandwidth_Bps": bw, "floor_ms": floor_ms, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
