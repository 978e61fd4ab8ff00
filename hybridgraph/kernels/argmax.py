"""Greedy's argmax over a vocabulary in one launch, split over the vocabulary.

Each program finds the largest value of one slice of one row; the program that finishes a
row last (an atomic counter, as the split GEMV in gemv.py) reduces the slices' results and
writes the row's index, then sets the counter back to zero. So a row of 128k logits is read
by ~64 SMs at once, in one launch, with no Dynamo frame to compile at start-up.

Why: in a CUDA graph on one H100 (scripts/argmax_bench.py), Inductor's argmax of one row
took 7.5 µs at vocab 32000 and 22.8 µs at 128256 (2% of a llama-3.2-1b token); this kernel
4.0 and 4.6 µs.

Semantics are torch.argmax's: the first index of the largest value, NaN larger than
anything (the first NaN wins).

Given a `Finish` (kernels/publish.py), the program that settles a row's token also advances
the row's position and publishes the token for the host: a greedy step's whole finish in
this one launch (`pos + active` and the publish were two more, ~3.3 µs of a one-row step on
one H100).

The greedy sampler where the Triton kernels are in use (`TritonDecode.greedy`, installed
by the Engine under the compile backend): one Dynamo frame less at start-up too.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.publish import Finish, check_ring, finish_row
from hybridgraph.kernels.workspace import Workspace

BLOCK = 1024        # values a program loads per step: 8 per thread over 4 warps
TARGET_CHUNK = 2048  # values a program covers, where SPLITS_MAX allows
SPLITS_MAX = 128


@triton.jit
def _best(vals, idx, V):
    """(value, index) of the best valid lane: NaN first, then the largest, then the lowest
    index. idx >= V marks a lane that saw nothing (returned as index V)."""
    valid = idx < V
    is_nan = (vals != vals) & valid
    any_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    top = tl.max(tl.where(valid & ~is_nan, vals, float("-inf")), axis=0)
    cand = tl.where(any_nan, is_nan, valid & (vals == top))
    i = tl.min(tl.where(cand, idx, V), axis=0)
    return tl.where(any_nan, float("nan"), top), i


@triton.jit
def _settle(row, i, out_ptr, first, pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr, slots, width,
            FINISH: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    tok = i.to(tl.int64)
    tl.store(out_ptr + first + row, tok)
    if FINISH:
        finish_row(row, tok, first, pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr, slots, width,
                   HAS_ACTIVE)


# out_ptr may be a row slice of the step's token buffer (a sampled prefill's rows start
# anywhere): not specialized on its alignment, so no row compiles a kernel of its own.
@triton.jit(do_not_specialize=["first", "out_ptr"])
def _argmax_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, V, stride_x, CHUNK, first,
                   pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr, slots, width,
                   SPLITS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
                   FINISH: tl.constexpr, HAS_ACTIVE: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32) + V  # V: this lane has seen nothing yet
    start = split * CHUNK
    for k in range(start, start + CHUNK, BLOCK):
        idx = k + offs
        live = idx < V
        x = tl.load(x_ptr + row * stride_x + idx, mask=live, other=float("-inf"))
        x = x.to(tl.float32)
        # Each lane sees rising indices, so only a strictly better value (or the first
        # NaN, or the first value at all) replaces its best: ties keep the first index.
        take = live & ((best_i >= V) | (x > best) | ((x != x) & (best == best)))
        best = tl.where(take, x, best)
        best_i = tl.where(take, idx, best_i)
    val, i = _best(best, best_i, V)
    if SPLITS == 1:
        _settle(row, i, out_ptr, first, pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr, slots,
                width, FINISH, HAS_ACTIVE)
    else:
        # Each slice's (value, index) as two floats: indices stay exact below 2^24.
        mine = ws_ptr + (row * SPLITS + split) * 2
        tl.store(mine, val)
        tl.store(mine + 1, i.to(tl.float32))
        tl.debug_barrier()  # the partial is stored before the counter moves
        done = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
        if done == SPLITS - 1:  # the last slice of this row: reduce all of them
            s = tl.arange(0, SPLITS)
            part = ws_ptr + (row * SPLITS + s) * 2
            vals = tl.load(part, cache_modifier=".cg")
            idxs = tl.load(part + 1, cache_modifier=".cg").to(tl.int32)
            val, i = _best(vals, idxs, V)
            _settle(row, i, out_ptr, first, pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr,
                    slots, width, FINISH, HAS_ACTIVE)
            tl.store(cnt_ptr + row, 0)


def splits_for(vocab: int) -> int:
    """Programs a row: a power of two (the reduce loads all at once), ~TARGET_CHUNK each."""
    return min(SPLITS_MAX, triton.next_power_of_2(triton.cdiv(vocab, TARGET_CHUNK)))


def argmax(x: Tensor, out: Tensor, ws: Workspace, pdl: bool = False,
           finish: Finish | None = None) -> Tensor:
    """out[b] = torch.argmax(x[b]) as int64, for x [B, V] of any float type (rows may be
    strided, values contiguous). Uses 2 * B * splits floats and B counters of ws.

    With `finish`, out is the step's whole token buffer and row b's token goes to
    out[finish.first + b], the row's position advances and the token is published
    (kernels/publish.py Finish)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax: x must be [B, V] with contiguous rows, got "
                         f"{tuple(x.shape)} strides {x.stride()}")
    b, vocab = x.shape
    if not 0 < vocab < 1 << 24:
        raise ValueError(f"argmax: a vocabulary of {vocab}: must be 1 to 2^24 - 1 (float32 "
                         "holds the indices exactly)")
    splits = splits_for(vocab)
    ws.check(2 * b * splits, b, "argmax")
    chunk = triton.cdiv(triton.cdiv(vocab, splits), BLOCK) * BLOCK
    extra = {"launch_pdl": True} if pdl else {}
    if finish is None:  # unused pointers: any tensor will do
        first, pos_in, pos_out, act, ring, slots, width = 0, out, out, out, out, 1, 1
    else:
        first, ring = finish.first, finish.ring
        check_ring(ring, first, b)
        if not first + b <= min(out.shape[0], finish.pos_out.shape[0]) or \
                finish.pos_in.shape[0] != b:
            raise ValueError(f"argmax: rows {first}..{first + b} outside the token buffer "
                             f"({out.shape[0]}) or positions ({finish.pos_out.shape[0]}), "
                             f"or pos_in of {finish.pos_in.shape[0]} rows for {b}")
        pos_in, pos_out = finish.pos_in, finish.pos_out
        act = finish.active if finish.active is not None else pos_in
        slots, width = ring.shape[0], ring.stride(0)
    launch(_argmax_kernel, (b, splits), x, out, ws.partials, ws.counters, vocab, x.stride(0),
           chunk, first, pos_in, pos_out, act, ring, slots, width, SPLITS=splits,
           BLOCK=BLOCK, USE_PDL=pdl, FINISH=finish is not None,
           HAS_ACTIVE=finish is not None and finish.active is not None, num_warps=4, **extra)
    return out
