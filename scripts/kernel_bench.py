# ruff: noqa: B023  (closures are timed inside the loop iteration that makes them)
"""Time the Triton decode kernels against cuBLAS/PyTorch on this GPU; prints a table last.

    python scripts/kernel_bench.py [--sections floor,gemv,attention,decode,prefill] [--sweep N]

floor:     device-to-device copy bandwidth (the ceiling every decode kernel is held to).
gemv:      each projection of llama-2-7b (fp16) and llama-3.2-1b (bf16): cuBLAS alone,
           cuBLAS + its fused elementwise kernels, and the Triton GEMV with its fused
           prologue/epilogue over a small config sweep; weights rotate through more copies
           than L2 holds, and calls run back to back inside a CUDA graph.
attention: the flash-decoding kernel against the model's PyTorch attention ops.
decode:    a whole decode step (forward only) in a CUDA graph: the compiled PyTorch block
           ("inductor") against the Triton block with each plan, with and without PDL.
prefill:   a one-prompt prefill of --prefill-tokens tokens (default 10: the TTFT target)
           in a CUDA graph: Transformer.prefill with the compiled block ("inductor")
           against TritonDecode.prefill (the prompt as decode rows) with each plan.
Random weights at the presets' real shapes. Writes everything as JSON to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hybridgraph.kernels import attention, gemv, glue  # noqa: E402
from hybridgraph.kernels.workspace import Workspace  # noqa: E402
from hybridgraph.model.config import preset  # noqa: E402

ROWS: list[dict] = []


def row(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def graph_time(fn, calls: int, reps: int = 15) -> float:
    """Median µs per fn() over `reps` replays of a graph holding `calls` back-to-back calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(times)


def floor_section() -> float:
    """TB/s of the copy that sets every floor: the benchmark's own measure (bench/hw.py),
    so kernel_bench's floor_frac and `hybridgraph bench`'s agree."""
    from hybridgraph.bench.hw import copy_bandwidth
    bw = copy_bandwidth(torch.device("cuda")) / 1e12
    row(section="floor", copy_TBps=round(bw, 3))
    return bw


def _shapes(cfg):
    h, d = cfg.hidden_size, cfg.head_dim
    return {"qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h, gemv.EPI_ROPE),
            "wo": (h, cfg.num_heads * d, gemv.EPI_RESID),
            "w13": (2 * cfg.intermediate_size, h, gemv.EPI_SILU),
            "w2": (h, cfg.intermediate_size, gemv.EPI_RESID),
            "head": (cfg.vocab_size, h, gemv.EPI_PLAIN)}


# (half, block_k, split_k, num_warps, num_stages, programs as a multiple of the SM count,
#  dot): tl.dot on tensor cores (rows padded to 16), or the one-row register path. Run 6
#  leads with small register tiles (16 rows a program, 4 warps: scripts/gemv_stream.py
#  streamed fastest that way), then the earlier sweep's winners and the rest.
SWEEP_SPEC = [(8, 256, 1, 4, 1, 0, False), (8, 256, 2, 4, 1, 0, False),
              (8, 256, 4, 4, 1, 0, False), (8, 256, 1, 4, 3, 0, False),
              (8, 256, 2, 4, 3, 0, False), (8, 256, 4, 4, 3, 0, False),
              (8, 512, 2, 4, 1, 0, False), (32, 128, 2, 8, 3, 0, False),
              (32, 128, 4, 8, 3, 0, False), (32, 256, 1, 8, 1, 0, False),
              (16, 512, 1, 8, 1, 0, False), (32, 128, 2, 4, 1, 0, False),
              (32, 256, 1, 4, 3, 0, True), (32, 256, 2, 4, 3, 0, True),
              (32, 256, 4, 4, 3, 0, True), (32, 256, 2, 4, 3, 2, True),
              (64, 128, 2, 8, 3, 0, True),
              (16, 256, 1, 4, 1, 0, False), (16, 256, 2, 4, 1, 0, False),
              (32, 128, 1, 4, 1, 0, False), (64, 64, 1, 4, 1, 0, False),
              (16, 256, 1, 4, 1, 4, False), (16, 256, 4, 4, 1, 0, False)]


