"""`hybridgraph bench <suite>`: runs suites, then writes CSVs, plots and SUMMARY.md.

Suites: ttft, decode, p99, ablation, profile, coverage, ipc, batch, cost, peers, or all;
and, only when named, tp (tensor parallelism, bench/tp.py: the only suite that runs with
--tp N > 1) and serve (concurrent clients through a server, batching on and off).
Suites that start child processes (cost, peers, ipc) run before the parent loads the
model, so each child finds the GPU empty; a suite that fails is recorded and the run
goes on (exit status 1 at the end).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from hybridgraph.bench import hw
from hybridgraph.bench.capacity import batch_suite, cost_suite, coverage_suite
from hybridgraph.bench.config import BenchConfig, from_args
from hybridgraph.bench.engines import Engines, free_memory
from hybridgraph.bench.ipc_suite import SuiteUnavailable, ipc_suite
from hybridgraph.bench.latency import ablation_suite, decode_suite, p99_suite, ttft_suite
from hybridgraph.bench.peers import peers_suite
from hybridgraph.bench.profile import profile_suite
from hybridgraph.bench.report import write_all
from hybridgraph.bench.serve_suite import serve_suite
from hybridgraph.bench.table import Results, Table
from hybridgraph.bench.tp import tp_suite
from hybridgraph.engine import DTYPES
from hybridgraph.model.config import PRESETS, ModelConfig, preset

log = logging.getLogger(__name__)

# Run order: child-process suites first (see the module docstring).
SUITES = ("cost", "peers", "ipc", "serve", "ttft", "decode", "p99", "profile", "ablation",
          "batch", "coverage", "tp")
# Not in `all`: tp needs --tp N; serve starts two servers and loads them with up to 64
# clients.
ALL = tuple(s for s in SUITES if s not in ("tp", "serve"))


def tp_refusal(names: list[str], tp: int) -> str | None:
    """Why these suites can't run at this --tp (None: they can)."""
    if tp != 1 and names != ["tp"]:
        return (f"with --tp {tp} only the tp suite runs (`bench tp --tp N`); the others build "
                "several one-rank engines")
    return None


def model_config(model: str) -> ModelConfig:
    return preset(model) if model in PRESETS else ModelConfig.from_json(Path(model) / "config.json")


def default_out(cfg: BenchConfig, meta: dict) -> Path:
    name = hw.slug(Path(cfg.model).name) + (f"-tp{cfg.tp}" if cfg.tp != 1 else "") + (
        "-quick" if cfg.quick else "")
    return Path("benchmarks") / "results" / meta["device_slug"] / name


def _suite_fns(cfg: BenchConfig, engines: Engines, floor_ms: float,
               copy_bandwidth_gbs: float, matmul_tflops: float,
               ) -> dict[str, Callable[[], list[Table]]]:
    return {
        "ttft": lambda: ttft_suite(cfg, engines),
        "decode": lambda: decode_suite(cfg, engines, floor_ms),
        "p99": lambda: p99_suite(cfg, engines),
        "ablation": lambda: ablation_suite(cfg, engines, floor_ms),
        "profile": lambda: profile_suite(cfg, engines, floor_ms, matmul_tflops),
        "coverage": lambda: coverage_suite(cfg, engines),
        "ipc": lambda: ipc_suite(cfg),
        "batch": lambda: batch_suite(cfg, engines, floor_ms),
        "cost": lambda: cost_suite(cfg),
        "peers": lambda: peers_suite(cfg, floor_ms),
        "tp": lambda: tp_suite(cfg, copy_bandwidth_gbs),
        "serve": lambda: serve_suite(cfg),
    }


def run_suites(cfg: BenchConfig, names: list[str], res: Results) -> tuple[dict[str, float],
                                                                         dict[str, str]]:
    """Run `names` in SUITES order into res; returns (seconds per suite, failures)."""
    engines = Engines(cfg)
    fns = _suite_fns(cfg, engines, res.meta["decode_floor_ms"], res.meta["copy_bandwidth_gbs"],
                     res.meta["matmul_tflops"])
    timings: dict[str, float] = {}
    failures: dict[str, str] = {}
    if not cfg.is_cuda and ("ablation" in names or "batch" in names or "cost" in names):
        res.skipped["graph and hybrid modes"] = (
            "they replay CUDA graphs and this run has no CUDA device; ablation, batch and cost "
            "ran eager and jit only")
    for name in [s for s in SUITES if s in names]:
        if name in ("coverage", "profile") and not cfg.is_cuda:
            res.skipped[name] = ("needs CUDA (graphs, kernel traces); this run has no CUDA "
                                 "device")
            continue
        t0 = time.perf_counter()
        try:
            res.add(*fns[name]())
        except SuiteUnavailable as e:
            res.skipped[name] = str(e)
        except Exception as e:  # one broken suite must not lose a long run's other results
            log.error("suite %s failed:\n%s", name, traceback.format_exc())
            failures[name] = f"{type(e).__name__}: {e}"
            res.skipped[name] = f"FAILED: {type(e).__name__}: {e}"
        timings[name] = time.perf_counter() - t0
        print(f"[bench] {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)
    engines.close()
    return timings, failures


def bench_main(args: argparse.Namespace) -> int:
    names = list(ALL) if args.suite == "all" else args.suite.split(",")
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"error: unknown suite {', '.join(unknown)}; choose from all, {', '.join(SUITES)} "
              "(several: comma-separated)", file=sys.stderr)
        return 2
    cfg = from_args(args)
    refusal = tp_refusal(names, cfg.tp)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if cfg.is_cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    meta = hw.collect(device, dtype, model_config(cfg.model))
    meta.update(modes=", ".join(cfg.modes), quick=cfg.quick, tp=cfg.tp)
    free_memory()
    print(f"[bench] {meta['device']}: copy {meta['copy_bandwidth_gbs']:.1f} GB/s, matmul "
          f"{meta['matmul_tflops']:.2f} TFLOP/s; decode floor {meta['decode_floor_ms']:.3g} "
          f"ms/token", file=sys.stderr, flush=True)
    res = Results(meta)
    timings, failures = run_suites(cfg, names, res)
    timings["total"] = time.perf_counter() - t_start
    out = Path(args.out) if args.out else default_out(cfg, meta)
    files = write_all(res, out, timings)
    print(f"[bench] wrote {len(files)} files to {out} in {timings['total']:.1f} s",
          file=sys.stderr)
    print((out / "SUMMARY.md").read_text())
    if failures:
        print(f"error: suites failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
