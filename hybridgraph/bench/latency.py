"""Latency suites over the Engine API: ttft, decode, p99, ablation.

Every number comes from the engine's own host-side timings (`GenerationResult`), which
stop the clock only once a token id is on the host, so no extra device sync is needed.
Generation ignores stop tokens (stop_ids=[]) so every run produces the same count.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm import tqdm

from hybridgraph.bench.clocks import ClockLog
from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.hw import floor_frac
from hybridgraph.bench.table import Table, make_prompt, summarize
from hybridgraph.engine import Engine


def ttft_samples(engine: Engine, prompt: list[int], runs: int, warmup: int,
                 bar: Any = None, gap_s: float = 0.0) -> list[float]:
    """TTFT of `runs` runs after `warmup` untimed ones; gap_s: the GPU left idle that long
    before each timed run (0: back to back)."""
    for _ in range(warmup):
        engine.generate(prompt, 1, stop_ids=[])
    out = []
    for _ in range(runs):
        if gap_s:
            time.sleep(gap_s)
        out.append(engine.generate(prompt, 1, stop_ids=[]).ttft_ms)
        if bar is not None:
            bar.update(1)
    return out


def ttft_by_length(engine: Engine, lengths: list[int], runs: int, warmup: int,
                   desc: str) -> list[tuple[int, dict[str, float]]]:
    """(prompt length, summary of its TTFT samples) per length, under one progress bar."""
    vocab = engine.config.vocab_size
    with tqdm(total=len(lengths) * runs, desc=desc, unit="run") as bar:
        return [(n, summarize(ttft_samples(engine, make_prompt(n, vocab), runs, warmup, bar)))
                for n in lengths]


def decode_samples(engine: Engine, prompt: list[int], new: int, runs: int,
                   warmup: int = 1) -> list[list[float]]:
    """Per-token latencies (ms) of every token after the first, one list per run."""
    for _ in range(warmup):
        engine.generate(prompt, min(new, 16), stop_ids=[])
    out = []
    for _ in tqdm(range(runs), desc=f"decode {engine.mode}", unit="run", leave=False):
        out.append(engine.generate(prompt, new, stop_ids=[]).token_ms)
    return out


def ttft_suite(cfg: BenchConfig, engines: Engines) -> list[Table]:
    """TTFT by prompt length with the prompts back to back (`ttft`), and for a few lengths
    with the GPU idle `ttft_gap_s` before each prompt (`ttft_spaced`, as a person's
    request finds an idle server). Each row carries the SM clock it ran at."""
    engine = engines.get(cfg.default_mode)
    cols = ["system", "prompt_len", "runs", "median_ms", "mean_ms", "std_ms", "p99_ms",
            "min_ms", "sm_mhz", "clock_capped_by"]
    t = Table("ttft", f"TTFT by prompt length (hybridgraph {engine.mode}, {cfg.ttft_runs} runs "
                      f"each after {cfg.warmup} warm-up, back to back)", cols)
    spaced = Table("ttft_spaced", f"TTFT with the GPU idle {cfg.ttft_gap_s} s before each "
                                  f"prompt (hybridgraph {engine.mode}, {cfg.ttft_runs} runs "
                                  "each)", cols)
    vocab, system = engine.config.vocab_size, f"hybridgraph-{engine.mode}"
    runs = [(t, n, 0.0) for n in cfg.ttft_lengths] + \
        [(spaced, n, cfg.ttft_gap_s) for n in cfg.ttft_spaced_lengths]
    with ClockLog(engines.device) as clocks, \
            tqdm(total=len(runs) * cfg.ttft_runs, desc="ttft", unit="run") as bar:
        for table, n, gap in runs:
            prompt = make_prompt(n, vocab)
            ttft_samples(engine, prompt, 0, cfg.warmup)  # warm-up, outside the clock window
            t0 = clocks.now()
            samples = ttft_samples(engine, prompt, cfg.ttft_runs, 0, bar, gap)
            mhz, capped = clocks.between(t0, clocks.now())
            s = summarize(samples)
            table.add(system, n, s["n"], s["median"], s["mean"], s["std"], s["p99"], s["min"],
                      mhz, capped)
    t.notes.append("TTFT: prompt ids on the host -> first token id on the host.")
    spaced.notes.append("sm_mhz: the median SM clock nvidia-smi read during the row's runs; "
                        "clock_capped_by: the caps its throttle reasons named, each with the "
                        "share of samples it held. Long prompts back to back can hold the "
                        "card at its power limit, which lowers the clock (docs/KERNELS.md "
                        "run 35): compare a length's two rows.")
    return [t, spaced]


def decode_suite(cfg: BenchConfig, engines: Engines, floor_ms: float) -> list[Table]:
    engine = engines.get(cfg.default_mode)
    prompt = make_prompt(cfg.decode_prompt, engine.config.vocab_size)
    runs = decode_samples(engine, prompt, cfg.decode_new, cfg.decode_runs)
    lat = np.asarray(runs, dtype=np.float64)            # [runs, tokens]
    # token_ms[i] is token i+1; the context once it exists is prompt + i + 2 tokens.
    context = cfg.decode_prompt + 2 + np.arange(lat.shape[1])
    system = f"hybridgraph-{engine.mode}"
    t = Table("decode", f"Decode latency by context ({system}, prompt {cfg.decode_prompt}, "
                        f"{cfg.decode_new} new tokens, {cfg.decode_runs} runs pooled)",
              ["system", "context", "count", "mean_ms", "std_ms", "p99_ms", "tokens_per_s",
               "floor_ms", "floor_frac"])
    for lo, hi in cfg.decode_ranges:
        sel = (context >= lo) & (context <= hi)
        if not sel.any():
            continue
        s = summarize(lat[:, sel].ravel())
        t.add(system, f"{lo}-{hi}", int(sel.sum()), s["mean"], s["std"], s["p99"],
              1e3 / s["mean"], floor_ms, floor_frac(s["mean"], floor_ms))
    s = summarize(lat.ravel())
    t.add(system, "all", lat.shape[1], s["mean"], s["std"], s["p99"], 1e3 / s["mean"],
          floor_ms, floor_frac(s["mean"], floor_ms))
    t.notes.append("count: tokens per run in the range. floor_ms: weight bytes read per token / "
                   "measured copy bandwidth; floor_frac = floor_ms / mean_ms (1.0 = at the floor).")
    per_token = Table("decode_tokens", f"Per-token decode latency vs context ({system})",
                      ["system", "context", "median_ms", "min_ms", "max_ms", "floor_frac"])
    for j, c in enumerate(context):
        col = lat[:, j]
        med = float(np.median(col))
        per_token.add(system, int(c), med, float(col.min()), float(col.max()),
                      floor_frac(med, floor_ms))
    return [t, per_token]


def p99_suite(cfg: BenchConfig, engines: Engines) -> list[Table]:
    engine = engines.get(cfg.default_mode)
    t = Table("p99", f"TTFT tail over {cfg.p99_runs} runs per prompt length "
                     f"(hybridgraph {engine.mode})",
              ["system", "prompt_len", "runs", "median_ms", "p90_ms", "p99_ms", "max_ms",
               "p99_over_median"])
    for n, s in ttft_by_length(engine, cfg.p99_lengths, cfg.p99_runs, cfg.warmup, "p99"):
        t.add(f"hybridgraph-{engine.mode}", n, s["n"], s["median"], s["p90"], s["p99"],
              s["max"], s["p99"] / s["median"])
    return [t]


def ablation_variants(cfg: BenchConfig) -> list[tuple[str, str, dict[str, object]]]:
    """(mode, label, engine options) per ablation row, one step at a time: eager, jit,
    graph, then hybrid with Inductor's kernels, the Triton kernels, and Triton with PDL.
    The default mode's engine (hybrid, kernels auto) goes first: the other suites built
    it already, so it is not rebuilt."""
    rows: list[tuple[str, str, dict[str, object]]] = []
    for mode in cfg.modes:
        if mode != "hybrid":
            rows.append((mode, mode, {}))
            continue
        rows += [("hybrid", "hybrid (kernels auto)", {}),
                 ("hybrid", "hybrid +inductor", {"kernels": "inductor"}),
                 ("hybrid", "hybrid +triton", {"kernels": "triton", "pdl": False}),
                 ("hybrid", "hybrid +triton +pdl", {"kernels": "triton", "pdl": True})]
    return sorted(rows, key=lambda r: r[0] != cfg.default_mode or bool(r[2]))


def ablation_suite(cfg: BenchConfig, engines: Engines, floor_ms: float) -> list[Table]:
    ttft = Table("ablation_ttft", f"Ablation: TTFT per mode ({cfg.ttft_runs} runs each)",
                 ["mode", "prompt_len", "runs", "median_ms", "mean_ms", "std_ms", "p99_ms"])
    # Rows name the mode and, for hybrid, its decode kernels; "kernels auto" is what a user
    # gets (triton on sm_90+ where its self-check passes), the others pin one choice.
    dec = Table("ablation_decode", f"Ablation: decode per mode (prompt {cfg.decode_prompt}, "
                                   f"{cfg.decode_new} new tokens, "
                                   f"{cfg.ablation_decode_runs} runs)",
                ["mode", "tokens", "ms_per_token", "std_ms", "p99_ms", "tokens_per_s",
                 "floor_ms", "floor_frac", "graphs"])
    for mode, label, options in ablation_variants(cfg):
        engine = engines.get(mode, **options)
        vocab = engine.config.vocab_size
        for n, s in ttft_by_length(engine, cfg.ablation_lengths, cfg.ttft_runs, cfg.warmup,
                                   f"ablation {label}"):
            ttft.add(label, n, s["n"], s["median"], s["mean"], s["std"], s["p99"])
        runs = decode_samples(engine, make_prompt(cfg.decode_prompt, vocab), cfg.decode_new,
                              cfg.ablation_decode_runs)
        per_run = [float(np.mean(r)) for r in runs]
        pooled = summarize([x for r in runs for x in r])
        ms = float(np.median(per_run))
        graphs = engine.stats().get("graphs", {}).get("held", 0)
        dec.add(label, len(runs[0]), ms, pooled["std"], pooled["p99"], 1e3 / ms, floor_ms,
                floor_frac(ms, floor_ms), graphs)
    dec.notes.append("ms_per_token: median over runs of each run's mean per-token latency. "
                     "floor_ms: the run's decode floor (weight bytes read per token / measured "
                     "copy bandwidth). graphs: CUDA graphs the mode's engine held. Start-up "
                     "cost per mode, in a fresh process each: the cost suite.")
    if not cfg.is_cuda:
        note = ("graph and hybrid modes replay CUDA graphs and were skipped: "
                "this run has no CUDA device.")
        ttft.notes.append(note)
        dec.notes.append(note)
    return [ttft, dec]
