"""The `tp` suite: a tensor-parallel run's numbers (`hybridgraph bench tp --tp N`).

Records N, the interconnect (nvidia-smi topology), the weight bytes each rank holds and
reads per token, the per-rank decode floor (those bytes / this run's copy bandwidth), the
all-reduce time per call (NCCL, torch's symmetric-memory one-shot and our one-shot Triton
kernel, eager and graph-replayed, at decode's message sizes, and the engine's own symm_mem
op: parallel/allreduce.py), the all-reduce the engine uses and why, and the TP engine's
TTFT and decode latency.

Every rank runs the all-reduce measurement together, then builds its engine; rank 0 then
measures through its engine while the others follow it (parallel/control.py). At --tp 1
the same suite gives the single-GPU baseline (no all-reduce).
"""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import replace

import numpy as np

from hybridgraph.bench.config import BenchConfig, from_args
from hybridgraph.bench.hw import floor_frac, weight_bytes_per_token
from hybridgraph.bench.latency import decode_samples, ttft_samples
from hybridgraph.bench.table import Table, make_prompt, summarize
from hybridgraph.engine import DTYPES
from hybridgraph.engine_config import EngineConfig
from hybridgraph.parallel import allreduce
from hybridgraph.parallel.engine import follow_main, load_engine
from hybridgraph.parallel.group import init_group
from hybridgraph.parallel.load import model_config, rank_weight_bytes


def engine_config(cfg: BenchConfig) -> EngineConfig:
    """The engine every rank builds (the same on all of them, or they fall out of step).
    `--allreduce auto|nccl|symm_mem` (BenchConfig.allreduce) picks its all-reduce, so the
    same suite measures decode with each; every rank parses the same command line."""
    return cfg.engine_config(cfg.default_mode, tp=cfg.tp, allreduce=cfg.allreduce)


def _allreduce(cfg: BenchConfig) -> list[allreduce.AllReduceTiming]:
    """Collective: every rank calls it at the same point, before building its engine."""
    if cfg.tp == 1:
        return []
    group = init_group(cfg.tp, cfg.device)
    hidden = model_config(cfg.model).hidden_size
    return allreduce.measure(group, hidden, DTYPES[cfg.dtype], rows=cfg.tp_rows)


def follow_bench(args: argparse.Namespace) -> int:
    """Ranks 1..N-1 of `bench tp`: measure all-reduces with rank 0, then follow it."""
    cfg = from_args(args)
    _allreduce(cfg)
    return follow_main(cfg.model, replace(engine_config(cfg), progress=False))


def topology(is_cuda: bool) -> list[str]:
    if not is_cuda:
        return ["n/a: CPU run, gloo over loopback TCP"]
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0:
            return [line.rstrip() for line in out.stdout.splitlines() if line.strip()]
        return [f"nvidia-smi topo -m failed: {out.stderr.strip()}"]
    except (OSError, subprocess.SubprocessError) as e:
        return [f"nvidia-smi topo -m failed: {e}"]


def tp_suite(cfg: BenchConfig, copy_bandwidth_gbs: float) -> list[Table]:
    timings = _allreduce(cfg)
    engine = load_engine(cfg.model, engine_config(cfg))
    dtype = DTYPES[engine.engine_config.dtype]
    held = rank_weight_bytes(engine.model)
    read = weight_bytes_per_token(engine.config, dtype)   # the rank's share (ShardedConfig)
    floor_ms = read / (copy_bandwidth_gbs * 1e9) * 1e3
    vocab = engine.config.vocab_size
    system = f"hybridgraph-{engine.mode}-tp{cfg.tp}"

    ttft = Table("tp_ttft", f"TTFT at TP={cfg.tp} ({system}, {cfg.ttft_runs} runs each)",
                 ["system", "tp", "prompt_len", "median_ms", "p99_ms", "min_ms"])
    ttft_med = {}
    for n in cfg.tp_ttft_lengths:
        s = summarize(ttft_samples(engine, make_prompt(n, vocab), cfg.ttft_runs, cfg.warmup))
        ttft.add(system, cfg.tp, n, s["median"], s["p99"], s["min"])
        ttft_med[n] = s["median"]
    lat = np.asarray(decode_samples(engine, make_prompt(cfg.decode_prompt, vocab),
                                    cfg.tp_decode_new, cfg.decode_runs), dtype=np.float64)
    dec = summarize(lat.ravel())

    calls = 2 * engine.config.num_layers   # one after attention, one after feed-forward
    # What the engine's own all-reduce costs per call at batch 1 (graph-replayed on GPUs).
    timed = {"symm_mem": "symm_mem_engine"}.get(engine.allreduce, engine.allreduce)
    mine = [t for t in timings if t.rows == 1 and t.method == timed and not t.error]
    per_call = (mine[0].eager_us if engine.device.type != "cuda" else mine[0].graph_us) \
        if mine else float("nan")
    summary = Table("tp", f"Tensor parallelism: {engine.config.name} at TP={cfg.tp} ({system})",
                    ["system", "tp", "rank_weight_bytes", "rank_bytes_per_token",
                     "rank_floor_ms", "decode_ms", "floor_frac", "allreduce_calls_per_token",
                     "allreduce", "allreduce_us", "allreduce_ms_per_token"]
                    + [f"ttft_{n}_ms" for n in cfg.tp_ttft_lengths])
    summary.add(system, cfg.tp, held, read, floor_ms, dec["mean"], floor_frac(dec["mean"], floor_ms),
                calls if cfg.tp > 1 else 0, engine.allreduce, per_call,
                per_call * calls / 1e3 if cfg.tp > 1 else 0.0,
                *[ttft_med[n] for n in cfg.tp_ttft_lengths])
    summary.notes += [
        "rank_weight_bytes: weights one rank holds (embedding and LM head replicated); "
        "rank_bytes_per_token: what one rank reads per decode step; rank_floor_ms = that / "
        "this run's copy bandwidth (rank 0's device).",
        f"allreduce: the engine's all-reduce ({engine.allreduce_reason}); allreduce_us: its "
        "per-call time at batch 1 from tp_allreduce (graph-replayed on GPUs; symm_mem: the "
        "symm_mem_engine row); allreduce_ms_per_token = that x calls per token: the "
        "communication floor added to the rank's floor. Compare methods by rerunning with "
        "--allreduce nccl|symm_mem (this run asked for "
        f"{engine.engine_config.allreduce}).",
        f"decode_ms: mean over {cfg.decode_runs} runs of {cfg.tp_decode_new} tokens after a "
        f"{cfg.decode_prompt}-token prompt."]

    ar = Table("tp_allreduce", f"All-reduce per call at TP={cfg.tp}, [rows, hidden] "
                               f"{engine.engine_config.dtype}",
               ["method", "tp", "rows", "bytes", "eager_us", "graph_us", "error"])
    for t in timings:
        ar.add(t.method, cfg.tp, t.rows, t.nbytes, t.eager_us, t.graph_us, t.error)
    ar.notes.append("NCCL with NCCL_NVLS_ENABLE=0; symmetric memory with "
                    "TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (no NVLink multicast on shared hosts).")
    if not timings:
        ar.notes.append("TP=1: one rank, no all-reduce to time.")
    topo = Table("tp_topology", "Interconnect: nvidia-smi topo -m on this host", ["line", "text"])
    for i, line in enumerate(topology(engine.device.type == "cuda")):
        topo.add(i, line)
    return [summary, ttft, ar, topo]