# Batched launches (2-16 rows) run on the tensor-core path only: its own sweep. An eighth
# field swaps the product's sides (W @ x^T: Hopper's warpgroup MMA once half >= 64); run 13
# leads with those, then the run-7 rule's two tiles (norm, no norm) unswapped.
SWEEP_SWAP = [(64, 128, 2, 4, 3, 0, True, True), (64, 128, 4, 4, 3, 0, True, True),
              (64, 128, 1, 4, 3, 0, True, True), (64, 64, 2, 4, 4, 0, True, True),
              (64, 64, 4, 4, 4, 0, True, True), (64, 256, 2, 4, 2, 0, True, True),
              (128, 128, 2, 4, 2, 0, True, True), (128, 64, 2, 4, 3, 0, True, True),
              (128, 64, 1, 4, 4, 0, True, True), (64, 128, 2, 8, 3, 0, True, True),
              (64, 128, 2, 4, 3, 0, True, False), (32, 128, 4, 4, 3, 0, True, False)]
SWEEP_DOT = SWEEP_SWAP + [(16, 256, 1, 4, 1, 0, True), (16, 256, 2, 4, 1, 0, True),
             (16, 256, 4, 4, 1, 0, True), (16, 256, 1, 4, 2, 0, True),
             (16, 256, 2, 4, 2, 0, True), (16, 128, 2, 4, 2, 0, True),
             (16, 128, 4, 4, 3, 0, True), (16, 512, 1, 4, 1, 0, True),
             (16, 512, 2, 8, 1, 0, True), (32, 256, 1, 4, 1, 0, True),
             (32, 256, 2, 4, 1, 0, True), (32, 256, 1, 4, 3, 0, True),
             (32, 256, 2, 4, 3, 0, True), (32, 128, 2, 4, 3, 0, True),
             (32, 128, 1, 8, 3, 0, True), (16, 256, 2, 4, 1, 2, True),
             (64, 128, 2, 4, 3, 0, True), (64, 128, 1, 8, 3, 0, True),
             (64, 64, 2, 4, 4, 0, True), (32, 128, 4, 4, 3, 0, True),
             (32, 64, 2, 4, 4, 0, True)]


def sweep_configs(n: int, sms: int, rows: int = 1) -> list[gemv.GemvConfig]:
    spec = SWEEP_SPEC if rows == 1 else SWEEP_DOT
    return [gemv.GemvConfig(half=h, block_k=k, split_k=s, num_warps=w, num_stages=st,
                            programs=p * sms, dot=dot, swap=bool(swap and swap[0]))
            for (h, k, s, w, st, p, dot, *swap) in spec[:n]]


