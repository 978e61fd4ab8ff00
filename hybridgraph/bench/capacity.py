"""Suites about what the speed costs and how far it scales: coverage, batch, cost."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines, free_memory
from hybridgraph.bench.hw import floor_frac
from hybridgraph.bench.table import Table, make_prompt, summarize
from hybridgraph.engine import Engine

log = logging.getLogger(__name__)
MIB = 1 << 20


def coverage_suite(cfg: BenchConfig, engines: Engines) -> list[Table]:
    """Per strategy: graphs held, their measured bytes, and TTFT over every prompt length
    1..coverage_max_len (a length without its own graph is padded to a larger one)."""
    t = Table("coverage", f"Coverage strategies (hybrid, TTFT over prompt lengths "
                          f"1-{cfg.coverage_max_len}, {cfg.coverage_runs} runs each)",
              ["strategy", "pool", "prefill_graphs", "graphs_held", "graph_mib", "build_s",
               "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms"])
    lengths = list(range(1, cfg.coverage_max_len + 1))
    plans = [(s, True) for s in cfg.coverage_strategies] + [(cfg.pool_strategy, False)]
    engines.model()  # load the weights first: build_s times the engine, not the load
    for strategy, shared in plans:
        engines.release()
        t0 = time.perf_counter()
        engine = engines.get("hybrid", coverage=strategy, shared_pool=shared)
        build_s = time.perf_counter() - t0
        stats = engine.stats()["graphs"]
        prefill = sum(1 for k in engine.runner.held_keys() if k.phase == "prefill")
        vocab = engine.config.vocab_size
        samples: list[float] = []
        desc = f"coverage {strategy} {'shared' if shared else 'per-graph'}"
        with tqdm(total=len(lengths) * (cfg.coverage_runs + 1), desc=desc, unit="run") as bar:
            for n in lengths:
                samples += ttft_runs(engine, make_prompt(n, vocab), cfg.coverage_runs)
                bar.update(cfg.coverage_runs + 1)
        s = summarize(samples)
        t.add(strategy, "shared" if shared else "per-graph", prefill, stats["held"],
              stats["bytes_held"] / MIB, build_s, s["mean"], s["median"], s["p99"])
    engines.release()
    t.notes.append("graph_mib: engine.stats()['graphs']['bytes_held'] (measured pool growth and "
                   "static buffers), prefill and decode graphs together. build_s: engine "
                   "construction (capture of every graph, plus JIT warm-up).")
    return [t]


def ttft_runs(engine: Engine, prompt: list[int], runs: int) -> list[float]:
    engine.generate(prompt, 1, stop_ids=[])   # first use of this length: not timed
    return [engine.generate(prompt, 1, stop_ids=[]).ttft_ms for _ in range(runs)]


def batch_suite(cfg: BenchConfig, engines: Engines, floor_ms: float) -> list[Table]:
    t = Table("batch", f"Throughput: {cfg.batch_prompt}-token prompts, {cfg.batch_new} new "
                       f"tokens per row ({cfg.batch_runs} runs, median)",
              ["mode", "batch", "runs", "median_s", "tokens_per_s", "ttft_ms", "ms_per_step",
               "floor_frac"])
    max_batch = max(cfg.batch_sizes)
    for mode in cfg.modes:
        engines.release()
        # Graphs only for the one prompt length used: the capture time goes to `cost`.
        engine = engines.get(mode, max_batch=max_batch, max_seq_len=cfg.batch_max_seq_len,
                             coverage=str(cfg.batch_prompt))
        vocab = engine.config.vocab_size
        with tqdm(total=len(cfg.batch_sizes) * cfg.batch_runs, desc=f"batch {mode}",
                  unit="run") as bar:
            for b in cfg.batch_sizes:
                prompts = [make_prompt(cfg.batch_prompt, vocab, seed=r) for r in range(b)]
                engine.generate_batch(prompts, cfg.batch_new, stop_ids=[])
                secs, ttft, step = [], [], []
                for _ in range(cfg.batch_runs):
                    t0 = time.perf_counter()
                    res = engine.generate_batch(prompts, cfg.batch_new, stop_ids=[])
                    secs.append(time.perf_counter() - t0)
                    ttft.append(res[0].ttft_ms)
                    step.append(res[0].decode_ms_per_token)
                    bar.update(1)
                s, ms = float(np.median(secs)), float(np.median(step))
                t.add(mode, b, cfg.batch_runs, s, b * cfg.batch_new / s, float(np.median(ttft)),
                      ms, floor_frac(ms, floor_ms))
    engines.release()
    t.notes.append("tokens_per_s: batch x new tokens / wall time of generate_batch (prompt on "
                   "the host -> last tokens on the host). A decode step reads the weights once "
                   "for the whole batch: floor_frac = weight-read floor / ms_per_step.")
    return [t]


def cost_suite(cfg: BenchConfig) -> list[Table]:
    """Each mode started twice in fresh processes over compile caches of its own: first
    empty ("cold": a machine that never ran hybridgraph), then as the first start left
    them ("restart": the same server started again)."""
    t = Table("cost", "Start-up cost per mode (fresh process each): model loaded -> ready",
              ["mode", "caches", "ready_s", "kernels_s", "capture_s", "compile_s", "warmup_s",
               "dynamo_frames", "dynamo_s", "inductor_s", "first_token_s", "load_s",
               "weights_mib", "peak_mib", "extra_mib", "graphs", "graph_mib"])
    kind = ""
    for mode in tqdm(cfg.modes, desc="cost", unit="mode"):
        with tempfile.TemporaryDirectory(prefix="hg-cost-caches-") as caches:
            # Triton's kernel cache and Inductor's (graphs, autotuning, its Triton kernels)
            env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(caches, "triton"),
                       TORCHINDUCTOR_CACHE_DIR=os.path.join(caches, "inductor"))
            for start in ("cold", "restart"):
                free_memory()
                r = _cost_child(cfg, mode, env)
                kind = r["peak_kind"]
                ph, dyn = r.get("phases_s", {}), r.get("dynamo", {})
                t.add(mode, start, r["ready_s"], ph.get("kernels", 0.0),
                      ph.get("capture", 0.0), ph.get("compile", 0.0), ph.get("warmup", 0.0),
                      dyn.get("frames", 0), dyn.get("compile_s", 0.0), dyn.get("inductor_s", 0.0),
                      r["first_token_s"],
                      r["load_s"], r["weights_bytes"] / MIB, r["peak_bytes"] / MIB,
                      (r["peak_bytes"] - r["weights_bytes"]) / MIB, r["graphs"],
                      r["graph_bytes"] / MIB)
    t.notes.append("ready_s: Engine construction (warm-up, JIT compilation, graph capture) after "
                   "the weights are in memory (kernels_s: the Triton self-check; capture_s: compiling the "
                   "forward and capturing graphs, compile_s of it the dry pass that compiles the "
                   "Triton kernels ahead, in parallel; warmup_s: the JIT ops per batch bucket); "
                   "dynamo_frames: functions torch.compile compiled during start-up, "
                   "dynamo_s the seconds it spent on them (tracing and Inductor, or loading "
                   "Inductor's cache), inductor_s Inductor's share; "
                   "first_token_s adds the first 10-token request. "
                   f"peak_mib: {kind} (weights included); extra_mib = peak - weights. "
                   "caches: cold = Triton's and Inductor's compile caches empty (a new directory "
                   "for each mode); restart = the same directories again, as the cold start "
                   "left them.")
    return [t]


def _cost_child(cfg: BenchConfig, mode: str, env: dict[str, str]) -> dict:
    cmd = [sys.executable, "-m", "hybridgraph.bench.cost_child", "--model", cfg.model,
           "--device", cfg.device, "--dtype", cfg.dtype, "--mode", mode,
           "--max-seq-len", str(cfg.max_seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"cost child for {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
