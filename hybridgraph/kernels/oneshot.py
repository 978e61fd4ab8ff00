"""One-shot all-reduce over symmetric memory: one Triton launch per call, fp16/bf16/fp32.

Tensor-parallel decode sums a [rows, hidden] partial (8-16 KB at batch 1) twice a layer.
NCCL's ring takes several steps; PyTorch's `one_shot_all_reduce` has no float16 kernel, so
float16 had to be staged through float32 around it (three launches). Here one launch does it:

  1. every program copies its chunk of x into this call's half of this rank's symmetric
     buffer (the halves alternate from call to call: `state` below);
  2. barrier with the same program on every peer (chunk b is only read by programs b);
  3. it reads chunk b from that half of every rank's buffer over NVLink, sums in float32
     in rank order 0..world-1 (so every rank computes bit-identical results), rounds to
     the dtype, adds the residual if any (rounded as `residual + sum` is in PyTorch),
     stores out.

One barrier a call is enough because the halves alternate. A rank may leave while a peer
still reads its half of this call; its next call writes the other half, and the call after
(this half again) starts only once every program of the next call has met its peers, which
start only once their whole previous call, reads included, is done (kernels on one stream
run in order; this kernel is never launched early). A second barrier at the end, the older
protocol, cost one more NVLink round trip a call (KERNELS.md run 11). Which half: `state`,
int32 [2] on this rank's device (not symmetric), holds the phase and a count of finished
programs; the last program of a call resets the count and flips the phase, so the next
call, and every replay of a CUDA graph, finds it ready. Every rank makes the same calls in
the same order, so the phases agree.

The barrier (`_barrier`): program b of rank r raises pad_of_peer[b * world + r] from 0 to 1
(a compare-and-swap loop: the slot is still 1 while the peer has not consumed the previous
signal), then lowers its own pad[b * world + peer] from 1 back to 0 for every peer. Each
peer has its own lane (thread), so the round trips to all peers overlap; a lane that is
through swaps 0 for 0 until the others are, never signalling twice nor taking a signal its
peer already sent for the next barrier. Every put is matched by exactly one wait, so the
pads end every call at zero: nothing to reset between calls, and the kernel can sit in a
CUDA graph and be replayed forever. Release on the put and acquire on the wait, both at
system scope (peer memory), with a CTA barrier on either side: all of a program's stores
precede its signal, and no thread reads a peer before the signal has arrived. The loops'
conditions are reductions over the lanes, so every thread leaves them together: a lane's
atomic runs once, on one thread, and Triton hands its result to every thread that holds a
copy of the lane (its finalizeTensorAtomicResults). Torch's own
one-shot kernels use the same slot layout and protocol (one thread per peer too), so
sharing a signal pad with them (the symmetric pool may place two buffers in one block)
stays sound.

Pointers: every rank's buffer and signal pad address sit in int64 tensors and become
pointers in the kernel (`.to(tl.pointer_type(...))`). The CPU tests run this kernel in
Triton's interpreter with host buffers standing in for the peers (tests/test_oneshot.py).
NVLink multicast is never used: plain loads through peer mappings only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WORLD = 8
# At most this many programs: torch's default signal pad (1 KB) holds 32 programs x 8
# ranks of 4-byte slots, and a decode message needs no more (64 rows x 8192 fp32 = 2 MB
# is 64 KB a program).
MAX_PROGRAMS = 32
# Bytes per program before another is added: 8 KB (one fp16 row of 4096) takes 4 programs.
# Each program's barrier costs the same whatever its size, so few, not many: a handful of
# SMs already read far more than NVLink delivers for messages this small.
BYTES_PER_PROGRAM = 2048
DEFAULT_PAD_BYTES = 1024   # torch's default signal pad: 256 uint32 slots
NUM_WARPS = 4
VECTOR_BYTES = 16          # one 16-byte load per thread per step


@triton.jit
def _barrier(pad_ptrs, pid, rank, WORLD: tl.constexpr, LANES: tl.constexpr):
    """Program `pid` meets program `pid` of every peer (see the module docstring). One lane
    per peer, so the remote atomics (each a round trip over NVLink) to all peers are in
    flight at once: one after another they cost a round trip per peer, which is what made
    the kernel lose to NCCL at 4 ranks (KERNELS.md run 9)."""
    tl.debug_barrier()  # every thread's stores are made before the release below
    lane = tl.arange(0, LANES)
    peer = (lane < WORLD) & (lane != rank)
    # Lanes that are not peers (this rank, padding) point at this rank's own slot of its
    # own pad, which no one signals, and compare-and-swap 0 for 0: they never write.
    idx = tl.where(peer, lane, rank)
    pads = tl.load(pad_ptrs + idx).to(tl.pointer_type(tl.int32))
    one = tl.where(peer, 1, 0)
    zero = tl.zeros([LANES], dtype=tl.int32)
    # Put: raise our slot on every peer's pad, 0 -> 1 (it is still 1 while that peer has
    # not consumed our previous signal). A lane that got through swaps 0 for 0 from then on.
    todo = peer
    while tl.max(todo.to(tl.int32), axis=0) > 0:
        old = tl.atomic_cas(pads + pid * WORLD + rank, zero, tl.where(todo, one, zero),
                            sem="release", scope="sys")
        todo = todo & (old != 0)
    # Wait: consume every peer's signal on our own pad, 1 -> 0. A lane that got through
    # swaps 0 for 0: its peer may already have signalled its next barrier, not ours to take.
    own = tl.load(pad_ptrs + rank).to(tl.pointer_type(tl.int32))
    slots = own + pid * WORLD + idx
    todo = peer
    while tl.max(todo.to(tl.int32), axis=0) > 0:
        old = tl.atomic_cas(slots, tl.where(todo, one, zero), zero, sem="acquire",
                            scope="sys")
        todo = todo & (old != 1)
    tl.debug_barrier()  # no thread reads a peer's buffer before the acquire above


@triton.jit
def _oneshot_kernel(x_ptr, res_ptr, out_ptr, buf_ptrs, pad_ptrs, state_ptr, n, chunk, half,
                    rank, programs, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_RES: tl.constexpr, BARRIER: tl.constexpr, LANES: tl.constexpr):
    pid = tl.program_id(0)
    start = pid * chunk
    end = tl.minimum(start + chunk, n)
    dtype = x_ptr.dtype.element_ty
    base = tl.load(state_ptr) * half   # this call's half of every buffer, in elements
    mine = tl.multiple_of(tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype)), 16) + base
    for t in range(start, end, BLOCK):
        offs = t + tl.arange(0, BLOCK)
        mask = offs < end
        tl.store(mine + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    if BARRIER:
        _barrier(pad_ptrs, pid, rank, WORLD, LANES)
    for t in range(start, end, BLOCK):
        offs = t + tl.arange(0, BLOCK)
        mask = offs < end
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):  # rank order, the same on every rank
            src = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(dtype)), 16) + base
            acc += tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        total = acc.to(dtype)
        if HAS_RES:  # rounded as PyTorch rounds `residual + total` in this dtype
            res = tl.load(res_ptr + offs, mask=mask, other=0.0)
            total = (res.to(tl.float32) + total.to(tl.float32)).to(dtype)
        tl.store(out_ptr + offs, total, mask=mask)
    # The last program to finish flips the phase for the next call (every program read it
    # above, before counting itself here).
    tl.debug_barrier()
    done = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel")
    if done == programs - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, 1 - tl.load(state_ptr))


def half_bytes(buffer_bytes: int) -> int:
    """The bytes one call may use of a symmetric buffer: one of its two halves, 16-byte
    aligned (the calls alternate between them)."""
    return buffer_bytes // 2 // 16 * 16


def new_state(device: torch.device | str) -> Tensor:
    """A rank's phase and finished-program count for `all_reduce`: zeros, int32 [2]."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def launch_plan(numel: int, element_size: int, world: int,
                pad_bytes: int = DEFAULT_PAD_BYTES) -> tuple[int, int, int]:
    """(programs, chunk elements, BLOCK) for a message: the same on every rank, which the
    barrier needs (program b meets program b). Chunks are multiples of 16 elements, so
    every program's start is 16-byte aligned and its loads can be 16-byte vectors."""
    most = max(1, min(MAX_PROGRAMS, pad_bytes // 4 // world))
    programs = max(1, min(most, triton.cdiv(numel * element_size, BYTES_PER_PROGRAM)))
    chunk = triton.cdiv(triton.cdiv(numel, programs), 16) * 16
    programs = triton.cdiv(numel, chunk)
    # A tile is the chunk (one pass) up to 4096 elements, at least one vector per thread.
    smallest = VECTOR_BYTES // element_size * 32 * NUM_WARPS
    block = min(max(triton.next_power_of_2(chunk), smallest), max(4096, smallest))
    return programs, chunk, block


def check_args(x: Tensor, out: Tensor, buffer: Tensor, buffer_ptrs: Tensor,
               signal_pads: Tensor, rank: int, world: int, residual: Tensor | None,
               state: Tensor) -> None:
    """ValueError naming what is wrong with a call's arguments (nothing is launched)."""
    if x.dtype not in DTYPES:
        raise ValueError(f"one-shot all-reduce: dtype {x.dtype} is not one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")
    if not 2 <= world <= MAX_WORLD:
        raise ValueError(f"one-shot all-reduce: world size {world} is not in 2..{MAX_WORLD}")
    if not 0 <= rank < world:
        raise ValueError(f"one-shot all-reduce: rank {rank} is not in 0..{world - 1}")
    for name, t in (("x", x), ("out", out), ("residual", residual)):
        if t is None:
            continue
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"one-shot all-reduce: {name} is {t.dtype} {tuple(t.shape)}, "
                             f"x is {x.dtype} {tuple(x.shape)}: they must match")
        if not t.is_contiguous():
            raise ValueError(f"one-shot all-reduce: {name} must be contiguous")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"one-shot all-reduce: the symmetric buffer must be a 1-D uint8 "
                         f"tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    nbytes = x.numel() * x.element_size()
    if half_bytes(buffer.numel()) < nbytes:
        raise ValueError(f"one-shot all-reduce: {nbytes} bytes of x exceed the "
                         f"{half_bytes(buffer.numel())}-byte half of the "
                         f"{buffer.numel()}-byte symmetric buffer")
    if state.dtype != torch.int32 or tuple(state.shape) != (2,):
        raise ValueError(f"one-shot all-reduce: state must be int32 of shape (2,), got "
                         f"{state.dtype} {tuple(state.shape)}")
    for name, t in (("buffer_ptrs", buffer_ptrs), ("signal_pads", signal_pads)):
        if t.dtype != torch.int64 or tuple(t.shape) != (world,):
            raise ValueError(f"one-shot all-reduce: {name} must be int64 of shape "
                             f"({world},), got {t.dtype} {tuple(t.shape)}")
    for name, t in (("out", out), ("buffer", buffer), ("buffer_ptrs", buffer_ptrs),
                    ("signal_pads", signal_pads), ("residual", residual), ("state", state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"one-shot all-reduce: {name} is on {t.device}, x on {x.device}")


def all_reduce(x: Tensor, out: Tensor, buffer: Tensor, buffer_ptrs: Tensor,
               signal_pads: Tensor, rank: int, world: int, state: Tensor,
               residual: Tensor | None = None, pad_bytes: int = DEFAULT_PAD_BYTES,
               barrier: bool = True) -> Tensor:
    """out = (residual +) the sum of x over `world` ranks; returns out. Collective: every
    rank calls it with the same shape and dtype, in the same order as its other calls.

    x: this rank's partial sum (contiguous); buffer: this rank's symmetric buffer (uint8,
    each half >= x's bytes); buffer_ptrs, signal_pads: int64 [world], every rank's buffer
    and signal pad address on this device (buffer_ptrs[rank] is `buffer`); state: this
    rank's `new_state`, kept for every call on this buffer; pad_bytes: the signal pad's
    size (it bounds the programs). barrier=False leaves out the barrier: only for a test
    whose peers' buffers are already filled (the kernel's arithmetic alone).
    """
    check_args(x, out, buffer, buffer_ptrs, signal_pads, rank, world, residual, state)
    n = x.numel()
    if n == 0:
        return out
    programs, chunk, block = launch_plan(n, x.element_size(), world, pad_bytes)
    if programs * world * 4 > pad_bytes:
        raise ValueError(f"one-shot all-reduce: {programs} programs x {world} ranks need "
                         f"{programs * world * 4} bytes of signal pad, it has {pad_bytes}")
    _oneshot_kernel[(programs,)](
        x, residual if residual is not None else x, out, buffer_ptrs, signal_pads, state,
        n, chunk, half_bytes(buffer.numel()) // x.element_size(), rank, programs,
        WORLD=world, BLOCK=block, HAS_RES=residual is not None, BARRIER=barrier,
        LANES=triton.next_power_of_2(world), num_warps=NUM_WARPS)
    return out


def reference(parts: list[Tensor], residual: Tensor | None = None) -> Tensor:
    """What every rank's `all_reduce` returns, in PyTorch: the float32 sum in rank order,
    rounded to the dtype, then residual + it in the dtype."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for p in parts:
        acc += p.float()
    total = acc.to(parts[0].dtype)
    return total if residual is None else residual + total
