"""Fused elementwise kernels around a library (cuBLAS) projection.

Used where a projection stays on cuBLAS (gemv.py fuses the same work into its own
prologue/epilogue): each replaces a chain of PyTorch kernels by one launch.
  add_rmsnorm   x + residual and RMSNorm of the sum, both written (one read of each row);
                x may be the parts of a product split over K, summed first
  rope_kv       split q/k/v, RoPE on q and k, k and v written into the cache at pos[b]
  silu_mul      silu(gate) * up of the fused gate/up output
Roundings follow the model's PyTorch code, as in gemv.py. PDL here is just Triton's two
builtins (let the next kernel launch, wait for the previous one) at the top of each kernel;
gemv.py's preamble adds the L2 weight prefetch and the late trigger, so it shares nothing
worth a helper with these.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.attention import check_cache_rows, check_rope_tables
from hybridgraph.kernels.launch import launch


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, sum_ptr, out_ptr, N, eps, stride_part,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                        PARTS: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * N + offs, mask=mask, other=0.0)
    if PARTS > 1:
        # x is one product split over K: its parts summed in order in float32, the sum
        # rounded once to the model dtype.
        acc = x.to(tl.float32)
        for j in tl.static_range(1, PARTS):
            acc += tl.load(x_ptr + j * stride_part + row * N + offs, mask=mask, other=0.0)
        x = acc.to(out_ptr.dtype.element_ty)
    if HAS_RES:
        x = x + tl.load(res_ptr + row * N + offs, mask=mask, other=0.0)
        tl.store(sum_ptr + row * N + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (w.to(tl.float32) * (xf * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
    tl.store(out_ptr + row * N + offs, y, mask=mask)


def add_rmsnorm(x: Tensor, weight: Tensor, eps: float, out: Tensor,
                residual: Tensor | None = None, sum_out: Tensor | None = None,
                pdl: bool = False) -> Tensor:
    """out = rmsnorm(x + residual); sum_out receives x + residual. Rows: x.shape[-2].

    x may be [S, B, N]: S parts of one product split over K (model/fast_prefill.py), summed
    here in float32 and rounded to out's dtype before the residual add."""
    b, n = x.shape[-2:]
    parts = x.shape[0] if x.dim() == 3 else 1
    if residual is not None and sum_out is None:
        raise ValueError("add_rmsnorm: a residual needs sum_out for the sum")
    if x.stride(-1) != 1 or x.stride(-2) != n:
        raise ValueError(f"add_rmsnorm: x's rows must be contiguous, strides {x.stride()}")
    extra = {"launch_pdl": True} if pdl else {}
    launch(
        _add_rmsnorm_kernel, (b,), x, residual if residual is not None else x, weight,
        sum_out if sum_out is not None else out, out, n, eps, x.stride(0) if parts > 1 else 0,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), USE_PDL=pdl,
        PARTS=parts, num_warps=8 if n >= 4096 else 4, **extra)
    return out


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr,
                    crow_ptr, stride_crow,
                    HEADS, KV_HEADS, MAX_SEQ, D_HALF: tl.constexpr, BLOCK: tl.constexpr,
                    HB: tl.constexpr, USE_PDL: tl.constexpr, HAS_CROW: tl.constexpr,
                    IN_PLACE: tl.constexpr):
    # Program (b, g): HB consecutive heads of row b's q | k | v, as an [HB, D/2] pair of
    # halves; which of the three a head is decides (by mask) where it goes.
    b = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    d = 2 * D_HALF
    total = HEADS + 2 * KV_HEADS
    hs = tl.program_id(1) * HB + tl.arange(0, HB)
    offs = tl.arange(0, BLOCK)
    mask = (hs < total)[:, None] & (offs < D_HALF)[None, :]
    src = qkv_ptr + b * total * d + hs[:, None] * d + offs[None, :]
    a = tl.load(src, mask=mask)
    c = tl.load(src + D_HALF, mask=mask)
    pos = tl.load(pos_ptr + b)
    rope = pos * d + offs  # the tables' row at this row's position
    ca = tl.load(cos_ptr + rope, mask=offs < D_HALF)[None, :]
    sa = tl.load(sin_ptr + rope, mask=offs < D_HALF)[None, :]
    cb = tl.load(cos_ptr + rope + D_HALF, mask=offs < D_HALF)[None, :]
    sb = tl.load(sin_ptr + rope + D_HALF, mask=offs < D_HALF)[None, :]
    rot = (hs < HEADS + KV_HEADS)[:, None]  # q and k heads turn; v heads pass through
    oa = tl.where(rot, a * ca + (-c) * sa, a)
    ob = tl.where(rot, c * cb + a * sb, c)
    is_q = mask & (hs < HEADS)[:, None]
    is_k = mask & ((hs >= HEADS) & (hs < HEADS + KV_HEADS))[:, None]
    is_v = mask & (hs >= HEADS + KV_HEADS)[:, None]
    if IN_PLACE:  # q and the rotated k back into qkv
        tl.store(src, oa, mask=is_q | is_k)
        tl.store(src + D_HALF, ob, mask=is_q | is_k)
    else:
        dst = q_ptr + b * HEADS * d + hs[:, None] * d + offs[None, :]
        tl.store(dst, oa, mask=is_q)
        tl.store(dst + D_HALF, ob, mask=is_q)
    kvh = (tl.maximum(hs - HEADS, 0) % KV_HEADS).to(tl.int64)
    if HAS_CROW:  # rows name their cache row (a prefill's rows share one)
        crow = tl.load(crow_ptr + b * stride_crow).to(tl.int64)
    else:
        crow = b.to(tl.int64)
    row = (((crow * KV_HEADS + kvh) * MAX_SEQ + pos) * d)[:, None] + offs[None, :]
    tl.store(kc_ptr + row, oa, mask=is_k)
    tl.store(kc_ptr + row + D_HALF, ob, mask=is_k)
    tl.store(vc_ptr + row, oa, mask=is_v)
    tl.store(vc_ptr + row + D_HALF, ob, mask=is_v)


