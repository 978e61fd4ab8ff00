"""Pure-PyTorch references for every kernel in this package, computed in float32.

Each function takes the same arguments as its kernel's launcher and returns float32
results (cache writes are returned, not applied), so tests compare the kernel against
the exact function, not against another rounding of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def rmsnorm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x) over the last dim."""
    xf = x.float()
    return weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, D]; cos, sin: [B, D] (rotate_half convention)."""
    xf, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
    x1, x2 = xf.chunk(2, dim=-1)
    return xf * c + torch.cat((-x2, x1), dim=-1) * s


def qkv_rope_ref(x: Tensor, wqkv: Tensor, cos: Tensor, sin: Tensor, heads: int,
                 kv_heads: int, norm_w: Tensor | None = None, eps: float = 1e-5,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The QKV projection of (optionally normed) x, RoPE applied to q and k.

    Returns q [B, heads*D], k [B, kv_heads, D], v [B, kv_heads, D] in float32.
    """
    xin = rmsnorm_ref(x, norm_w, eps) if norm_w is not None else x.float()
    y = xin @ wqkv.float().t()
    b = x.shape[0]
    d = wqkv.shape[0] // (heads + 2 * kv_heads)
    q, k, v = y.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = rope_ref(q.view(b, heads, d), cos, sin).reshape(b, heads * d)
    k = rope_ref(k.view(b, kv_heads, d), cos, sin)
    return q, k, v.view(b, kv_heads, d)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                         window: int) -> Tensor:
    """q: [B, H*D]; caches [max_batch, KV, max_seq, D]. Row b attends to keys 0..pos[b]
    of cache[b, :, :window]. Returns [B, H*D] float32."""
    b = q.shape[0]
    kv, d = k_cache.shape[1], k_cache.shape[3]
    h = q.shape[1] // d
    qf = q.float().view(b, kv, h // kv, d)
    keys = k_cache[:b, :, :window].float()
    values = v_cache[:b, :, :window].float()
    scores = qf @ keys.transpose(-1, -2) / math.sqrt(d)
    visible = torch.arange(window, device=q.device)[None, :] <= pos[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ values).reshape(b, h * d)


def gemv_ref(x: Tensor, w: Tensor, norm_w: Tensor | None = None, eps: float = 1e-5,
             residual: Tensor | None = None) -> Tensor:
    """(norm(x) if norm_w else x) @ w.T (+ residual), float32."""
    xin = rmsnorm_ref(x, norm_w, eps) if norm_w is not None else x.float()
    y = xin @ w.float().t()
    return y + residual.float() if residual is not None else y


def swiglu_ref(x: Tensor, w13: Tensor, norm_w: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """silu(gate) * up of the fused gate/up projection (gate rows first), float32."""
    gate, up = gemv_ref(x, w13, norm_w, eps).chunk(2, dim=-1)
    return F.silu(gate) * up


def rel_err(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32; NaN anywhere gives inf (never passes)."""
    o, r = out.detach().float(), ref.detach().float()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
