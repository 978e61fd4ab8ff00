# ruff: noqa: B023  (closures are timed inside the loop iteration that makes them)
"""How fast can a Triton kernel stream a weight matrix at one row? (issue 10 experiment)

    python scripts/gemv_stream.py [--models llama-2-7b] [--quick]

The decode projections run at ~2.5 TB/s (docs/KERNELS.md) against the ~2.97 TB/s the card
copies at; the question is whether a different way of loading the weights keeps more bytes
in flight. Each variant computes y = W @ x for one row (no prologue or epilogue, split-K
partials summed with float32 atomics) so only the weight stream differs:

  today     hybridgraph.kernels.gemv at its default config (plain epilogue)
  ptr       pointer loads, products accumulated in registers, `tl.range(num_stages=S)`
            (S > 1 asks Triton to pipeline the loads through shared memory)
  dbuf      pointer loads double-buffered by hand in registers (next block loaded before
            the current one is multiplied)
  tma       host TMA descriptor loads in `tl.range(num_stages=S)`, register products
  tma_dot   host TMA descriptor loads fed to tl.dot with x padded to 16 rows
  cublas    F.linear

Weights rotate through more copies than L2 holds; calls run back to back in a CUDA graph.
Prints one JSON row per measurement and writes them all to $OUT/gemv_stream.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernel_bench import graph_time  # noqa: E402

from hybridgraph.kernels import gemv  # noqa: E402
from hybridgraph.kernels.workspace import Workspace  # noqa: E402
from hybridgraph.model.config import preset  # noqa: E402

ROWS: list[dict] = []


def row(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


@triton.jit
def _finish(y, out_ptr, rows, N, SPLIT: tl.constexpr):
    if SPLIT:
        tl.atomic_add(out_ptr + rows, y, mask=rows < N, sem="relaxed")
    else:
        tl.store(out_ptr + rows, y, mask=rows < N)


@triton.jit
def ptr_kernel(x_ptr, w_ptr, out_ptr, N, K, K_SPLIT,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
               SPLIT: tl.constexpr, DBUF: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_K)
    k0 = tl.program_id(1) * K_SPLIT
    k1 = tl.minimum(k0 + K_SPLIT, K)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + offs[None, :]
    rm = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    if DBUF:
        nxt = tl.load(ptrs + k0, mask=rm[:, None] & ((k0 + offs) < k1)[None, :], other=0.0)
        for k in range(k0, k1, BLOCK_K):
            w = nxt
            kn = k + BLOCK_K
            nxt = tl.load(ptrs + kn, mask=rm[:, None] & ((kn + offs) < k1)[None, :], other=0.0)
            xv = tl.load(x_ptr + k + offs, mask=(k + offs) < k1, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    else:
        for k in tl.range(k0, k1, BLOCK_K, num_stages=STAGES):
            km = (k + offs) < k1
            w = tl.load(ptrs + k, mask=rm[:, None] & km[None, :], other=0.0)
            xv = tl.load(x_ptr + k + offs, mask=km, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    _finish(tl.sum(acc, axis=1), out_ptr, rows, N, SPLIT)


@triton.jit
def tma_kernel(x_ptr, desc, out_ptr, N, K, K_SPLIT,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
               SPLIT: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    rows = n0 + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_K)
    k0 = tl.program_id(1) * K_SPLIT
    k1 = tl.minimum(k0 + K_SPLIT, K)
    if DOT:
        offs_b = tl.arange(0, 16)
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        for k in tl.range(k0, k1, BLOCK_K, num_stages=STAGES):
            w = desc.load([n0, k])
            xt = tl.load(x_ptr + offs_b[:, None] * 0 + (k + offs)[None, :],
                         mask=(offs_b[:, None] == 0) & ((k + offs) < k1)[None, :], other=0.0)
            acc = tl.dot(xt, tl.trans(w), acc)
        y = tl.sum(acc, axis=0)  # rows 1-15 are zero
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k in tl.range(k0, k1, BLOCK_K, num_stages=STAGES):
            w = desc.load([n0, k])
            xv = tl.load(x_ptr + k + offs, mask=(k + offs) < k1, other=0.0)
            acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
    _finish(y, out_ptr, rows, N, SPLIT)


def _split_k(k: int, split: int, block_k: int) -> tuple[int, int]:
    ks = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return ks, triton.cdiv(k, ks)


def variants(quick: bool):
    """(kind, block_n, block_k, stages, split, warps): a few shapes per way of loading."""
    splits = (1, 2, 4) if quick else (1, 2, 4, 8)
    out = []
    for (bn, bk, wp), st, sp in itertools.product(
            ((32, 256, 8), (64, 128, 8), (32, 128, 4), (16, 256, 4)), (1, 3), splits):
        out.append(("ptr", bn, bk, st, sp, wp))
    for (bn, bk, wp), sp in itertools.product(((32, 256, 8), (32, 128, 4), (64, 128, 8)),
                                              splits):
        out.append(("dbuf", bn, bk, 1, sp, wp))
    for (bn, bk, wp), st, sp in itertools.product(
            ((64, 64, 4), (128, 64, 8), (32, 128, 4), (64, 128, 8)), (3, 5), splits):
        out.append(("tma", bn, bk, st, sp, wp))
    for (bn, bk), st, sp in itertools.product(((64, 64), (128, 64), (64, 128)), (4, 6), splits):
        out.append(("tma_dot", bn, bk, st, sp, 4))
    return out


def ablate_shape(model: str, proj: str, n: int, k: int, dtype: torch.dtype) -> None:
    """The production GEMV against the bare `ptr` kernel at the same tile, one piece at a
    time: no prologue/epilogue, + the RMSNorm prologue, + the projection's own epilogue."""
    nbytes = n * k * dtype.itemsize
    copies = max(2, -(-200_000_000 // nbytes))
    weights = [torch.randn(n, k, device="cuda").mul_(k ** -0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").to(dtype)
    nw = torch.ones(k, device="cuda", dtype=dtype)
    out = torch.zeros(n, device="cuda", dtype=torch.float32)
    o16 = torch.empty(1, n, device="cuda", dtype=dtype)
    res = torch.randn(1, n, device="cuda").to(dtype)
    wsp = Workspace(1 << 24, 1 << 16, "cuda")
    calls = 2 * copies
    base = dict(model=model, proj=proj, N=n, K=k, MB=round(nbytes / 1e6, 1))
    epi = {"wo": gemv.EPI_RESID, "w2": gemv.EPI_RESID, "w13": gemv.EPI_SILU}.get(proj)
    for split, st in itertools.product((1, 2, 4), (1, 3)):
        ks, sp = _split_k(k, split, 256)
        grid = (triton.cdiv(n, 16), sp)

        def bare(i):
            ptr_kernel[grid](x, weights[i % copies], out, n, k, ks, BLOCK_N=16, BLOCK_K=256,
                             STAGES=st, SPLIT=sp > 1, DBUF=False, num_warps=4, num_stages=st)
        cfg = gemv.GemvConfig(half=8, block_k=256, split_k=split, num_warps=4, num_stages=st,
                              prefetch=0, dot=False)
        fns = {"bare": bare,
               "prod_plain": lambda i: gemv.gemv(x, weights[i % copies], o16, wsp, cfg),
               "prod_norm": lambda i: gemv.gemv(x, weights[i % copies], o16, wsp, cfg,
                                                norm_w=nw)}
        if epi == gemv.EPI_RESID:
            fns["prod_resid"] = lambda i: gemv.gemv(x, weights[i % copies], o16, wsp, cfg,
                                                    epi=epi, residual=res)
        if epi == gemv.EPI_SILU:
            h = torch.empty(1, n // 2, device="cuda", dtype=dtype)
            fns["prod_silu_norm"] = lambda i: gemv.gemv(x, weights[i % copies], h, wsp, cfg,
                                                        epi=epi, norm_w=nw)
        for kind, fn in fns.items():
            try:
                us = graph_time(fn, calls)
            except Exception as e:
                row(**base, kind=kind, split=split, stages=st, error=str(e)[:160])
                continue
            row(**base, kind=kind, split=split, stages=st, us=round(us, 2),
                TBps=round(nbytes / us / 1e6, 3))
    torch.cuda.empty_cache()


def shapes(name: str) -> dict[str, tuple[int, int]]:
    c = preset(name)
    h, d = c.hidden_size, c.head_dim
    return {"qkv": ((c.num_heads + 2 * c.num_kv_heads) * d, h), "wo": (h, c.num_heads * d),
            "w13": (2 * c.intermediate_size, h), "w2": (h, c.intermediate_size)}


def bench_shape(model: str, proj: str, n: int, k: int, dtype: torch.dtype, quick: bool,
                ) -> None:
    nbytes = n * k * dtype.itemsize
    copies = max(2, -(-200_000_000 // nbytes))
    weights = [torch.randn(n, k, device="cuda").mul_(k ** -0.5).to(dtype) for _ in range(copies)]
    x = torch.randn(1, k, device="cuda").to(dtype)
    out = torch.zeros(n, device="cuda", dtype=torch.float32)
    ref = F.linear(x.float(), weights[0].float())[0]
    calls = 2 * copies
    base = dict(model=model, proj=proj, N=n, K=k, MB=round(nbytes / 1e6, 1))

    def rec(kind, us, **kw):
        row(**base, kind=kind, us=round(us, 2), TBps=round(nbytes / us / 1e6, 3), **kw)

    rec("cublas", graph_time(lambda i: F.linear(x, weights[i % copies]), calls))
    wsp = Workspace(1 << 24, 1 << 16, "cuda")
    o16 = torch.empty(1, n, device="cuda", dtype=dtype)
    cfg = gemv.default_config(n, k)
    rec("today", graph_time(lambda i: gemv.gemv(x, weights[i % copies], o16, wsp, cfg),
                            calls),
        cfg=list(cfg))
    descs: dict = {}
    for kind, bn, bk, st, sp, wp in variants(quick):
        ks, split = _split_k(k, sp, bk)
        grid = (triton.cdiv(n, bn), split)
        if kind in ("ptr", "dbuf"):
            def call(i):
                ptr_kernel[grid](x, weights[i % copies], out, n, k, ks, BLOCK_N=bn, BLOCK_K=bk,
                                 STAGES=st, SPLIT=split > 1, DBUF=kind == "dbuf",
                                 num_warps=wp,
                                 num_stages=st)
        else:
            from triton.tools.tensor_descriptor import TensorDescriptor
            key = (bn, bk)
            if key not in descs:
                descs[key] = [TensorDescriptor.from_tensor(w, [bn, bk]) for w in weights]
            ds = descs[key]

            def call(i):
                tma_kernel[grid](x, ds[i % copies], out, n, k, ks, BLOCK_N=bn, BLOCK_K=bk,
                                 STAGES=st, SPLIT=split > 1, DOT=kind == "tma_dot", num_warps=wp,
                                 num_stages=st)
        cfgd = dict(bn=bn, bk=bk, stages=st, split=split, warps=wp, grid=grid[0] * grid[1])
        try:
            out.zero_()  # split partials add up into it; inside the timed graph they just pile up
            call(0)
            torch.cuda.synchronize()
            err = ((out - ref).norm() / ref.norm()).item()
            us = graph_time(call, calls)
        except Exception as e:  # a variant this Triton cannot build
            row(**base, kind=kind, **cfgd, error=f"{type(e).__name__}: {str(e)[:160]}")
            continue
        rec(kind, us, rel_err=round(err, 5), **cfgd)
    descs.clear()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama-2-7b")
    ap.add_argument("--projs", default="qkv,wo,w13,w2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="production GEMV piece by piece")
    a = ap.parse_args()
    row(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    for model in a.models.split(","):
        dtype = torch.float16 if "llama-2" in model else torch.bfloat16
        for proj, (n, k) in shapes(model).items():
            if proj in a.projs.split(","):
                try:
                    if a.ablate:
                        ablate_shape(model, proj, n, k, dtype)
                    else:
                        bench_shape(model, proj, n, k, dtype, a.quick)
                except Exception:
                    traceback.print_exc()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gemv_stream.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    best: dict = {}
    for r in ROWS:
        if "us" in r:
            key = (r["model"], r["proj"], r["kind"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print("\nbest per (model, projection, kind):")
    for (m, p, kd), r in sorted(best.items()):
        extra = {k: r[k] for k in ("bn", "bk", "stages", "split", "warps", "cfg") if k in r}
        print(f"{m:12s} {p:5s} {kd:8s} {r['us']:8.2f} us {r['TBps']:.3f} TB/s {extra}")


if __name__ == "__main__":
    main()
