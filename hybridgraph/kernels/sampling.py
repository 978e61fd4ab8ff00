"""The sampling sampler without torch.compile: a sort, the argmax kernel, two split kernels.

Why: with the prefill on the glue kernels and greedy on kernels/argmax.py, the compiled
`runtime.dynamic.sample` was the one Dynamo frame a hybrid engine on the kernels still
compiled at start-up (6.7 s of a 22.8 s cold start, 3.2 s of a 7.7 s restart on one
H100, docs/KERNELS.md run 16), and 95-201 µs a sampled token. This computes the same
function as `sample`:

  scaled = logits / max(T, 1e-6), sorted descending (torch.sort, stable: ties by index)
  keep rank r while r < top_k (0: all) and the probability mass ranked before r <= top_p
  draw the kept token of the largest scaled + Gumbel noise, the noise a hash of (seed,
  counter, token id) (`runtime.dynamic.uniform_noise`, reproduced bit for bit here)
  rows with T <= 0: argmax of the raw logits (kernels/argmax.py)

Two split passes over the sorted row, (row, chunk of ~2048) programs each, as
kernels/argmax.py splits: pass 1 sums each chunk's softmax terms (up to top_k); pass 2
gives every chunk the mass ranked before it from those sums, walks its values with a
running cumsum to mark the kept ones, scores them, and the row's last program picks the
best chunk. A chunk wholly past top_p or top_k exits at once. The float sums run in
another order than torch's cumsum and softmax, so a token whose mass lands within
rounding of top_p may be kept by one and dropped by the other; otherwise the draws are
`sample`'s (the tests compare tokens).

The first cut walked each row in ONE program: 146 / 454 µs at vocab 32000 / 128256 with
top-k 0, top-p 1, where the walk covers the whole vocabulary. Split, on one H100 in a graph
(20 calls a replay), one row: 64 µs at vocab 32000 and 70-75 at 128256 for every
parameter mix, against the compiled sampler's 94-95 and 201-203, the same tokens
(benchmarks/results/sampler-bench-NVIDIA-H100-3466209.txt, KERNELS.md run 18). The sort
(torch.sort, ~50 µs) is most of what is left. `TritonDecode.sample` serves it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.argmax import BLOCK, argmax, splits_for
from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace


@triton.jit
def _mix32(x):
    """runtime.dynamic._mix32 on uint32: its int64 products masked to 32 bits are these
    wrapping ones."""
    x = (x ^ (x >> 16)) * 0x45D9F3B
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return x ^ (x >> 16)


# The per-row parameters are the step buffers' rows first.. (a prefill's rows start
# anywhere): not specialized on their alignment, so no row compiles a kernel of its own.
@triton.jit(do_not_specialize=["temp_ptr", "topk_ptr"])
def _chunk_mass_kernel(sorted_ptr, temp_ptr, topk_ptr, mass_ptr, V, stride_s, CHUNK,
                       SPLITS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Pass 1, program (row, j): sum of exp(x - max) over chunk j of the sorted row, up to
    top_k (the softmax's terms, unnormalised)."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if tl.load(temp_ptr + row) > 0:
        k = tl.load(topk_ptr + row)
        k = tl.where(k > 0, tl.minimum(k, V), V).to(tl.int32)
        vals = sorted_ptr + row * stride_s
        m = tl.load(vals)
        offs = tl.arange(0, BLOCK)
        end = tl.minimum(j * CHUNK + CHUNK, k)
        acc = 0.0
        for start in range(j * CHUNK, end, BLOCK):
            x = tl.load(vals + start + offs, mask=start + offs < end, other=float("-inf"))
            acc += tl.sum(tl.exp(x - m), axis=0)
        tl.store(mass_ptr + row * SPLITS + j, acc)


@triton.jit(do_not_specialize=["temp_ptr", "topk_ptr", "topp_ptr", "seed_ptr", "cnt_ptr",
                               "out_ptr"])
def _draw_kernel(sorted_ptr, idx_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, cnt_ptr,
                 mass_ptr, best_ptr, count_ptr, out_ptr, V, stride_s, stride_i, CHUNK,
                 SPLITS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Pass 2, program (row, j): the kept tokens of chunk j (the mass before each from pass
    1's sums and a running cumsum) and their best score; the row's last program to finish
    picks the best of all chunks (the split argmax's counter) and writes its token."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if tl.load(temp_ptr + row) > 0:  # else out already holds the row's argmax
        k = tl.load(topk_ptr + row)
        k = tl.where(k > 0, tl.minimum(k, V), V).to(tl.int32)
        top_p = tl.load(topp_ptr + row)
        vals = sorted_ptr + row * stride_s
        m = tl.load(vals)
        chunks = tl.arange(0, SPLITS)
        masses = tl.load(mass_ptr + row * SPLITS + chunks)
        z = tl.sum(masses, axis=0)
        running = tl.sum(tl.where(chunks < j, masses, 0.0), axis=0) / z  # mass before chunk j
        seed = tl.load(seed_ptr + row)
        c = _mix32(_mix32((seed ^ (seed >> 32)).to(tl.uint32))
                   ^ tl.load(cnt_ptr + row).to(tl.uint32))
        offs = tl.arange(0, BLOCK)
        best = float("-inf")
        best_pos = V
        end = tl.minimum(j * CHUNK + CHUNK, k)
        if running <= top_p:  # else nothing here is kept (the mass only grows)
            for start in range(j * CHUNK, end, BLOCK):
                pos = start + offs
                live = pos < end
                x = tl.load(vals + pos, mask=live, other=float("-inf"))
                p = tl.exp(x - m) / z
                kept = live & (running + tl.cumsum(p, axis=0) - p <= top_p)
                tok = tl.load(idx_ptr + row * stride_i + pos, mask=live, other=0)
                h = _mix32(c ^ _mix32(tok.to(tl.uint32)))
                u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                score = tl.where(kept, x - tl.log(-tl.log(u)), float("-inf"))
                top = tl.max(score, axis=0)
                # First sorted position of the best; a later block must beat it strictly,
                # so ties keep the earlier position (torch.argmax's choice).
                at = tl.min(tl.where(score == top, pos, V), axis=0)
                better = top > best
                best_pos = tl.where(better, at, best_pos)
                best = tl.where(better, top, best)
                running += tl.sum(p, axis=0)
        mine = best_ptr + (row * SPLITS + j) * 2
        tl.store(mine, best)
        tl.store(mine + 1, best_pos.to(tl.float32))  # exact below 2^24
        tl.debug_barrier()  # the partial is stored before the counter moves
        done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if done == SPLITS - 1:  # the row's last chunk: the best of all
            part = best_ptr + (row * SPLITS + chunks) * 2
            scores = tl.load(part, cache_modifier=".cg")
            where = tl.load(part + 1, cache_modifier=".cg").to(tl.int32)
            top = tl.max(scores, axis=0)
            at = tl.min(tl.where(scores == top, where, V), axis=0)
            at = tl.minimum(at, V - 1)  # a row of -inf logits keeps no finite score
            tl.store(out_ptr + row, tl.load(idx_ptr + row * stride_i + at))
            tl.store(count_ptr + row, 0)


def sample(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
           counter: Tensor, out: Tensor, ws: Workspace, pdl: bool = False) -> Tensor:
    """runtime.dynamic.sample's tokens into out [B] (int64): logits [B, V] float32;
    temperature, top_p [B] float32; top_k, seed, counter [B] int64. Uses 3 * B * splits
    floats and B counters of ws (splits: argmax.splits_for(V))."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"sample: logits must be [B, V] float32, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    b, vocab = logits.shape
    splits = splits_for(vocab)
    ws.check(3 * b * splits, b, "sample")
    chunk = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    argmax(logits, out, ws, pdl=pdl)  # the T <= 0 rows' token (the others overwrite it)
    scaled = logits / torch.clamp(temperature, min=1e-6)[:, None]
    vals, idx = torch.sort(scaled, dim=-1, descending=True, stable=True)
    mass, best = ws.partials[:b * splits], ws.partials[b * splits:3 * b * splits]
    extra = {"launch_pdl": True} if pdl else {}
    launch(_chunk_mass_kernel, (b, splits), vals, temperature, top_k, mass, vocab,
           vals.stride(0), chunk, SPLITS=splits, BLOCK=BLOCK, USE_PDL=pdl, num_warps=4,
           **extra)
    launch(_draw_kernel, (b, splits), vals, idx, temperature, top_k, top_p, seed, counter,
           mass, best, ws.counters, out, vocab, vals.stride(0), idx.stride(0), chunk,
           SPLITS=splits, BLOCK=BLOCK, USE_PDL=pdl, num_warps=4, **extra)
    return out
