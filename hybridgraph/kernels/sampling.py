"""The sampling sampler without torch.compile: a sort, the argmax kernel and one kernel.

Why: with the prefill on the glue kernels and greedy on kernels/argmax.py, the compiled
`runtime.dynamic.sample` is the one Dynamo frame a hybrid engine on the kernels still
compiles at start-up (6.7 s of a 22.8 s cold start, 3.2 s of a 7.7 s restart on one
H100, docs/KERNELS.md run 16). This computes the same function as `sample`:

  scaled = logits / max(T, 1e-6), sorted descending (torch.sort, stable: ties by index)
  keep rank r while r < top_k (0: all) and the probability mass ranked before r <= top_p
  draw the kept token of the largest scaled + Gumbel noise, the noise a hash of (seed,
  counter, token id) (`runtime.dynamic.uniform_noise`, reproduced bit for bit here)
  rows with T <= 0: argmax of the raw logits (kernels/argmax.py)

The kernel walks one row's sorted values in blocks: the softmax denominator over the
first top_k, then the running mass, stopping at the first block past top_k or top_p, so
a peaked distribution reads only its head. Its float sums run in another order than
torch's cumsum and softmax, so a token whose mass lands within rounding of top_p may be
kept by one and dropped by the other; otherwise the draws are `sample`'s.

Not yet on the runtime's path: a GPU must first check it and time it against the
compiled sampler in a graph (then `TritonDecode` installs it, as it does greedy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.argmax import argmax
from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace

BLOCK = 1024  # sorted values a step reads


@triton.jit
def _mix32(x):
    """runtime.dynamic._mix32 on uint32: its int64 products masked to 32 bits are these
    wrapping ones."""
    x = (x ^ (x >> 16)) * 0x45D9F3B
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def _sample_kernel(sorted_ptr, idx_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, cnt_ptr,
                   out_ptr, V, stride_s, stride_i, BLOCK: tl.constexpr,
                   USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    temperature = tl.load(temp_ptr + row)
    if temperature > 0:  # else out already holds the row's argmax
        k = tl.load(topk_ptr + row)
        k = tl.where(k > 0, tl.minimum(k, V), V)
        top_p = tl.load(topp_ptr + row)
        vals = sorted_ptr + row * stride_s
        offs = tl.arange(0, BLOCK)
        m = tl.load(vals)  # the largest: softmax's shift
        z = 0.0
        for start in range(0, k, BLOCK):
            x = tl.load(vals + start + offs, mask=start + offs < k, other=float("-inf"))
            z += tl.sum(tl.exp(x - m), axis=0)
        seed = tl.load(seed_ptr + row)
        counter = tl.load(cnt_ptr + row)
        s = _mix32((seed ^ (seed >> 32)).to(tl.uint32))
        c = _mix32(s ^ counter.to(tl.uint32))
        best = float("-inf")
        best_pos = 0
        mass = 0.0  # probability ranked before this block
        start = 0
        while (start < k) & (mass <= top_p):
            pos = start + offs
            live = pos < k
            x = tl.load(vals + pos, mask=live, other=float("-inf"))
            p = tl.exp(x - m) / z
            before = mass + tl.cumsum(p, axis=0) - p
            kept = live & (before <= top_p)
            tok = tl.load(idx_ptr + row * stride_i + pos, mask=live, other=0)
            h = _mix32(c ^ _mix32(tok.to(tl.uint32)))
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            score = tl.where(kept, x - tl.log(-tl.log(u)), float("-inf"))
            top = tl.max(score, axis=0)
            # The first sorted position of the block's best; a later block must beat the
            # best so far strictly, so ties keep the earlier position (torch.argmax's).
            at = tl.min(tl.where(score == top, pos, V), axis=0)
            better = top > best
            best_pos = tl.where(better, at, best_pos)
            best = tl.where(better, top, best)
            mass += tl.sum(p, axis=0)
            start += BLOCK
        tl.store(out_ptr + row, tl.load(idx_ptr + row * stride_i + best_pos))


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
           counter: Tensor, out: Tensor, ws: Workspace, pdl: bool = False) -> Tensor:
    """runtime.dynamic.sample's tokens into out [B] (int64): logits [B, V] float32;
    temperature, top_p [B] float32; top_k, seed, counter [B] int64. Uses ws as argmax does."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"sample: logits must be [B, V] float32, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    b, vocab = logits.shape
    argmax(logits, out, ws, pdl=pdl)  # the T <= 0 rows' token, and every row's for now
    scaled = logits / torch.clamp(temperature, min=1e-6)[:, None]
    vals, idx = torch.sort(scaled, dim=-1, descending=True, stable=True)
    extra = {"launch_pdl": True} if pdl else {}
    launch(_sample_kernel, (b,), vals, idx, temperature, top_k, top_p, seed, counter, out,
           vocab, vals.stride(0), idx.stride(0), BLOCK=BLOCK, USE_PDL=pdl, num_warps=4,
           **extra)
    return out
