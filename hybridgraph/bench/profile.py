"""`bench profile`: where a decode token's GPU time goes, for the default engine, and where
a prefill's goes.

torch.profiler (CUPTI) records every kernel, those replayed from CUDA graphs too. Two
generations are profiled, `short` and `short + tokens` new tokens from the same prompt;
their difference is exactly `tokens` decode steps, so prefill, the first token and the
host-side set-up cancel out. Kernels are grouped into families by name; the weight-streaming
families (cuBLAS GEMMs and our Triton GEMV) are also shown as achieved GB/s over the
projection weights that a decode step reads, so the next bottleneck is visible without
anyone re-deriving it. A prefill is profiled whole (prompt in, first token out) at the
lengths `profile_prefill_lengths`: long prompts are matmul-bound, so their GEMM family is
also shown as achieved TFLOP/s over the projections' useful work (the prompt's own tokens,
not the bucket's padding), beside the matmul rate measured in the same run. The Triton
GEMV's decode launches are also named by projection (their place in the forward,
`TritonDecode.gemv_launches`), each with the bandwidth it streams its weights at.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import median

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.hw import weight_bytes_per_token
from hybridgraph.bench.table import Table, make_prompt
from hybridgraph.engine import Engine
from hybridgraph.model.llama import Transformer

# (family, substrings of a lower-cased kernel name), first match wins.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("triton gemv", ("gemv_kernel", "ffn_kernel")),
    ("triton attention", ("decode_attention", "attention_kernel", "attn_kernel")),
    ("flash attention", ("flash", "fmha", "efficient_attention", "cudnn")),
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


def kernel_times(engine: Engine, prompt: list[int], new: int,
                 ) -> tuple[dict[str, tuple[int, float]], list[float]]:
    """Kernel name -> (launches, total device µs) over one generation of `new` tokens, and
    the µs of each Triton GEMV launch in launch order (to name them by projection)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompt, new, stop_ids=[])
        torch.cuda.synchronize()
    out: dict[str, tuple[int, float]] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total
        if us > 0:
            out[e.key] = (e.count, us)
    gemv = sorted((e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
                  if e.device_type == DeviceType.CUDA and family(e.name) == "triton gemv")
    return out, [us for _, us in gemv]


def families(kernels: dict[str, tuple[float, float]]) -> dict[str, list[float]]:
    """Family -> [launches, µs], summed over `kernels` (name -> (launches, µs))."""
    fams: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (n, us) in kernels.items():
        f = fams[family(name)]
        f[0] += n
        f[1] += us
    return fams


def per_token(long: dict[str, tuple[int, float]], short: dict[str, tuple[int, float]],
              tokens: int) -> dict[str, tuple[float, float]]:
    """Kernel name -> (launches, µs) per decode token: the long run minus the short one."""
    out = {}
    for name, (n, us) in long.items():
        n0, us0 = short.get(name, (0, 0.0))
        if n > n0:
            out[name] = ((n - n0) / tokens, (us - us0) / tokens)
    return out


def profile_suite(cfg: BenchConfig, engines: Engines, floor_ms: float,
                  matmul_tflops: float) -> list[Table]:
    engine = engines.get(cfg.default_mode)
    prompt = make_prompt(cfg.decode_prompt, engine.config.vocab_size)
    short, tokens = 8, cfg.profile_tokens
    engine.generate(prompt, short + tokens, stop_ids=[])   # warm: every graph and kernel
    (long, long_gemv), (brief, brief_gemv) = (kernel_times(engine, prompt, short + tokens),
                                              kernel_times(engine, prompt, short))
    steps = per_token(long, brief, tokens)
    fams = families(steps)
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
    # The long run is the short one and then `tokens` more decode steps: its GEMV launches
    # past the short run's count are those steps', each step's in the forward's order.
    fast = engine.steps.fast
    proj = projection_table(fast.gemv_launches(1) if fast is not None else [],
                            projection_bytes(engine.model), long_gemv[len(brief_gemv):], tokens)
    # Prompts that fit with their first token (a short test cache caps the long ones).
    lengths = sorted({min(n, cfg.max_seq_len - 1) for n in cfg.profile_prefill_lengths})
    return [t, top, proj, *prefill_profile(engine, lengths, matmul_tflops)]


def projection_bytes(model: Transformer) -> dict[str, int]:
    """Weight bytes one launch of each projection reads (TritonDecode's names)."""
    layer = model.layers[0]
    mods = {"qkv": layer.attention.wqkv, "wo": layer.attention.wo,
            "w13": layer.feed_forward.w13, "w2": layer.feed_forward.w2, "head": model.output}
    nbytes = {n: m.weight.numel() * m.weight.element_size() for n, m in mods.items()}
    return {**nbytes, "w13+w2": nbytes["w13"] + nbytes["w2"]}  # the fused feed-forward


def by_projection(order: list[str], launches_us: list[float], tokens: int,
                  ) -> dict[str, list[float]] | None:
    """Each GEMV launch's µs under its projection: `launches_us` holds `tokens` decode
    steps' launches in time order, each step's in `order`. None where the count disagrees
    (the launches cannot be named by their place)."""
    if not order or len(launches_us) != tokens * len(order):
        return None
    out: dict[str, list[float]] = {p: [] for p in order}
    for i, us in enumerate(launches_us):
        out[order[i % len(order)]].append(us)
    return out


def projection_table(order: list[str], nbytes: dict[str, int], launches_us: list[float],
                     tokens: int) -> Table:
    """Per projection: launches and µs per decode token, the median launch, and the
    bandwidth it streams its weights at (bytes / mean launch time)."""
    t = Table("profile_projections", "Profile: the Triton GEMV per projection, per decode "
                                     "token (weights streamed per launch)",
              ["projection", "launches_per_token", "mb_per_launch", "us_per_launch_median",
               "us_per_token", "gbs", "share"])
    named = by_projection(order, launches_us, tokens)
    if named is None:
        t.notes.append(f"Not named: {len(launches_us)} GEMV launches over {tokens} tokens, "
                       f"the forward's order has {len(order)} (no Triton decode, or another "
                       "plan ran).")
        return t
    total_us = sum(launches_us) / tokens
    total_bytes = 0
    for p, times in named.items():
        n = len(times) / tokens
        us = sum(times) / tokens
        total_bytes += nbytes[p] * n
        t.add(p, n, nbytes[p] / 1e6, median(times), us, nbytes[p] * n / (us * 1e3),
              us / total_us)
    t.add("all", len(order), "", "", total_us, total_bytes / (total_us * 1e3), 1.0)
    t.notes.append("gbs: the weights a token reads through this projection / its GEMV time "
                   "per token (each launch timed alone by CUPTI: a PDL overlap with the "
                   "kernel before counts in both).")
    return t


def prefill_flops(model: Transformer, tokens: int) -> float:
    """Useful matmul FLOPs of a `tokens`-token prefill: every layer's projections for each
    token, the LM head for the last one only (attention's own matmuls left out)."""
    block = sum(m.weight.numel() for layer in model.layers for m in layer.modules()
                if isinstance(m, torch.nn.Linear))
    return 2.0 * (block * tokens + model.output.weight.numel())


def prefill_profile(engine: Engine, lengths: list[int], matmul_tflops: float,
                    ) -> tuple[Table, Table]:
    """Kernel families of one whole prefill (prompt ids in, first token out) per length,
    and the ten costliest kernels of the longest."""
    t = Table("profile_prefill", f"Profile: one prefill on the GPU (hybridgraph {engine.mode}, "
                                 "prompt in, first token out)",
              ["prompt_len", "family", "kernels", "us", "share", "tflops"])
    for n in lengths:
        prompt = make_prompt(n, engine.config.vocab_size)
        engine.generate(prompt, 1, stop_ids=[])          # warm: its graph and kernels
        kernels, _ = kernel_times(engine, prompt, 1)
        fams = families(kernels)
        busy = sum(us for _, us in fams.values())
        gemm_us = sum(fams[f][1] for f in WEIGHT_FAMILIES)
        flops = prefill_flops(engine.model, n)
        for name, (k, us) in sorted(fams.items(), key=lambda kv: -kv[1][1]):
            t.add(n, name, k, us, us / busy if busy else float("nan"), "")
        gemm_k = sum(fams[f][0] for f in WEIGHT_FAMILIES)
        t.add(n, "weight matmuls", gemm_k, gemm_us, gemm_us / busy if busy else float("nan"),
              flops / (gemm_us * 1e6) if gemm_us else float("nan"))
        t.add(n, "all kernels", sum(k for k, _ in fams.values()), busy, 1.0,
              flops / (busy * 1e6) if busy else float("nan"))
        t.notes.append(
            f"{n} tokens: GPU busy {busy / 1e3:.3f} ms; projection matmuls {gemm_us / 1e3:.3f} ms "
            f"= {flops / (gemm_us * 1e6) if gemm_us else float('nan'):.0f} TFLOP/s of useful "
            f"work against {matmul_tflops:.0f} measured for one large matmul "
            f"(the floor: {flops / (matmul_tflops * 1e9):.3f} ms).")
    top = Table("profile_prefill_kernels",
                f"Profile: the ten costliest kernels of a {lengths[-1]}-token prefill",
                ["kernel", "family", "calls", "us", "us_per_call"])
    for name, (k, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:10]:
        top.add(name[:80], family(name), k, us, us / k if k else float("nan"))
    return t, top
