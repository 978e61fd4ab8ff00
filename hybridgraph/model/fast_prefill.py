"""A prefill of any length without torch.compile: cuBLAS, three Triton glue kernels and
FlashAttention (through SDPA), the kernel path's answer to Inductor's prefill block.

Why: Inductor compiling `Block.prefill` was the largest part of a cold start (docs/
KERNELS.md, run 16), and prompts past 16 tokens are compute-bound: cuBLAS's GEMMs are most
of the time either way, so the work around them only needs fusing, which the glue kernels
already do for the decode path. One layer, over all B*T tokens as rows:

  1. add_rmsnorm   the previous layer's down projection + residual, RMSNorm
  2. cuBLAS        QKV
  3. rope_kv       RoPE on q and k in place; k and v into the cache row each prompt names
  4. SDPA          causal attention over the prompt's own keys, read from the QKV buffer
                   (GQA without repeating the keys: enable_gqa)
  5. cuBLAS        O
  6. add_rmsnorm   + residual, RMSNorm
  7. cuBLAS        gate/up
  8. silu_mul
  9. cuBLAS        down (its residual add rides in the next layer's step 1)

O and down are narrow (hidden-wide) products: for a few hundred tokens cuBLAS's output
tiles fill a fraction of the SMs. Those split over K (`gemm_parts`) run as one
strided-batched GEMM into parts, which step 6 or the next step 1 sums on its way in.

Semantics are Transformer.prefill's: prompts right-padded from position 0, padding never
seen by a real token (causal), logits of each row's last_idx. Roundings follow the model's
(glue.py), so the two agree to fp16/bf16 rounding. On a tensor-parallel rank O and down
return partial sums, summed by `layer.all_reduce` before their adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridgraph.model.llama import Block, no_reduce

if TYPE_CHECKING:
    from hybridgraph.model.fast_decode import TritonDecode


def _add_norm(h: Tensor, part: Tensor | None, layer: Block, weight: Tensor, eps: float,
              out: Tensor) -> Tensor:
    """out = rmsnorm(h + all_reduce(part)) in one kernel; returns the sum (h itself when
    there is no part yet), the residual stream from here on."""
    from hybridgraph.kernels import glue

    if part is None:
        glue.add_rmsnorm(h, weight, eps, out)
        return h
    total = torch.empty_like(h)
    glue.add_rmsnorm(layer.all_reduce(part), weight, eps, out, residual=h, sum_out=total)
    return total


def gemm_parts(m: int, n: int, k: int, sms: int, min_k: int) -> int:
    """Parts (1, 2 or 4) to split an [m, k] @ [k, n] cuBLAS product into over K: doubled
    while the 128x128 output tiles times the parts still fit one wave of the SMs and each
    part keeps >= min_k of K (0: never split). On one H200 (docs/KERNELS.md run 36):
    llama-2-7b's down alone at 256 tokens 44.6 -> 37.7 us in two parts, nothing to gain
    at 512 tokens (128 tiles: one wave already), QKV and gate/up (wide) never gained; the
    whole prefill at 32 / 128 / 256 tokens 4.54 / 4.87 / 6.41 -> 4.34 / 4.73 / 6.20 ms,
    llama-3.2-1b at 128 / 512 tokens 1.30 / 2.10 -> 1.23 / 2.00 ms."""
    tiles = -(-m // 128) * -(-n // 128)
    parts = 1
    while (parts < 4 and min_k > 0 and tiles * 2 * parts <= sms and k % (2 * parts) == 0
           and k // (2 * parts) >= min_k and (k // (2 * parts)) % 8 == 0):  # 16-byte rows
        parts *= 2
    return parts


def linear_parts(x: Tensor, w: Tensor, parts: int) -> Tensor:
    """x @ w.T ([M, N]) or, for parts > 1, its parts over K ([parts, M, N]) from one
    strided-batched GEMM over views of x and w (no copy). Each part is rounded to x's dtype,
    one rounding more than the unsplit product: float32 parts measured slower (llama-2-7b,
    128 tokens, 4.83 against 4.73 ms on one H200, docs/KERNELS.md run 36)."""
    if parts == 1:
        return F.linear(x, w)
    (m, k), n = x.shape, w.shape[0]
    xs = x.view(m, parts, k // parts).transpose(0, 1)
    ws = w.view(n, parts, k // parts).transpose(0, 1).transpose(1, 2)
    return torch.bmm(xs, ws)


def glue_prefill(fast: TritonDecode, ids: Tensor, rows: Tensor, last_idx: Tensor) -> Tensor:
    """Transformer.prefill(ids, last_idx, rows=rows) on cuBLAS + glue + FlashAttention.

    ids: [B, T] right-padded prompts; rows: [B] the cache row each writes (device tensor);
    last_idx: [B] the position whose logits are returned. Returns [B, V] float32 logits.
    Every shape is fixed by (B, T), so the whole prefill captures in one CUDA graph.
    """
    from hybridgraph.kernels import glue

    m = fast.model
    b, t = ids.shape
    if not 1 <= t <= m.max_seq:
        raise ValueError(f"glue_prefill: {t} tokens; the cache holds {m.max_seq}")
    n, heads, kv, d, eps = b * t, fast.heads, fast.kv, fast.d, fast.eps
    if b == 1:  # views only
        pos, crow = fast.positions[:t], rows[:1].expand(t)
    else:  # row r of the B*T is token r % T of prompt r // T
        pos = fast.positions[:t].repeat(b)
        crow = rows[:b, None].expand(b, t).reshape(n)
    cos, sin = m.rope_cos, m.rope_sin  # rope_kv reads row pos[r] of the tables
    h = m.tok_embeddings(ids.reshape(n))
    # A tensor-parallel rank's all-reduce wants one partial sum, so ranks never split.
    single = all(layer.all_reduce is no_reduce for layer in m.layers)
    min_k = fast.plan.prefill_split_k if single else 0
    wo_parts = gemm_parts(n, m.config.hidden_size, heads * d, fast.sms, min_k)
    w2_parts = gemm_parts(n, m.config.hidden_size, m.config.intermediate_size, fast.sms,
                          min_k)
    part: Tensor | None = None  # the last projection's output, not yet added to h
    for layer, cache in zip(m.layers, m.caches, strict=True):
        att, ff = layer.attention, layer.feed_forward
        xn = torch.empty_like(h)
        h = _add_norm(h, part, layer, layer.attention_norm.weight, eps, xn)
        qkv = glue.rope_kv(F.linear(xn, att.wqkv.weight), cos, sin, pos, cache.k, cache.v,
                           None, heads, kv, cache_rows=crow)
        qkv = qkv.view(b, t, heads + 2 * kv, d).transpose(1, 2)  # [B, heads, T, D] views
        o = F.scaled_dot_product_attention(qkv[:, :heads], qkv[:, heads:heads + kv],
                                           qkv[:, heads + kv:], is_causal=True,
                                           enable_gqa=kv != heads)
        attn = linear_parts(o.transpose(1, 2).reshape(n, heads * d), att.wo.weight, wo_parts)
        xn = torch.empty_like(h)
        h = _add_norm(h, attn, layer, layer.ffn_norm.weight, eps, xn)
        up = torch.empty(n, ff.w2.weight.shape[1], dtype=h.dtype, device=h.device)
        part = linear_parts(glue.silu_mul(F.linear(xn, ff.w13.weight), up), ff.w2.weight,
                            w2_parts)
    # Only the rows whose logits are asked for finish the last residual add (and the
    # all-reduce: every rank selects the same rows).
    sel = torch.arange(b, device=ids.device) * t + last_idx[:b]
    last = part.index_select(-2, sel)
    if last.dim() == 3:  # down's parts over K
        last = last.sum(0)
    x = h.index_select(0, sel) + m.layers[-1].all_reduce(last)
    if b <= fast.rows and "head" in fast.plan.uses(b):
        return fast.head_logits(x)
    return m.output(m.norm(x)).float()
