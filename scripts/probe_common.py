"""What the TTFT probes (ttft_probe, gc_probe, greedy_ttft_probe) share: their common flags
and the engine they measure (the bench's default mode, float16 on CUDA)."""

from __future__ import annotations

import argparse
from typing import Any

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.engine import Engine


def probe_parser(lengths: str, runs: int) -> argparse.ArgumentParser:
    """--model, --lengths (comma-separated prompt lengths) and --runs, with these defaults."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--lengths", default=lengths)
    ap.add_argument("--runs", type=int, default=runs)
    return ap


def probe_engine(model: str, **options: Any) -> Engine:
    """The engine `hybridgraph bench` measures for model (EngineConfig options on top)."""
    cfg = BenchConfig(model=model, device="cuda", dtype="float16")
    return Engines(cfg).get(cfg.default_mode, **options)