def rope_heads_per_program(rows: int, heads: int) -> int:
    """Heads one rope_kv program takes: 1 for a few rows (every head its own program, the
    grid still fills the GPU), doubling to 16 while >= 1024 programs remain. One head a
    program (64 elements, one warp) made a 500-token prefill's rope_kv 32 us a layer on an
    H100 for ~24 MB of traffic (docs/KERNELS.md run 26)."""
    hb = 1
    while hb < 16 and rows * triton.cdiv(heads, 2 * hb) >= 1024:
        hb *= 2
    return hb


def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
            v_cache: Tensor, q_out: Tensor | None, heads: int, kv_heads: int,
            pdl: bool = False, cache_rows: Tensor | None = None,
            heads_per_program: int | None = None) -> Tensor:
    """qkv: [B, (H + 2KV) * D] -> q_out [B, H*D] (RoPE'd); k (RoPE'd), v into the caches
    at pos[b] of cache row b (or cache_rows[b], as in attention.decode_attention).
    cos, sin: the RoPE tables [P, D] (contiguous), row pos[b] read (pos[b] < P).
    q_out None: q and k are rotated in place in qkv (and k, v still written to the caches),
    so a prefill's attention reads all three from qkv; returns qkv then, else q_out.
    heads_per_program: a power of two (None: rope_heads_per_program's rule)."""
    b = qkv.shape[0]
    if cache_rows is not None:
        check_cache_rows(cache_rows, b, "rope_kv")
    d_half = k_cache.shape[-1] // 2
    check_rope_tables(cos, sin, 2 * d_half, "rope_kv")
    total = heads + 2 * kv_heads
    hb = heads_per_program or rope_heads_per_program(b, total)
    block = triton.next_power_of_2(d_half)
    extra = {"launch_pdl": True} if pdl else {}
    launch(
        _rope_kv_kernel, (b, triton.cdiv(total, hb)), qkv, cos, sin, pos,
        qkv if q_out is None else q_out, k_cache, v_cache,
        cache_rows if cache_rows is not None else pos,
        cache_rows.stride(0) if cache_rows is not None else 0,
        heads, kv_heads, k_cache.shape[2],
        D_HALF=d_half, BLOCK=block, HB=hb, USE_PDL=pdl,
        HAS_CROW=cache_rows is not None, IN_PLACE=q_out is None,
        num_warps=max(1, min(4, hb * block // 256)), **extra)
    return qkv if q_out is None else q_out


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    mask = offs < N
    g = tl.load(gu_ptr + b * 2 * N + offs, mask=mask).to(tl.float32)
    u = tl.load(gu_ptr + b * 2 * N + N + offs, mask=mask)
    s = (g * tl.sigmoid(g)).to(u.dtype)
    tl.store(out_ptr + b * N + offs, (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype),
             mask=mask)


def silu_mul(gate_up: Tensor, out: Tensor, pdl: bool = False) -> Tensor:
    """gate_up: [B, 2I] (gate columns first) -> out [B, I] = silu(gate) * up."""
    b, n = gate_up.shape[0], gate_up.shape[1] // 2
    block = 1024
    extra = {"launch_pdl": True} if pdl else {}
    launch(_silu_mul_kernel, (b, triton.cdiv(n, block)), gate_up, out, n, BLOCK=block,
           USE_PDL=pdl, num_warps=4, **extra)
    return out
