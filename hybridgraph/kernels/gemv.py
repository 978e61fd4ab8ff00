"""Weight-streaming GEMV for 1-16 rows with fused prologue and epilogues.

y[b, n] = sum_k x[b, k] * W[n, k], W row-major [N, K] (an nn.Linear weight). At decode
sizes the weights are the only traffic that matters. One row (DOT=False) multiplies in
registers: each thread sums its own 8 neighbouring products into one float32 as they come,
and the sums are reduced across threads once after the K loop. 2-16
rows (DOT) are padded to 16 and multiplied on the tensor cores, tl.dot letting Triton
pipeline the weights through shared memory; SWAP computes the transpose, W @ x^T, so the
weight tile is the MMA's M side (Hopper's warpgroup MMA takes M >= 64, N from 8: 16 rows
of x fit its N side, not its M side). Tile rules: gemv_config.py.

Each program owns two row sets of HALF rows, A and B, whose pairing is what the epilogue
needs: a RoPE pair (d, d + D/2) of one head, a gate row and its up row, or simply two
neighbouring half-tiles. Programs are also split over K (SPLIT_K); the split that
finishes a tile last sums the float32 partials (fixed order: deterministic) and runs the
epilogue, so split-K costs no second launch (see workspace.py).

Prologue NORM: RMSNorm folded into the product, y = rstd * (W @ (norm_w * x)): the sum of
squares is gathered in the main loop (and across splits by the reduce), so x is read once.
(The rounding differs from the model's — x * norm_w is rounded, not x * rstd — by well
under the dtype's tolerance; only a residual stream near the fp16 limit would overflow.)
Epilogues:
  EPI_PLAIN  out = y, rounded to W's dtype          (out width N; float32 out: the
                                                   LM head's logits need no copy)
  EPI_RESID  out = residual + y                    (the O and down projections)
  EPI_SILU   out = silu(y[:, :I]) * y[:, I:]       (the fused gate/up projection, width I)
  EPI_ROPE   q -> out with RoPE; k -> k cache with RoPE at pos[b]; v -> v cache at pos[b]
             (cache row b, or RopeArgs.cache_rows[b]: a prefill's rows all write one row;
             cos and sin are the model's tables, row pos[b] read: no gather before it)
Epilogue roundings follow the model's PyTorch code (each intermediate the model keeps in
the model dtype is rounded to it here too), so the kernel path stays within rounding of the
PyTorch path, not just of a float32 reference.

USE_PDL (Hopper programmatic dependent launch): the program first asks the L2 to prefetch
the start of its weight slice (weights never change, so this may overlap the previous
kernel), then waits for the previous kernel's writes. The next kernel may launch at once
(USE_PDL=1) or once this one's main loop is done (2, "late": measured faster, KERNELS.md).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.attention import check_cache_rows, check_rope_tables
from hybridgraph.kernels.gemv_config import (
    EPI_PLAIN,
    EPI_RESID,
    EPI_ROPE,
    EPI_SILU,
    GemvConfig,
    default_config,
    ffn_down_config,
    idle_prefetch,
    k_splits,
    n_tiles,
    rope_half,
    workspace_floats,
)
from hybridgraph.kernels.gemv_epilogue import epilogue, tile_rows
from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace

# Callers name the epilogues and the config as gemv.X: one module to import for a launch.
__all__ = ["EPI_PLAIN", "EPI_RESID", "EPI_ROPE", "EPI_SILU", "GemvConfig", "RopeArgs",
           "default_config", "ffn_down_config", "gemv", "gemv_kernel", "idle_prefetch",
           "n_tiles", "rope_half", "workspace_floats"]


@triton.jit
def _prefetch_l2(ptrs):
    # One prefetch per 128-byte line; the asm's dummy output keeps it from being dropped.
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _item(item, x_ptr, w_ptr, normw_ptr, out_ptr, res_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr,
          vc_ptr, ws_ptr, cnt_ptr, B, N, K, K_SPLIT, TILES, eps, stride_x, stride_out,
          stride_res, HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr, stride_crow,
          NORM: tl.constexpr, EPI: tl.constexpr, SPLIT_K: tl.constexpr,
          BLOCK_B: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
          USE_PDL: tl.constexpr, DOT: tl.constexpr, HAS_CROW: tl.constexpr,
          SWAP: tl.constexpr):
    """One work item: a tile of rows over one split of K (the whole of K if unsplit)."""
    offs_h = tl.arange(0, HALF)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_B)
    mask_bb = offs_b < B
    size = BLOCK_B * HALF
    item_floats = 2 * size + BLOCK_B
    offs2 = offs_b[:, None] * HALF + offs_h[None, :]
    tile = item % TILES
    split = item // TILES
    rows_a, rows_b, mask_a, mask_b = tile_rows(tile, offs_h, N, D_HALF, EPI, HALF)
    k_start = split * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    if DOT:
        if SWAP:
            # Both row sets as ONE [2 * HALF, BLOCK_K] weight tile (set A's rows, then
            # B's) and one warpgroup product a step: with one a set, the compiled loop
            # waited for each product before issuing the next (two waits a step).
            offs_w = tl.arange(0, 2 * HALF)
            ia, ib, ma_w, mb_w = tile_rows(tile, offs_w % HALF, N, D_HALF, EPI, HALF)
            w_ptrs = w_ptr + tl.where(offs_w < HALF, ia, ib).to(tl.int64)[:, None] * K \
                + offs_k[None, :]
            m_w = tl.where(offs_w < HALF, ma_w, mb_w)
            acc = tl.zeros([2 * HALF, BLOCK_B], dtype=tl.float32)
        else:
            wa_ptrs = w_ptr + rows_a.to(tl.int64)[:, None] * K + offs_k[None, :]
            wb_ptrs = w_ptr + rows_b.to(tl.int64)[:, None] * K + offs_k[None, :]
            acc_a = tl.zeros([BLOCK_B, HALF], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_B, HALF], dtype=tl.float32)
        # Squares summed elementwise in the loop, reduced once after it: a cross-warp
        # reduction per step stalled the weight pipeline (57 vs 45 us, KERNELS.md).
        sq = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            km = (k + offs_k) < k_end
            xt = tl.load(x_ptr + offs_b[:, None] * stride_x + (k + offs_k)[None, :],
                         mask=mask_bb[:, None] & km[None, :], other=0.0)
            if NORM:
                # RMSNorm folded in: y = rstd * (W @ (norm_w * x)), rstd from the sum of
                # squares gathered here, so no extra pass over x.
                xf = xt.to(tl.float32)
                sq += xf * xf
                nw = tl.load(normw_ptr + k + offs_k, mask=km, other=0.0)
                xt = (xf * nw.to(tl.float32)[None, :]).to(xt.dtype)
            if SWAP:
                w = tl.load(w_ptrs + k, mask=m_w[:, None] & km[None, :], other=0.0)
                acc = tl.dot(w, tl.trans(xt), acc)
            else:
                wa = tl.load(wa_ptrs + k, mask=mask_a[:, None] & km[None, :], other=0.0)
                wb = tl.load(wb_ptrs + k, mask=mask_b[:, None] & km[None, :], other=0.0)
                acc_a = tl.dot(xt, tl.trans(wa), acc_a)
                acc_b = tl.dot(xt, tl.trans(wb), acc_b)
        if SWAP:  # [2 * HALF, B] -> set A's and set B's [B, HALF]
            acc_a, acc_b = tl.split(tl.permute(tl.reshape(acc, [2, HALF, BLOCK_B]), (2, 1, 0)))
        ss = tl.sum(sq, axis=1)
    else:
        # One row (BLOCK_B == 1): products summed in registers (below), no
        # shared memory and no per-step reduction; one reduction after the loop. The
        # two row sets stream as ONE interleaved block (row 2r from A, 2r + 1 from B):
        # two separate loads measured up to 2x slower (the second was issued only after
        # the first one's products, halving the bytes in flight: KERNELS.md run 6).
        offs_i = tl.arange(0, 2 * HALF)
        ia, ib, ma_i, mb_i = tile_rows(tile, offs_i // 2, N, D_HALF, EPI, HALF)
        from_a = (offs_i % 2) == 0
        w_ptrs = w_ptr + tl.where(from_a, ia, ib).to(tl.int64)[:, None] * K + offs_k[None, :]
        m_rows = tl.where(from_a, ma_i, mb_i)
        # x, the norm weight and the squares are [1, BLOCK_K] tiles, not vectors, so they
        # share the weight block's layout and broadcast over its rows with no conversion.
        # Each thread sums its own 8 neighbouring products (one 16-byte load of K) into
        # one float32 as they come: an accumulator of an eighth of the tile, so the
        # registers go to weights in flight instead (KERNELS.md run 25).
        p = tl.zeros([2 * HALF, BLOCK_K // 8], dtype=tl.float32)
        sq = tl.zeros([1, BLOCK_K], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            km = ((k + offs_k) < k_end)[None, :]
            xv = tl.load(x_ptr + k + offs_k[None, :], mask=km, other=0.0)
            xf = xv.to(tl.float32)
            if NORM:
                sq += xf * xf
                nw = tl.load(normw_ptr + k + offs_k[None, :], mask=km, other=0.0)
                xf = (xf * nw.to(tl.float32)).to(xv.dtype).to(tl.float32)
            w = tl.load(w_ptrs + k, mask=m_rows[:, None] & km, other=0.0)
            p += tl.sum(tl.reshape(w.to(tl.float32) * xf, [2 * HALF, BLOCK_K // 8, 8]), axis=2)
        acc_a, acc_b = tl.split(tl.reshape(tl.sum(p, axis=1), [HALF, 2]))
        acc_a = tl.reshape(acc_a, [BLOCK_B, HALF])
        acc_b = tl.reshape(acc_b, [BLOCK_B, HALF])
        ss = tl.zeros([BLOCK_B], dtype=tl.float32) + tl.sum(tl.sum(sq, axis=1), axis=0)
    if USE_PDL == 2:  # late trigger: the next kernel launches as the weights run out
        tl.extra.cuda.gdc_launch_dependents()

    if SPLIT_K == 1:
        if NORM:
            rstd = tl.rsqrt(ss / K + eps)
            acc_a = acc_a * rstd[:, None]
            acc_b = acc_b * rstd[:, None]
        epilogue(acc_a, acc_b, tile, offs_b, mask_bb, offs_h, rows_a, rows_b, mask_a,
                  mask_b, w_ptr, out_ptr, stride_out, res_ptr, stride_res, cos_ptr, sin_ptr,
                  pos_ptr, kc_ptr, vc_ptr, HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr,
                  stride_crow, EPI, HALF, HAS_CROW)
    else:
        mine = ws_ptr + (tile * SPLIT_K + split) * item_floats
        tl.store(mine + offs2, acc_a)
        tl.store(mine + size + offs2, acc_b)
        tl.store(mine + 2 * size + offs_b, ss)
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last split of this tile: reduce, in split order
            acc_a = tl.zeros([BLOCK_B, HALF], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_B, HALF], dtype=tl.float32)
            ss = tl.zeros([BLOCK_B], dtype=tl.float32)
            for s in range(SPLIT_K):
                part = ws_ptr + (tile * SPLIT_K + s) * item_floats
                acc_a += tl.load(part + offs2, cache_modifier=".cg")
                acc_b += tl.load(part + size + offs2, cache_modifier=".cg")
                ss += tl.load(part + 2 * size + offs_b, cache_modifier=".cg")
            tl.store(cnt_ptr + tile, 0)
            if NORM:
                rstd = tl.rsqrt(ss / K + eps)
                acc_a = acc_a * rstd[:, None]
                acc_b = acc_b * rstd[:, None]
            epilogue(acc_a, acc_b, tile, offs_b, mask_bb, offs_h, rows_a, rows_b,
                      mask_a, mask_b, w_ptr, out_ptr, stride_out, res_ptr, stride_res, cos_ptr,
                      sin_ptr, pos_ptr, kc_ptr, vc_ptr, HEADS, KV_HEADS, MAX_SEQ, D_HALF,
                      crow_ptr, stride_crow, EPI, HALF, HAS_CROW)


@triton.jit
def _pdl_prologue(item, w_ptr, N, K, K_SPLIT, TILES, SPLIT_K, D_HALF, EPI: tl.constexpr,
                  HALF: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr):
    """With PDL: ask the L2 for the first PREFETCH lines of each of the item's weight rows
    (weights never change, so this may overlap the previous kernel), let the next kernel
    launch if USE_PDL == 1, then wait for the previous kernel's writes."""
    if USE_PDL > 0:
        if PREFETCH > 0:
            offs_h = tl.arange(0, HALF)
            rows_a, rows_b, mask_a, mask_b = tile_rows(item % TILES, offs_h, N, D_HALF, EPI, HALF)
            k0 = (item // TILES) * K_SPLIT
            lines = k0 + tl.arange(0, PREFETCH)[None, :] * 64
            ok = (item < TILES * SPLIT_K) & (lines < K)
            _prefetch_l2(tl.where(mask_a[:, None] & ok,
                                  w_ptr + rows_a.to(tl.int64)[:, None] * K + lines, w_ptr))
            _prefetch_l2(tl.where(mask_b[:, None] & ok,
                                  w_ptr + rows_b.to(tl.int64)[:, None] * K + lines, w_ptr))
        if USE_PDL == 1:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def gemv_kernel(x_ptr, w_ptr, normw_ptr, out_ptr, res_ptr,
                cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, ws_ptr, cnt_ptr,
                B, N, K, K_SPLIT, TILES, eps, stride_x, stride_out, stride_res,
                HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr, stride_crow,
                NORM: tl.constexpr, EPI: tl.constexpr, SPLIT_K: tl.constexpr,
                BLOCK_B: tl.constexpr, HALF: tl.constexpr, BLOCK_K: tl.constexpr,
                PREFETCH: tl.constexpr, USE_PDL: tl.constexpr, DOT: tl.constexpr,
                PERSIST: tl.constexpr, HAS_CROW: tl.constexpr, SWAP: tl.constexpr):
    pid = tl.program_id(0)
    _pdl_prologue(pid, w_ptr, N, K, K_SPLIT, TILES, SPLIT_K, D_HALF, EPI, HALF, PREFETCH,
                  USE_PDL)

    # Work items (tile, split), tile fastest, are dealt round-robin over the programs: a
    # grid smaller than the item count makes the kernel persistent (PERSIST), which evens
    # out the last wave. Without it each program runs one item and there is no outer loop
    # (the loop cost registers, hence occupancy: KERNELS.md run 6).
    if PERSIST:
        for item in range(pid, TILES * SPLIT_K, tl.num_programs(0)):
            _item(item, x_ptr, w_ptr, normw_ptr, out_ptr, res_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr,
                  vc_ptr, ws_ptr, cnt_ptr, B, N, K, K_SPLIT, TILES, eps, stride_x, stride_out,
                  stride_res, HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr, stride_crow, NORM,
                  EPI, SPLIT_K, BLOCK_B, HALF, BLOCK_K, USE_PDL, DOT, HAS_CROW, SWAP)
    else:
        _item(pid, x_ptr, w_ptr, normw_ptr, out_ptr, res_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr,
                  vc_ptr, ws_ptr, cnt_ptr, B, N, K, K_SPLIT, TILES, eps, stride_x, stride_out,
                  stride_res, HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr, stride_crow, NORM,
                  EPI, SPLIT_K, BLOCK_B, HALF, BLOCK_K, USE_PDL, DOT, HAS_CROW, SWAP)


# ------------------------------------------------------------------------------ launch

def gemv(x: Tensor, w: Tensor, out: Tensor, ws: Workspace, cfg: GemvConfig, *,
         epi: int = EPI_PLAIN, norm_w: Tensor | None = None, eps: float = 1e-5,
         residual: Tensor | None = None, rope: RopeArgs | None = None,
         pdl: int = 0) -> Tensor:
    """out = epilogue((norm(x) if norm_w else x) @ w.T). x: [B, K] (B <= 16), w: [N, K].

    EPI_SILU: w is the fused gate/up weight [2I, K] and out [B, I]. EPI_ROPE: w is wqkv,
    out receives q [B, H*D] and rope's caches receive k and v at rope.pos. pdl: 0 off,
    1 (or True) programmatic dependent launch letting the next kernel launch at once,
    2 letting it launch only after this kernel's main loop.
    """
    b, k = x.shape
    n = w.shape[0] // 2 if epi == EPI_SILU else w.shape[0]
    if b > 16:
        raise ValueError(f"gemv serves at most 16 rows, got {b}")
    if w.shape[1] != k or x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    half = cfg.half
    d_half = heads = kv_heads = max_seq = 1
    if epi == EPI_ROPE:
        if rope is None:
            raise ValueError("gemv: EPI_ROPE needs rope arguments")
        heads, kv_heads = rope.heads, rope.kv_heads
        d_half = rope.k_cache.shape[-1] // 2
        max_seq = rope.k_cache.shape[2]
        half = rope_half(d_half, half)
        check_rope_tables(rope.cos, rope.sin, 2 * d_half, "gemv")
        if rope.cache_rows is not None:
            check_cache_rows(rope.cache_rows, b, "gemv")
    if b > 1 and not cfg.dot:  # the register path serves one row: take the batched rule
        cfg = default_config(n, k, epi=epi, norm=norm_w is not None, d_half=d_half, rows=b)
        half = rope_half(d_half, cfg.half) if epi == EPI_ROPE else cfg.half
    dot = cfg.dot
    if half < (16 if dot else 1):
        raise ValueError(f"gemv: row sets of {half} rows are too small for tl.dot (>= 16)")
    tiles = n_tiles(epi, n, half, d_half)
    k_split, split = k_splits(k, cfg)
    block_b = 16 if dot else 1
    if split > 1:
        ws.check(workspace_floats(tiles, split, half, block_b), tiles, "gemv")
    dummy = out
    r = rope
    crow = r.cache_rows if r is not None else None
    args = (x, w, norm_w if norm_w is not None else w, out,
            residual if residual is not None else dummy,
            r.cos if r else dummy, r.sin if r else dummy, r.pos if r else ws.counters,
            r.k_cache if r else dummy, r.v_cache if r else dummy, ws.partials, ws.counters,
            b, n, k, k_split, tiles, eps, x.stride(0), out.stride(0),
            residual.stride(0) if residual is not None else 0,
            heads, kv_heads, max_seq, d_half,
            crow if crow is not None else ws.counters, crow.stride(0) if crow is not None else 0)
    extra = {"launch_pdl": True} if pdl else {}
    items = tiles * split
    grid = min(items, cfg.programs) if cfg.programs > 0 else items
    launch(
        gemv_kernel, (grid,),
        *args, NORM=norm_w is not None, EPI=epi, SPLIT_K=split, BLOCK_B=block_b, HALF=half,
        BLOCK_K=cfg.block_k, PREFETCH=cfg.prefetch, USE_PDL=int(pdl), DOT=dot,
        PERSIST=grid < items, HAS_CROW=crow is not None, SWAP=dot and cfg.swap,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **extra)
    return out


class RopeArgs(NamedTuple):
    cos: Tensor        # [P, D] the RoPE table (model dtype, contiguous): row pos[b] is read
    sin: Tensor
    pos: Tensor        # [B] int64, each < P
    k_cache: Tensor    # [max_batch, KV, max_seq, D]
    v_cache: Tensor
    heads: int
    kv_heads: int
    cache_rows: Tensor | None = None  # [B] int64: the cache row row b writes (any stride,
    #                                   0 too: a prefill's rows share one); None: row b