def gemv_section(name: str, dtype: torch.dtype, batches: list[int], sweep: int,
                 deadline: float) -> dict[str, tuple[gemv.GemvConfig, float, float]]:
    """Returns, per projection at one row: (best Triton config, its µs, cuBLAS+fused µs)."""
    tuned: dict[str, tuple[gemv.GemvConfig, float, float]] = {}
    cfg = preset(name)
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ws = Workspace(1 << 24, 1 << 16, "cuda")
    seq = 1024
    kc = torch.randn(16, kv, seq, d, device="cuda").to(dtype)
    vc = torch.randn_like(kc)
    for proj, (n, k, epi) in _shapes(cfg).items():
        nbytes = n * k * dtype.itemsize
        copies = max(2, -(-200_000_000 // nbytes))
        ws_ = [torch.randn(n, k, device="cuda").mul_(k ** -0.5).to(dtype)
               for _ in range(copies)]
        nw = torch.ones(k, device="cuda", dtype=dtype)
        for b in batches:
            x = torch.randn(b, k, device="cuda").to(dtype)
            res = torch.randn(b, n if epi == gemv.EPI_RESID else k, device="cuda").to(dtype)
            pos = torch.full((b,), 100, device="cuda")
            cos = torch.randn(kc.shape[2], d, device="cuda").to(dtype)  # RoPE tables
            sin = torch.randn(kc.shape[2], d, device="cuda").to(dtype)
            q = torch.empty(b, heads * d, device="cuda", dtype=dtype)
            out = torch.empty(b, n // 2 if epi == gemv.EPI_SILU else n, device="cuda",
                              dtype=dtype)
            xn = torch.empty_like(x)
            rope = gemv.RopeArgs(cos, sin, pos, kc, vc, heads, kv)

            def cublas(i):
                return F.linear(x, ws_[i % copies])

            def cublas_fused(i):
                w = ws_[i % copies]
                if epi == gemv.EPI_PLAIN:
                    glue.add_rmsnorm(x, nw, 1e-5, xn)
                    F.linear(xn, w, out=out)
                elif epi == gemv.EPI_ROPE:
                    glue.add_rmsnorm(x, nw, 1e-5, xn)
                    glue.rope_kv(F.linear(xn, w), cos, sin, pos, kc, vc, q, heads, kv)
                elif epi == gemv.EPI_SILU:
                    glue.add_rmsnorm(x, nw, 1e-5, xn)
                    glue.silu_mul(F.linear(xn, w), out)
                else:
                    torch.add(res, F.linear(x, w), out=out)

            def triton_fn(c, pdl=False, norm=True):
                def run(i):
                    w = ws_[i % copies]
                    n_w = nw if norm else None
                    if epi == gemv.EPI_ROPE:
                        gemv.gemv(x, w, q, ws, c, epi=epi, norm_w=n_w, rope=rope, pdl=pdl)
                    elif epi in (gemv.EPI_SILU, gemv.EPI_PLAIN):
                        gemv.gemv(x, w, out, ws, c, epi=epi, norm_w=n_w, pdl=pdl)
                    else:
                        gemv.gemv(x, w, out, ws, c, epi=epi, residual=res, pdl=pdl)
                return run

            calls = 2 * copies
            base = dict(section="gemv", model=name, proj=proj, b=b, MB=round(nbytes / 1e6, 1))
            for label, fn in (("cublas", cublas), ("cublas+fused", cublas_fused)):
                us = graph_time(fn, calls)
                row(**base, kernel=label, us=round(us, 2), TBps=round(nbytes / us / 1e6, 3))
            fused_us = us
            best = None
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            for c in sweep_configs(sweep, sms, b):
                if time.time() > deadline:
                    break
                try:
                    us = graph_time(triton_fn(c), calls)
                except Exception as e:  # a config that does not compile here
                    row(**base, kernel="triton", cfg=list(c), error=str(e)[:200])
                    continue
                row(**base, kernel="triton", cfg=list(c), us=round(us, 2),
                    TBps=round(nbytes / us / 1e6, 3))
                if best is None or us < best[0]:
                    best = (us, c)
            if best is not None:
                us = graph_time(triton_fn(best[1], pdl=True), calls)
                row(**base, kernel="triton+pdl", cfg=list(best[1]), us=round(us, 2),
                    TBps=round(nbytes / us / 1e6, 3))
                if epi != gemv.EPI_RESID:  # what the RMSNorm prologue costs at this tile
                    us = graph_time(triton_fn(best[1], norm=False), calls)
                    row(**base, kernel="triton-nonorm", cfg=list(best[1]), us=round(us, 2),
                        TBps=round(nbytes / us / 1e6, 3))
                if b == 1:
                    tuned[proj] = (best[1], best[0], fused_us)
    return tuned


def attention_section(name: str, dtype: torch.dtype) -> None:
    cfg = preset(name)
    heads, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ws = Workspace(1 << 24, 1 << 16, "cuda")
    seq, b = 4096, 1
    layers = 8
    caches = [(torch.randn(b, kv, seq, d, device="cuda").to(dtype),
               torch.randn(b, kv, seq, d, device="cuda").to(dtype)) for _ in range(layers)]
    q = torch.randn(b, heads * d, device="cuda").to(dtype)
    out = torch.empty_like(q)
    for window in (512, 4096):
        pos = torch.full((b,), window - 1, device="cuda")

        def torch_attn(i):  # the model's decode attention ops, as Attention.decode runs them
            k, v = caches[i % layers]
            qq = q.view(b, kv, heads // kv, d)
            s = torch.matmul(qq, k[:, :, :window].transpose(-1, -2)).float() * d ** -0.5
            vis = torch.arange(window, device="cuda")[None, :] <= pos[:, None]
            s = s.masked_fill(~vis[:, None, None, :], float("-inf"))
            return torch.matmul(torch.softmax(s, -1).to(dtype), v[:, :, :window])

        def triton_attn(i):
            k, v = caches[i % layers]
            attention.decode_attention(q, k, v, pos, window, out, ws)

        nbytes = 2 * b * kv * window * d * dtype.itemsize
        for label, fn in (("torch", torch_attn), ("triton", triton_attn)):
            us = graph_time(fn, 4 * layers)
            row(section="attention", model=name, window=window, kernel=label, us=round(us, 2),
                TBps=round(nbytes / us / 1e6, 3))


def plan_options(opts: list[str]) -> dict:
    """KernelPlan keywords from a plan name's options: pdl | pdl-late (else PDL off), pfN
    (every GEMV prefetches N lines a row), wopfN (the O GEMV prefetches N), attn0 | attn1
    (attention keys per tile), awN (warps an attention program), aspN (attention splits), ffn0 | ffn1 (gate/up and down
    as one launch or two), ekv0 | ekv1 (attention reads earlier keys before its PDL wait,
    one tile a split, or not), pskN (a long prefill's O and down split over K while each
    part keeps >= N of K; 0: never), cfg-PROJ-HALF-SPLIT-WARPS-STAGES-BLOCKK (PROJ's one-row
    register config: e.g. cfg-wo-8-2-4-1-512)."""
    from hybridgraph.kernels.gemv_config import GemvConfig
    pdl = next((o for o in opts if o.startswith("pdl")), "")
    kw: dict = dict(pdl=pdl.startswith("pdl"), pdl_late=pdl == "pdl-late")
    for o in opts:
        if o.startswith("cfg-"):
            proj, half, split, warps, stages, block_k = o.split("-")[1:]
            kw.setdefault("configs", {})[proj] = GemvConfig(
                half=int(half), block_k=int(block_k), split_k=int(split), num_warps=int(warps),
                num_stages=int(stages), dot=False)
        elif o.startswith("pf"):
            kw["prefetch"] = int(o[2:])
        elif o.startswith("wopf"):
            kw["wo_prefetch"] = int(o[4:])
        elif o in ("attn0", "attn1"):
            kw["attn_early"] = o == "attn1"
        elif o.startswith("aw"):
            kw["attn_warps"] = int(o[2:])
        elif o.startswith("bt"):
            kw["block_t"] = int(o[2:])
        elif o.startswith("asp"):
            kw["attn_splits"] = int(o[3:])
        elif o in ("ekv0", "ekv1"):
            kw["early_kv"] = o == "ekv1"
        elif o in ("ffn0", "ffn1"):
            kw["fuse_ffn"] = o == "ffn1"
        elif o.startswith("psk"):
            kw["prefill_split_k"] = int(o[3:])
    return kw


def decode_section(name: str, dtype: torch.dtype, floor_tbps: float, plans: list[str],
                   tuned: dict | None = None, window: int = 512, rows: int = 1) -> None:
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import PROJECTIONS, KernelPlan
    from hybridgraph.model.llama import Block
    from hybridgraph.model.loader import random_model
    from hybridgraph.runtime.step import compiled_blocks

    cfg = preset(name)
    model = random_model(cfg, torch.device("cuda"), dtype)
    model.setup_caches(rows, 2048)
    floor_us = weight_floor_us(model, floor_tbps)
    ids = torch.full((rows,), 5, device="cuda")
    pos = torch.full((rows,), window // 2, device="cuda")
    fns = {}
    for plan in plans:  # "inductor", "eager", or "<proj+proj...|none>[:option]..."
        if plan in ("inductor", "eager"):
            blk = compiled_blocks()[1] if plan == "inductor" else Block.decode
            fns[plan] = lambda i, blk=blk: model.decode(ids, pos, window, block=blk)
        else:
            projs, *opts = plan.split(":")
            tuned = tuned or {}
            if projs == "auto":  # each projection where its best GEMV beat cuBLAS + glue
                gemvs = tuple(p for p, (_, t, c) in tuned.items() if t < c)
            else:
                gemvs = () if projs == "none" else tuple(projs.split("+"))
            configs = {p: tuned[p][0] for p in gemvs if p in tuned}
            if projs == "default":
                gemvs, configs = KernelPlan().gemv, {}
            elif projs == "all":
                gemvs = PROJECTIONS
                configs = {p: tuned[p][0] for p in gemvs if p in tuned}
            # A named set serves every batch size; "default" keeps the plan's batched set.
            batched = {} if projs == "default" else {"gemv_batched": gemvs}
            kw = plan_options(opts)
            configs = {**configs, **kw.pop("configs", {})}
            fast = TritonDecode(model, rows, KernelPlan(gemv=gemvs, configs=configs, **kw,
                                                     **batched))
            print(plan, "->", gemvs, {p: list(c) for p, c in configs.items()}, flush=True)
            fns[plan] = lambda i, fast=fast: fast.forward(ids, pos, window)
    for plan, fn in fns.items():
        with torch.no_grad():
            t0 = time.time()
            us = graph_time(fn, 4)
        row(section="decode", model=name, plan=plan, rows=rows, window=window,
            ms=round(us / 1e3, 4), **floor_fields(floor_us, us), setup_s=round(time.time() - t0, 1))
    model.caches = torch.nn.ModuleList()
    torch.cuda.empty_cache()


def weight_floor_us(model, floor_tbps: float | None) -> float | None:
    """µs to stream the weights a step reads once at floor_tbps (one embedding row unless
    the head is tied to the embedding); None when this run measured no floor."""
    if not floor_tbps:
        return None
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        w = model.tok_embeddings.weight
        wbytes -= w.numel() * w.element_size()
    return wbytes / floor_tbps / 1e6


def floor_fields(floor_us: float | None, us: float) -> dict:
    """A row's floor_ms and floor_frac, or nothing when this run measured no floor."""
    if floor_us is None:
        return {}
    return {"floor_ms": round(floor_us / 1e3, 4), "floor_frac": round(floor_us / us, 3)}


def prefill_section(name: str, dtype: torch.dtype, floor_tbps: float, plans: list[str],
                    tokens: list[int]) -> None:
    """TTFT's forward: one prompt of t tokens into cache row 0, logits of its last token.
    Plans: "inductor" (Transformer.prefill, compiled block, as Steps runs it today) or
    "<default|all|none|proj+proj...>[:option]..." (plan_options) for TritonDecode.prefill, the
    projections on the GEMV for every row count (default: KernelPlan's own); prompts longer
    than the plan's prefill_rows run on glue_prefill, as Steps runs them."""
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.fast_prefill import glue_prefill
    from hybridgraph.model.kernel_plan import PROJECTIONS, KernelPlan
    from hybridgraph.model.loader import random_model
    from hybridgraph.runtime.step import compiled_blocks

    model = random_model(preset(name), torch.device("cuda"), dtype)
    model.setup_caches(1, 2048)
    floor_us = weight_floor_us(model, floor_tbps)
    row0 = torch.zeros(1, dtype=torch.int64, device="cuda")
    fasts = {}
    for plan in plans:
        if plan == "inductor":
            continue
        projs, *opts = plan.split(":")
        kw = plan_options(opts)
        if projs != "default":
            gemvs = PROJECTIONS if projs == "all" else () if projs == "none" else \
                tuple(projs.split("+"))
            kw.update(gemv=gemvs, gemv_batched=gemvs)
        fasts[plan] = TritonDecode(model, 1, KernelPlan(**kw))
    for t in tokens:
        ids = torch.full((1, t), 5, device="cuda")
        last = torch.tensor([t - 1], device="cuda")
        for plan in plans:
            fast = fasts.get(plan)

            def fn(i, fast=fast):
                if fast is None:  # "inductor"
                    return model.prefill(ids, last, block=compiled_blocks()[0], rows=row0)
                if ids.shape[1] > fast.prefill_rows:
                    return glue_prefill(fast, ids, row0, last)
                return fast.prefill(ids[0], row0, last)
            with torch.no_grad():
                t0 = time.time()
                us = graph_time(fn, 4)
            row(section="prefill", model=name, plan=plan, tokens=t, ms=round(us / 1e3, 4),
                **floor_fields(floor_us, us), setup_s=round(time.time() - t0, 1))
    model.caches = torch.nn.ModuleList()
    torch.cuda.empty_cache()


def guarded(fn, *args):
    """Run one section; a failure is printed and the rest still run."""
    try:
        return fn(*args)
    except Exception:
        traceback.print_exc()
        row(section="error", where=f"{fn.__name__}{args[:1]}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="floor,gemv,attention,decode")
    ap.add_argument("--sweep", type=int, default=len(SWEEP_SPEC))
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the gemv sweep")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--models", default="llama-2-7b,llama-3.2-1b", help="decode section")
    ap.add_argument("--decode-rows", default="1", help="decode section: batch rows, e.g. 1,4,16")
    ap.add_argument("--decode-windows", default="512",
                    help="decode section: attention windows (position: half the window)")
    ap.add_argument("--plans", default="inductor,none:pdl,wo+w2,default:pdl,wo+w2:pdl-late,"
                    "auto,auto:pdl-late,all,all:pdl-late")
    ap.add_argument("--prefill-tokens", default="10", help="prefill section: prompt lengths")
    ap.add_argument("--prefill-plans", default="inductor,default:pdl-late,default,"
                    "all:pdl-late,wo+w2+head:pdl-late,none:pdl-late")
    a = ap.parse_args()
    sections = a.sections.split(",")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    # No floor section, no floor: rows then carry no floor fields (none is assumed).
    tbps = guarded(floor_section) if "floor" in sections else None
    from hybridgraph.kernels.selfcheck import check_kernels
    for dtype in (torch.float16, torch.bfloat16):
        t0 = time.time()
        ok = check_kernels(torch.device("cuda"), dtype, True)
        row(section="selfcheck", dtype=str(dtype), result=list(ok),
            seconds=round(time.time() - t0, 2))
    tuned = {}
    if "gemv" in sections:
        deadline = time.time() + a.budget
        batches = [int(x) for x in a.batches.split(",")]
        tuned["llama-2-7b"] = guarded(gemv_section, "llama-2-7b", torch.float16, batches,
                                      a.sweep, deadline)
        tuned["llama-3.2-1b"] = guarded(gemv_section, "llama-3.2-1b", torch.bfloat16, batches,
                                        a.sweep, deadline)
    if "attention" in sections:
        guarded(attention_section, "llama-2-7b", torch.float16)
        guarded(attention_section, "llama-3.2-1b", torch.bfloat16)
    if "decode" in sections:
        for name, dtype in (("llama-2-7b", torch.float16), ("llama-3.2-1b", torch.bfloat16),
                            ("tinyllama-1.1b", torch.bfloat16)):
            if name not in a.models.split(","):
                continue
            for r in (int(x) for x in a.decode_rows.split(",")):
                for w in (int(x) for x in a.decode_windows.split(",")):
                    guarded(decode_section, name, dtype, tbps, a.plans.split(","),
                            tuned.get(name), w, r)
    if "prefill" in sections:
        for name, dtype in (("llama-2-7b", torch.float16), ("llama-3.2-1b", torch.bfloat16)):
            if name in a.models.split(","):
                guarded(prefill_section, name, dtype, tbps, a.prefill_plans.split(","),
                        [int(x) for x in a.prefill_tokens.split(",")])
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernel_bench.json"), "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": ROWS}, f, indent=1)
    print_table()


def floor_text(r: dict) -> str:
    return f"floor {r['floor_ms']:.4f} ({r['floor_frac']:.0%})" if "floor_ms" in r else ""


def print_table() -> None:
    print("\n== summary (" + torch.cuda.get_device_name() + ") ==")
    for r in ROWS:
        if r["section"] == "decode":
            print(f"decode {r['model']:14s} {r['plan']:26s} x{r.get('rows', 1):<2d} {r['ms']:8.4f} ms  " + floor_text(r))
    for r in ROWS:
        if r["section"] == "prefill":
            print(f"prefill {r['model']:13s} {r['plan']:26s} T={r['tokens']:<3d} {r['ms']:8.4f} ms  " + floor_text(r))
    for r in ROWS:
        if r["section"] == "selfcheck":
            print(f"selfcheck {r['dtype']} {r['result']} {r['seconds']} s")
    for r in ROWS:
        if r["section"] == "attention":
            print(f"attn   {r['model']:14s} W={r['window']:5d} {r['kernel']:8s} {r['us']:8.2f} us")
    best: dict = {}
    for r in ROWS:
        if r["section"] == "gemv" and "us" in r:
            key = (r["model"], r["proj"], r["b"], r["kernel"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for key, r in best.items():
        print(f"gemv   {key[0]:14s} {key[1]:4s} b={key[2]:2d} {key[3]:13s} {r['us']:8.2f} us "
              f"{r['TBps']:.2f} TB/s {r.get('cfg', '')}")


if __name__ == "__main__":
    main()
