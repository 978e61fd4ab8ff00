"""`bench profile`: where a decode token's GPU time goes, for the default engine.

torch.profiler (CUPTI) records every kernel, those replayed from CUDA graphs too. Two
generations are profiled, `short` and `short + tokens` new tokens from the same prompt;
their difference is exactly `tokens` decode steps, so prefill, the first token and the
host-side set-up cancel out. Kernels are grouped into families by name; the weight-streaming
families (cuBLAS GEMMs and our Triton GEMV) are also shown as achieved GB/s over the
projection weights that a decode step reads, so the next bottleneck is visible without
anyone re-deriving it.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.hw import weight_bytes_per_token
from hybridgraph.bench.table import Table, make_prompt
from hybridgraph.engine import Engine

# (family, substrings of a lower-cased kernel name), first match wins.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("triton gemv", ("gemv_kernel",)),
    ("triton attention", ("decode_attention", "attention_kernel", "attn_kernel")),
    ("triton glue", ("add_rmsnorm", "rope_kv", "silu_mul")),
    ("cublas gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "gemv2")),
    ("inductor fused", ("triton_",)),
    ("copy/set", ("memcpy", "memset", "copy")),
    ("sampling", ("sort", "topk", "cumsum", "philox", "argmax", "multinomial")),
)
WEIGHT_FAMILIES = ("triton gemv", "cublas gemm")


def family(kernel_name: str) -> str:
    name = kernel_name.lower()
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other aten"


def kernel_times(engine: Engine, prompt: list[int], new: int) -> dict[str, tuple[int, float]]:
    """Kernel name -> (launches, total device µs) over one generation of `new` tokens."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompt, new, stop_ids=[])
        torch.cuda.synchronize()
    out: dict[str, tuple[int, float]] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            out[e.key] = (e.count, us)
    return out


def per_token(long: dict[str, tuple[int, float]], short: dict[str, tuple[int, float]],
              tokens: int) -> dict[str, tuple[float, float]]:
    """Kernel name -> (launches, µs) per decode token: the long run minus the short one."""
    out = {}
    for name, (n, us) in long.items():
        n0, us0 = short.get(name, (0, 0.0))
        if n > n0:
            out[name] = ((n - n0) / tokens, (us - us0) / tokens)
    return out


def profile_suite(cfg: BenchConfig, engines: Engines, floor_ms: float) -> list[Table]:
    engine = engines.get(cfg.default_mode)
    prompt = make_prompt(cfg.decode_prompt, engine.config.vocab_size)
    short, tokens = 8, cfg.profile_tokens
    engine.generate(prompt, short + tokens, stop_ids=[])   # warm: every graph and kernel
    steps = per_token(kernel_times(engine, prompt, short + tokens),
                      kernel_times(engine, prompt, short), tokens)
    fams: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (n, us) in steps.items():
        f = fams[family(name)]
        f[0] += n
        f[1] += us
    busy = sum(us for _, us in fams.values())
    kernels = sum(n for n, _ in fams.values())
    stats = engine.stats()
    t = Table("profile", f"Profile: one decode token on the GPU (hybridgraph {engine.mode}, "
                         f"kernels {stats['kernels']}, {tokens} tokens profiled)",
              ["family", "kernels_per_token", "us_per_token", "share"])
    for name, (n, us) in sorted(fams.items(), key=lambda kv: -kv[1][1]):
        t.add(name, n, us, us / busy if busy else float("nan"))
    t.add("all kernels", kernels, busy, 1.0)
    layers = engine.config.num_layers
    weights = weight_bytes_per_token(engine.config, engine.dtype)
    stream_us = sum(fams[f][1] for f in WEIGHT_FAMILIES if f in fams)
    t.notes.append(
        f"{kernels:.0f} kernels per token ({kernels / layers:.1f} per layer over {layers} "
        f"layers); GPU busy {busy / 1e3:.3f} ms per token against a {floor_ms:.3g} ms floor. "
        f"Weight streaming (cuBLAS GEMMs + Triton GEMV) {stream_us / 1e3:.3f} ms per token: "
        f"{weights / (stream_us * 1e3) if stream_us else float('nan'):.0f} GB/s over the "
        f"{weights / 1e9:.2f} GB of weights a token reads. kernels_reason: "
        f"{stats['kernels_reason']}.")
    top = Table("profile_kernels", "Profile: the ten costliest kernels per decode token",
                ["kernel", "family", "calls_per_token", "us_per_token", "us_per_call"])
    for name, (n, us) in sorted(steps.items(), key=lambda kv: -kv[1][1])[:10]:
        top.add(name[:80], family(name), n, us, us / n if n else float("nan"))
    return [t, top]
