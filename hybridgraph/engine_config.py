"""EngineConfig: every option of an Engine in one typed, validated value.

The CLI (generate, serve), the server's `serve_main` and the benchmarks all build engines
from it; `add_args` is the one place its command-line flags are defined and `from_args`
the one place they are read back. No torch import here: the CLI's parser is built without
loading torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from hybridgraph.runtime.modes import (
    BACKENDS,
    CAPTURE_MODES,
    KERNEL_CHOICES,
    MODES,
    auto_kernels,
    auto_mode,
    mode_spec,
)

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Tensor-parallel all-reduce (parallel/group.py choose_allreduce): auto is our one-shot
# Triton kernel over symmetric memory (kernels/oneshot.py: one launch a call, fp16, bf16
# and fp32 alike, the residual add fused on the Triton decode) at 2-4 ranks where it works
# on this host, else NCCL; symm_mem asks for it by name; CPU ranks always sum over gloo.
ALLREDUCE_CHOICES = ("auto", "nccl", "symm_mem")


@dataclass(frozen=True)
class EngineConfig:
    mode: str = "auto"                 # auto: hybrid on CUDA, eager elsewhere
    backend: str = "compile"           # JIT backend of the dynamic ops (jit, hybrid)
    max_batch: int = 1
    max_seq_len: int | None = None     # KV cache positions; None: the model's context limit,
                                       # capped by free memory (model.kv_budget)
    coverage: str = "pow2-fine"        # prefill lengths that get graphs (graphs.parse_coverage)
    capture: str = "ahead"             # when graphs are captured (runtime.modes.CAPTURE_POLICIES)
    max_graphs: int | None = None
    # Graph memory budget in bytes. None: in graph modes, a fraction of the GPU memory free
    # once weights and KV cache are in (runtime.runner.GRAPH_MEMORY_FRACTION).
    max_graph_bytes: int | None = None
    shared_pool: bool = True           # all graphs capture into one memory pool
    # Decode kernels (runtime.modes.KERNEL_CHOICES): auto is the Triton kernels where they
    # were measured faster (hybrid on sm_90+) and pass their self-check, else Inductor.
    kernels: str = "auto"
    pdl: bool = True                   # Triton kernels: programmatic dependent launch (sm_90+)
    progress: bool = False             # a progress bar while capturing ahead
    # Only Engine.load reads these three: where the weights go, and random presets' seed.
    device: str = "auto"               # auto: cuda if present, else cpu
    dtype: str = "auto"                # auto: the checkpoint's dtype on CUDA, float32 elsewhere
    weights_seed: int = 0
    # issue 11, read by Engine.load too: a tokenizer.json instead of the model's own, and a
    # chat template (a file or the template text) instead of the model's.
    tokenizer: str | None = None
    chat_template: str | None = None
    # Tensor-parallel ranks, one process (and GPU) each: hybridgraph/parallel. Engine.load
    # builds one-rank engines only; parallel.load_engine builds a rank's share.
    tp: int = 1
    allreduce: str = "auto"            # ALLREDUCE_CHOICES; read only with tp > 1

    def __post_init__(self) -> None:
        if self.mode != "auto":
            mode_spec(self.mode)  # raises, naming the choices
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown dynamic backend {self.backend!r}; choose from {BACKENDS}")
        if self.capture not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {self.capture!r}; "
                             f"choose from {CAPTURE_MODES}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"unknown kernels {self.kernels!r}; choose from {KERNEL_CHOICES}")
        if self.allreduce not in ALLREDUCE_CHOICES:
            raise ValueError(f"unknown allreduce {self.allreduce!r}; choose from "
                             f"{', '.join(ALLREDUCE_CHOICES)}")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
        _check_int("max_batch", self.max_batch, 1)
        _check_int("tp", self.tp, 1)
        _check_int("max_seq_len", self.max_seq_len, 2, optional=True)
        _check_int("max_graphs", self.max_graphs, 1, optional=True)
        _check_int("max_graph_bytes", self.max_graph_bytes, 1, optional=True)

    def kernels_on(self, device: torch.device) -> str:
        """`kernels` for this config's mode on device, "auto" resolved (modes.auto_kernels)."""
        if self.kernels != "auto":
            return self.kernels
        import torch
        spec = mode_spec(auto_mode(device.type) if self.mode == "auto" else self.mode)
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        return auto_kernels(spec, device.type, cap)

    def start_kernel_check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Where an engine of this config will ask for the Triton kernels on device, start
        their self-check now, on a thread (Engine.load, before the weights load): on a
        fresh machine its compiles overlap the load instead of following it."""
        import torch
        if device.type == "cuda" and torch.cuda.is_available() \
                and self.kernels_on(device) == "triton":
            from hybridgraph.model.kernel_plan import KernelPlan, check_soon
            check_soon(device, dtype, KernelPlan(pdl=self.pdl))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The config from a namespace parsed with `add_args` (fields it lacks keep their
        defaults); `overrides` win over both."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **overrides})

    @staticmethod
    def add_args(p: argparse.ArgumentParser) -> None:
        """The engine's command-line flags (every field but progress and weights_seed)."""
        p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
        p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES])
        p.add_argument("--mode", default="auto", choices=["auto", *MODES],
                       help="auto: hybrid on CUDA, eager on CPU")
        p.add_argument("--backend", default="compile", choices=list(BACKENDS),
                       help="JIT backend of the dynamic ops in jit/hybrid modes")
        p.add_argument("--max-seq-len", type=int, default=None,
                       help="KV cache length (default: the model's context limit, capped by "
                            "free memory)")
        p.add_argument("--max-batch", type=int, default=1,
                       help="KV-cache rows; serve batches up to this many requests at once "
                            "(continuous batching; 1: one at a time)")
        p.add_argument("--coverage", default="pow2-fine",
                       help="prefill graphs: exact | every:N | pow2 | pow2-fine (powers of two "
                            "and, from 384 tokens, their midpoints) | a,b,c")
        p.add_argument("--capture", default="ahead", choices=list(CAPTURE_MODES))
        p.add_argument("--kernels", default="auto", choices=list(KERNEL_CHOICES),
                       help="decode kernels: auto (Triton where measured faster and its "
                            "self-check passes, else Inductor), inductor, triton")
        p.add_argument("--no-pdl", dest="pdl", action="store_false",
                       help="Triton kernels without programmatic dependent launch")
        p.add_argument("--max-graphs", type=int, default=None)
        p.add_argument("--tokenizer", default=None,
                       help="a tokenizer.json to use instead of the model's own")
        p.add_argument("--chat-template", default=None,
                       help="a chat template (a .jinja file or the template text) instead of "
                            "the model's")
        p.add_argument("--max-graph-bytes", type=int, default=None,
                       help="graph memory budget (default: half the GPU memory free after "
                            "the weights and KV cache)")
        p.add_argument("--tp", type=int, default=1,
                       help="tensor-parallel ranks: N processes, one GPU each (gloo on CPU); "
                            "started here, or under torchrun with --nproc-per-node N")
        p.add_argument("--allreduce", default="auto", choices=list(ALLREDUCE_CHOICES),
                       help="tp > 1 on GPUs: auto (at 2-4 ranks the one-shot Triton kernel over "
                            "symmetric memory, any dtype, where this host supports it; NCCL "
                            "otherwise, beyond 4 ranks and for messages over its buffer), nccl, "
                            "symm_mem (the kernel at any rank count)")


def _check_int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
