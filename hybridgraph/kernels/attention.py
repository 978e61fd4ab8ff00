"""Flash-decoding attention over the KV cache: one launch, split over keys, GQA grouped.

Program (b, kv head, split) multiplies the REP query heads that share one kv head by the
split's keys (so each key and value is read once, not REP times), with an online softmax
in float32. Keys past pos[b] are neither read nor counted: a short sequence in a large
window bucket reads only its own keys. Row b reads cache row b, or cache_rows[b] where
given: a short prefill runs as T rows of one sequence, row t at position t attending to
keys 0..t of the one cache row (causal by construction); there a program takes ROWS of
the prompt's rows at once (rows x REP query heads on the MMA's M side: prompt_rows), so
the keys are read once a group instead of once a row, and each row masks the keys past its
own position. The split that finishes a (b, kv head) last
combines the splits' partial (max, sum, output) in split order and writes the result
(workspace.py), so there is no second launch. With early_kv (models whose keys per
position are narrow: early_kv_pays) each split reads its first tile of earlier steps' keys
before the PDL wait, so only q and the key at pos, both just written by the QKV kernel,
are read after it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace


@triton.jit
def _attend(q, k, v, seen, m_i, l_i, acc, scale, dt: tl.constexpr, SAFE: tl.constexpr):
    """One tile of keys into the online softmax: (m, l, acc) updated. seen: which keys
    each row counts ([1, BLOCK_T] where all rows count the same). SAFE: a row may count
    none of this tile's keys (a prompt's early rows); it then stays as it was."""
    # Scores rounded to the model dtype first, as the model's fp16 matmul does.
    s = tl.dot(q, tl.trans(k)).to(dt).to(tl.float32) * scale
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if SAFE:  # exp(-inf - -inf) is NaN: a row with no key so far subtracts 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(dt), v)
    return m_new, l_i, acc


@triton.jit
def decode_attention_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, ws_ptr, cnt_ptr,
                            crow_ptr, stride_crow,
                            scale, WINDOW, KV_HEADS, MAX_SEQ, CHUNK, N_ROWS,
                            REP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
                            SPLITS: tl.constexpr, USE_PDL: tl.constexpr,
                            HAS_CROW: tl.constexpr, EARLY_KV: tl.constexpr,
                            ROWS: tl.constexpr):
    bk = tl.program_id(0)
    split = tl.program_id(1)
    b = bk // KV_HEADS  # the row (ROWS == 1), else the group of rows b*ROWS..
    kvh = bk % KV_HEADS
    if USE_PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    dt = kc_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D_PAD)
    offs_t = tl.arange(0, BLOCK_T)
    mask_d = offs_d < D
    heads_d = KV_HEADS * REP * D
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
    if ROWS == 1:  # MMA row r: query head kvh * REP + r of row b
        mask_r = offs_r < REP
        qo = b * heads_d + (kvh * REP + offs_r)[:, None] * D + offs_d[None, :]
    else:          # MMA row r: query head kvh * REP + r % REP of row b * ROWS + r // REP
        row = b * ROWS + offs_r // REP
        mask_r = (offs_r < ROWS * REP) & (row < N_ROWS)
        qo = row[:, None] * heads_d + (kvh * REP + offs_r % REP)[:, None] * D + offs_d[None, :]
    q_rows = q_ptr + qo
    if EARLY_KV:
        # Row b writes only its own key (at pos) this step; the keys before it are earlier
        # steps'. So the split's first tile of those is read before the PDL wait, while the
        # QKV kernel finishes, and only the key at pos is read after it.
        pos = tl.load(pos_ptr + b)
        start = split * CHUNK
        end = tl.minimum(tl.minimum(start + CHUNK, pos + 1), WINDOW)
        base = (b.to(tl.int64) * KV_HEADS + kvh) * MAX_SEQ * D
        te = start + offs_t
        off_e = base + te[:, None] * D + offs_d[None, :]
        old = ((te < end) & (te < pos))[:, None] & mask_d[None, :]
        k_e = tl.load(kc_ptr + off_e, mask=old, other=0.0)
        v_e = tl.load(vc_ptr + off_e, mask=old, other=0.0)
        if USE_PDL > 0:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_rows, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        if start < end:
            new = (te == pos)[:, None] & mask_d[None, :]
            k_e = tl.where(new, tl.load(kc_ptr + off_e, mask=new, other=0.0), k_e)
            v_e = tl.where(new, tl.load(vc_ptr + off_e, mask=new, other=0.0), v_e)
            m_i, l_i, acc = _attend(q, k_e, v_e, (te < end)[None, :], m_i, l_i, acc, scale,
                                    dt, False)
        first = start + BLOCK_T
    else:
        if USE_PDL > 0:
            tl.extra.cuda.gdc_wait()
        q = tl.load(q_rows, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        if ROWS == 1:
            pos = tl.load(pos_ptr + b)
        else:  # each row's own position (padding rows: 0); keys run to the group's last
            row_pos = tl.load(pos_ptr + row, mask=mask_r, other=0)
            pos = tl.max(row_pos, axis=0)
        start = split * CHUNK
        end = tl.minimum(tl.minimum(start + CHUNK, pos + 1), WINDOW)
        if HAS_CROW:  # a group's rows share one cache row (stride 0: the host checks)
            crow = tl.load(crow_ptr + b * ROWS * stride_crow).to(tl.int64)
        else:
            crow = b.to(tl.int64)
        base = (crow * KV_HEADS + kvh) * MAX_SEQ * D
        first = start
    for t0 in range(first, end, BLOCK_T):
        t = t0 + offs_t
        tm = t < end
        kv_off = base + t[:, None] * D + offs_d[None, :]
        kv_mask = tm[:, None] & mask_d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        if ROWS == 1:
            m_i, l_i, acc = _attend(q, k, v, tm[None, :], m_i, l_i, acc, scale, dt, False)
        else:
            seen = tm[None, :] & (t[None, :] <= row_pos[:, None])
            m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, scale, dt, True)
    if USE_PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    out_rows = out_ptr + qo
    out_mask = mask_r[:, None] & mask_d[None, :]
    if SPLITS == 1:
        tl.store(out_rows, (acc / l_i[:, None]).to(dt), mask=out_mask)
    else:
        size = BLOCK_R * (D_PAD + 2)
        offs_acc = offs_r[:, None] * D_PAD + offs_d[None, :]
        mine = ws_ptr + (bk * SPLITS + split).to(tl.int64) * size
        tl.store(mine + offs_acc, acc)
        tl.store(mine + BLOCK_R * D_PAD + offs_r, m_i)
        tl.store(mine + BLOCK_R * (D_PAD + 1) + offs_r, l_i)
        tl.debug_barrier()  # every thread's partial is stored before the counter moves
        done = tl.atomic_add(cnt_ptr + bk, 1, sem="acq_rel")
        if done == SPLITS - 1:
            m_all = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
            l_all = tl.zeros([BLOCK_R], dtype=tl.float32)
            o_all = tl.zeros([BLOCK_R, D_PAD], dtype=tl.float32)
            for j in range(SPLITS):
                part = ws_ptr + (bk * SPLITS + j).to(tl.int64) * size
                a_j = tl.load(part + offs_acc, cache_modifier=".cg")
                m_j = tl.load(part + BLOCK_R * D_PAD + offs_r, cache_modifier=".cg")
                l_j = tl.load(part + BLOCK_R * (D_PAD + 1) + offs_r, cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_j)  # split 0 always holds key 0: finite after j=0
                c_old = tl.exp(m_all - m_new)
                c_j = tl.exp(m_j - m_new)
                l_all = l_all * c_old + l_j * c_j
                o_all = o_all * c_old[:, None] + a_j * c_j[:, None]
                m_all = m_new
            tl.store(cnt_ptr + bk, 0)
            tl.store(out_rows, (o_all / l_all[:, None]).to(dt), mask=out_mask)


MIN_SPLIT_TILES = 2  # key tiles a split covers at least (1 where the first is read early)


def early_kv_pays(kv_heads: int, head_dim: int) -> bool:
    """Whether decode attention should read its first tile of earlier steps' keys before
    the PDL wait (`early_kv`), one tile a split: where a position's keys and values are
    narrow. One H100, whole forward, windows 64-1024 (docs/KERNELS.md run 26):
    tinyllama-1.1b (4 x 64 per position) 16-30 us a token faster at every window,
    llama-3.2-1b (8 x 64) a tie to 18 us faster, llama-2-7b (32 x 128) 0-311 us slower
    (the most at 1024): its megabytes of early reads compete with the QKV kernel's last
    weights."""
    return kv_heads * head_dim <= 1024


def attention_splits(batch: int, kv_heads: int, window: int, block_t: int,
                     sms: int = 132, min_tiles: int = MIN_SPLIT_TILES) -> int:
    """Splits over keys so the grid covers the GPU about twice, each split covering at
    least MIN_SPLIT_TILES tiles of the window. With one tile a split (the rule before),
    decode at short contexts was latency-bound on the splits' combine: on one H100, one
    row, llama-2-7b's forward at window 1024 took 5.19 ms with 16 splits of 64 keys and
    5.07 with 8 of 128; llama-3.2-1b 1.137 -> 1.122 ms (docs/KERNELS.md run 21)."""
    splits = 1
    while (batch * kv_heads * splits < 2 * sms
           and window // (splits * 2) >= min_tiles * block_t):
        splits *= 2
    return splits


def prompt_rows(rep: int, b: int) -> int:
    """Rows of one prompt a program takes (cache_rows of stride 0): as many as fill the
    MMA's 16 rows with their REP query heads each, at most the B there are. At one a row,
    llama-2-7b's (REP 1) 16-token prefill spent 9.0 us a layer in attention, 512 programs
    each using one of their 16 MMA rows, against 6.1 at 10 tokens (KERNELS.md run 32)."""
    return max(1, min(b, 16 // rep))


def check_cache_rows(cache_rows: Tensor, b: int, what: str) -> None:
    """A per-row cache-row index: a 1-D int32/int64 tensor of >= b entries, any stride
    (stride 0: every row reads one cache row). Its values are not checked here (that would
    sync the device); like any cache index they must lie in [0, max_batch)."""
    if cache_rows.dim() != 1 or cache_rows.shape[0] < b or cache_rows.dtype not in (
            torch.int32, torch.int64):
        raise ValueError(f"{what}: cache_rows must be an int32/int64 vector of >= {b} "
                         f"entries, got {cache_rows.dtype} {tuple(cache_rows.shape)}")


def check_rope_tables(cos: Tensor, sin: Tensor, d: int, what: str) -> None:
    """RoPE tables as the kernels read them (gemv's EPI_ROPE, glue.rope_kv): two contiguous
    [P, d] tensors, row pos[b] at position pos[b] (pos values are not checked here)."""
    for t in (cos, sin):
        if t.dim() != 2 or t.shape[1] != d or not t.is_contiguous():
            raise ValueError(f"{what}: cos and sin must be contiguous [positions, {d}] RoPE "
                             f"tables, got {tuple(t.shape)} strides {t.stride()}")


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, window: int,
                     out: Tensor, ws: Workspace, *, block_t: int = 64, splits: int | None = None,
                     num_warps: int = 4, pdl: int = 0,
                     cache_rows: Tensor | None = None, early_kv: bool = False,
                     rows_per_program: int | None = None) -> Tensor:
    """q, out: [B, H*D] (model dtype); caches [max_batch, KV, max_seq, D]; pos: [B].
    cache_rows: [B], the cache row each row reads (None: row b reads row b); of stride 0
    (a prompt's rows, one cache row), a program takes rows_per_program rows at once (None:
    prompt_rows; elsewhere it must be None or 1).
    pdl: 0 off, 1 the next kernel may launch at once, 2 after the key loop.
    early_kv: each split reads its first tile of earlier steps' keys before the PDL wait,
    and the rule splits down to one tile a split (rows that each write only their own key:
    not with cache_rows, where a prefill's rows write every key they read)."""
    b = q.shape[0]
    if cache_rows is not None:
        check_cache_rows(cache_rows, b, "decode_attention")
    kv, max_seq, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rep = q.shape[1] // (kv * d)
    if rep * kv * d != q.shape[1]:
        raise ValueError(f"decode_attention: q width {q.shape[1]} is not a multiple of "
                         f"kv_heads * head_dim = {kv * d}")
    if window > max_seq:
        raise ValueError(f"decode_attention: window {window} exceeds the cache ({max_seq})")
    early_kv = early_kv and cache_rows is None
    one_row = cache_rows is None or cache_rows.stride(0) != 0
    rows = rows_per_program or (1 if one_row else prompt_rows(rep, b))
    if rows != 1 and one_row:
        raise ValueError("decode_attention: rows_per_program > 1 needs the rows of one "
                         "prompt (cache_rows of stride 0)")
    groups = triton.cdiv(b, rows)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count \
        if q.is_cuda else 132
    splits = splits or attention_splits(groups, kv, window, block_t, sms,
                                        min_tiles=1 if early_kv else MIN_SPLIT_TILES)
    chunk = triton.cdiv(triton.cdiv(window, splits), block_t) * block_t
    splits = triton.cdiv(window, chunk)
    block_r = max(16, triton.next_power_of_2(rows * rep))
    d_pad = max(16, triton.next_power_of_2(d))
    if splits > 1:
        ws.check(groups * kv * splits * block_r * (d_pad + 2), groups * kv,
                 "decode_attention")
    extra = {"launch_pdl": True} if pdl else {}
    launch(
        decode_attention_kernel, (groups * kv, splits),
        q, k_cache, v_cache, pos, out, ws.partials, ws.counters,
        cache_rows if cache_rows is not None else pos,
        cache_rows.stride(0) if cache_rows is not None else 0,
        1.0 / math.sqrt(d), window, kv, max_seq, chunk, b,
        REP=rep, D=d, D_PAD=d_pad, BLOCK_R=block_r, BLOCK_T=block_t, SPLITS=splits,
        USE_PDL=int(pdl), HAS_CROW=cache_rows is not None,
        EARLY_KV=early_kv, ROWS=rows, num_warps=num_warps, **extra)
    return out
