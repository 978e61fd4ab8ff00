"""How much each suite measures: a full GPU run, or `--quick` (tiny model on the CPU).

Full defaults keep `bench all` for llama-2-7b under about 8 minutes on one H100; the
biggest items are the peers (a compile), the cost children and the exact coverage.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from hybridgraph.engine_config import ALLREDUCE_CHOICES, EngineConfig
from hybridgraph.runtime.modes import MODE_SPECS, auto_mode


@dataclass
class BenchConfig:
    model: str = "llama-2-7b"
    device: str = "cuda"
    dtype: str = "float16"
    quick: bool = False
    max_seq_len: int = 512                 # room for a 500-token prompt and 10 + 397 decode
    ttft_lengths: list[int] = field(default_factory=lambda: [10] + list(range(50, 501, 50)))
    ttft_runs: int = 20
    ttft_spaced_lengths: list[int] = field(default_factory=lambda: [10, 500])
    ttft_gap_s: float = 0.2                # GPU idle before each spaced prompt
    warmup: int = 3
    decode_prompt: int = 10
    decode_new: int = 397
    decode_runs: int = 5
    decode_ranges: list[tuple[int, int]] = field(default_factory=lambda: [
        (10, 50), (51, 100), (101, 200), (201, 300), (301, 400), (401, 407)])
    p99_lengths: list[int] = field(default_factory=lambda: [10, 100, 250, 500])
    p99_runs: int = 100
    ablation_lengths: list[int] = field(default_factory=lambda: [10, 100, 250, 500])
    ablation_decode_runs: int = 3
    coverage_strategies: list[str] = field(default_factory=lambda: ["exact", "every:10", "pow2",
                                                                        "pow2-fine"])
    coverage_max_len: int = 500
    coverage_runs: int = 1                 # timed runs per length, after one untimed
    pool_strategy: str = "every:10"        # shared pool vs one pool per graph
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    batch_prompt: int = 32
    batch_new: int = 32
    batch_runs: int = 3
    batch_max_seq_len: int = 128
    peer_runs: int = 10
    peer_decode_runs: int = 2
    ipc_requests: int = 1000
    profile_tokens: int = 32               # decode tokens under the profiler
    profile_prefill_lengths: list[int] = field(default_factory=lambda: [10, 256, 500])
    serve_clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    serve_requests: int = 2                # per client, one after another...
    serve_min_requests: int = 16           # ...and at least this many in all (TTFT samples)
    serve_mix: list[tuple[int, int]] = field(default_factory=lambda: [
        (32, 128), (128, 64), (16, 192), (64, 128)])   # (prompt, new tokens), cycled
    serve_max_seq_len: int = 256
    # Batching on: this many rows. At most 16: the Triton decode kernels serve up to 16
    # rows, and a larger engine decodes every batch, a lone request's too, without them.
    serve_max_batch: int = 16
    modes: list[str] = field(default_factory=list)
    tp: int = 1                            # tensor-parallel ranks (the tp suite)
    allreduce: str = "auto"                # the TP engine's all-reduce (EngineConfig.allreduce)
    tp_ttft_lengths: list[int] = field(default_factory=lambda: [10, 500])
    tp_decode_new: int = 397
    tp_rows: list[int] = field(default_factory=lambda: [1, 8, 64])  # all-reduce [rows, hidden]

    @property
    def default_mode(self) -> str:
        """The mode `--mode auto` picks on this run's device."""
        return auto_mode("cuda" if self.is_cuda else "cpu")

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def engine_config(self, mode: str, **options: object) -> EngineConfig:
        """The config of an engine this run builds: its device, dtype and max_seq_len unless
        `options` say otherwise, with a capture progress bar."""
        base = {"max_seq_len": self.max_seq_len, "progress": True, **options}
        return EngineConfig(mode=mode, device=self.device, dtype=self.dtype, **base)


def from_args(args: argparse.Namespace) -> BenchConfig:
    device = getattr(args, "device", "auto") or "auto"
    if args.quick:
        # Tiny model, CPU, float32, few runs: a smoke run of every suite in ~1-2 minutes.
        cfg = BenchConfig(model="tiny", device="cpu", dtype="float32", quick=True,
                          ttft_lengths=[10, 50, 100], ttft_runs=5, warmup=1, decode_runs=2,
                          ttft_spaced_lengths=[10, 100], ttft_gap_s=0.05,
                          p99_lengths=[10, 100], p99_runs=100, ablation_lengths=[10, 100],
                          ablation_decode_runs=2,
                          coverage_strategies=["every:10", "pow2"], coverage_max_len=64,
                          coverage_runs=1, batch_sizes=[1, 4], batch_runs=2, peer_runs=3,
                          peer_decode_runs=1, ipc_requests=200, tp_ttft_lengths=[10, 100],
                          tp_decode_new=16, serve_clients=[1, 4], serve_requests=2,
                          serve_min_requests=4, serve_max_batch=4, serve_mix=[(8, 12), (20, 6)],
                          serve_max_seq_len=64)
    else:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = args.dtype if device.startswith("cuda") or args.dtype == "float32" else "float32"
        cfg = BenchConfig(model=args.model, device=device, dtype=dtype)
    if args.runs is not None:
        cfg.ttft_runs = args.runs
    cfg.tp = getattr(args, "tp", 1)
    cfg.allreduce = getattr(args, "allreduce", "auto")
    if cfg.allreduce not in ALLREDUCE_CHOICES:
        raise ValueError(f"--allreduce {cfg.allreduce!r}: choose from "
                         f"{', '.join(ALLREDUCE_CHOICES)}")
    cuda = cfg.device.startswith("cuda")
    # Modes that replay CUDA graphs exist only where CUDA does.
    cfg.modes = [name for name, spec in MODE_SPECS.items() if cuda or not spec.needs_cuda]
    return cfg
