"""The GEMV's epilogues (kernels/gemv.py), and the row sets each tile pairs for them.

A tile owns two row sets of HALF rows, A and B (`tile_rows`), paired as its epilogue needs: a
RoPE pair (d, d + D/2) of one head, a gate row and its up row, or two neighbouring
half-tiles. `epilogue` writes the tile's float32 sums through one of the four epilogues
gemv.py's docstring lists, rounding as the model's PyTorch code rounds.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def epilogue(acc_a, acc_b, tile, offs_b, mask_bb, offs_h, rows_a, rows_b, mask_a, mask_b,
             w_ptr, out_ptr, stride_out, res_ptr, stride_res, cos_ptr, sin_ptr, pos_ptr,
             kc_ptr, vc_ptr, HEADS, KV_HEADS, MAX_SEQ, D_HALF, crow_ptr, stride_crow,
             EPI: tl.constexpr, HALF: tl.constexpr, HAS_CROW: tl.constexpr):
    dt = out_ptr.dtype.element_ty
    ma = mask_bb[:, None] & mask_a[None, :]
    mb = mask_bb[:, None] & mask_b[None, :]
    if EPI == 0:
        # Rounded to the weights' dtype first: float32 logits (the LM head) are the model's
        # fp16/bf16 logits widened, with no copy launch after the head.
        wd = w_ptr.dtype.element_ty
        tl.store(out_ptr + offs_b[:, None] * stride_out + rows_a[None, :],
                 acc_a.to(wd).to(dt), mask=ma)
        tl.store(out_ptr + offs_b[:, None] * stride_out + rows_b[None, :],
                 acc_b.to(wd).to(dt), mask=mb)
    elif EPI == 1:
        ra = tl.load(res_ptr + offs_b[:, None] * stride_res + rows_a[None, :], mask=ma)
        rb = tl.load(res_ptr + offs_b[:, None] * stride_res + rows_b[None, :], mask=mb)
        tl.store(out_ptr + offs_b[:, None] * stride_out + rows_a[None, :],
                 ra + acc_a.to(dt), mask=ma)
        tl.store(out_ptr + offs_b[:, None] * stride_out + rows_b[None, :],
                 rb + acc_b.to(dt), mask=mb)
    elif EPI == 2:
        g = acc_a.to(dt).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(dt).to(tl.float32)
        h = (s * acc_b.to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + offs_b[:, None] * stride_out + rows_a[None, :], h, mask=ma)
    else:
        chunks = D_HALF // HALF
        head = tile // chunks
        col_a = (tile % chunks) * HALF + offs_h
        a = acc_a.to(dt)
        b = acc_b.to(dt)
        d = 2 * D_HALF
        # The RoPE tables' row at each row's position: no gather launch before the step.
        pos = tl.load(pos_ptr + offs_b, mask=mask_bb, other=0)
        if head < HEADS + KV_HEADS:
            rope_a = pos[:, None] * d + col_a[None, :]
            ca = tl.load(cos_ptr + rope_a, mask=ma)
            sa = tl.load(sin_ptr + rope_a, mask=ma)
            cb = tl.load(cos_ptr + rope_a + D_HALF, mask=ma)
            sb = tl.load(sin_ptr + rope_a + D_HALF, mask=ma)
            oa = a * ca + (-b) * sa
            ob = b * cb + a * sb
        else:
            oa = a
            ob = b
        if head < HEADS:
            dst = out_ptr + offs_b[:, None] * stride_out + head * d + col_a[None, :]
            tl.store(dst, oa, mask=ma)
            tl.store(dst + D_HALF, ob, mask=ma)
        else:
            kvh = (head - HEADS) % KV_HEADS
            if HAS_CROW:  # rows name their cache row (a prefill's rows share one)
                crow = tl.load(crow_ptr + offs_b * stride_crow, mask=mask_bb, other=0)
                crow = crow.to(tl.int64)
            else:
                crow = offs_b.to(tl.int64)
            row = ((crow * KV_HEADS + kvh) * MAX_SEQ + pos) * d
            if head < HEADS + KV_HEADS:
                dst = kc_ptr + row[:, None] + col_a[None, :]
            else:
                dst = vc_ptr + row[:, None] + col_a[None, :]
            tl.store(dst, oa, mask=ma)
            tl.store(dst + D_HALF, ob, mask=ma)


@triton.jit
def tile_rows(tile, offs_h, N, D_HALF, EPI: tl.constexpr, HALF: tl.constexpr):
    """The two row sets of a tile, and which of their rows exist."""
    if EPI == 2:  # gate rows and their up rows, N = I
        rows_a = tile * HALF + offs_h
        rows_b = rows_a + N
        mask_a = rows_a < N
        mask_b = mask_a
    elif EPI == 3:  # the two halves of one head's RoPE pairs
        chunks = D_HALF // HALF
        rows_a = (tile // chunks) * (2 * D_HALF) + (tile % chunks) * HALF + offs_h
        rows_b = rows_a + D_HALF
        mask_a = offs_h < HALF
        mask_b = mask_a
    else:
        rows_a = tile * (2 * HALF) + offs_h
        rows_b = rows_a + HALF
        mask_a = rows_a < N
        mask_b = rows_b < N
    return rows_a, rows_b, mask_a, mask_b
