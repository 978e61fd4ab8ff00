"""One-shot all-reduce over symmetric memory: one Triton launch per call, fp16/bf16/fp32.

Tensor-parallel decode sums a [rows, hidden] partial (8-16 KB at batch 1) twice a layer.
NCCL's ring takes several steps; PyTorch's `one_shot_all_reduce` has no float16 kernel.
Here one launch does it, and no rank ever waits on a flag: the data are the flag.

Every rank's symmetric buffer holds two phases x `world` slots, one slot per source rank,
and every byte of a slot not in use holds EMPTY: the 16-bit pattern 0x8000 in each half
word (a float16/bfloat16 -0.0; the float32 word 0x80008000, a denormal). A call:

  1. every program pushes its chunk of x into slot `rank` of this call's phase on every
     peer, over NVLink (plain remote stores), after making sure no element of it looks
     EMPTY: a 16-bit -0.0 is sent as +0.0 and a float32 0x80008000 as -0.0;
  2. it reads its chunk of every source's slot in its OWN buffer, local memory, in rank
     order 0..world-1, load after load until no element is EMPTY (the peer's push has
     landed), sums in float32 (so every rank computes bit-identical results), rounds to
     the dtype, adds the residual if any (rounded as `residual + sum` is in PyTorch),
     stores out, and writes EMPTY back over what it read.
Its own part it takes from x (sent-as, so every rank sums the same values). Against the
barrier protocol this replaces (a compare-and-swap round trip to each peer, then every
peer's data read across NVLink) the only remote traffic is one-way stores.

Why a slot is EMPTY when a peer pushes into it: the phases alternate call by call (the
`state` below), so a peer pushes into this phase again two calls later; it can get there
only after it has read this rank's push of the call in between, which this rank makes only
after this call, its EMPTY writes included, is over (kernels on one stream run in order).
Why a rank never reads another call's data: a peer can be at most one call ahead, and that
call uses the other phase.

PDL (`pdl`, Hopper): the kernel may launch while the kernel before it still runs, but it
touches nothing (not even `state`) before `gdc_wait`, which returns once that kernel has
finished; that kernel finished only after its own wait, and so on back, so every earlier
call is over too and the ordering above holds. Right after the wait it lets the next
kernel launch: a decode's next GEMV then asks the L2 for its weights while this kernel
waits on NVLink, when HBM is otherwise idle (docs/KERNELS.md run 34).

`state`, int32 [2] on this rank's device (not symmetric), holds the phase and a count of
finished programs; the last program of a call resets the count and flips the phase, so
the next call, and every replay of a CUDA graph, finds it ready. Every rank makes the
same calls in the same order, so the phases agree. Pointers: every rank's buffer address
sits in an int64 tensor and becomes a pointer in the kernel. The CPU tests run the kernel
in Triton's interpreter with host buffers standing in for the peers
(tests/test_oneshot.py). NVLink multicast is never used: plain stores and loads only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.launch import launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WORLD = 8
MAX_PROGRAMS = 32
# Bytes per program before another is added: 8 KB (one fp16 row of 4096) takes 4 programs.
BYTES_PER_PROGRAM = 2048
NUM_WARPS = 4
VECTOR_BYTES = 16          # one 16-byte load per thread per step
PHASES = 2
EMPTY16 = -32768           # 0x8000 as int16: what every unused half word holds
EMPTY32 = -2147450880      # 0x80008000 as int32: two of them
NEG_ZERO32 = -2147483648   # 0x80000000 as int32: float32 -0.0
# The same for the kernels: a jitted function may read only constexpr globals.
_EMPTY16 = tl.constexpr(EMPTY16)
_EMPTY32 = tl.constexpr(EMPTY32)
_NEG_ZERO32 = tl.constexpr(NEG_ZERO32)


@triton.jit
def _bits(v, WIDE: tl.constexpr):
    if WIDE:
        b = v.to(tl.int32, bitcast=True)
    else:
        b = v.to(tl.int16, bitcast=True)
    return b


@triton.jit
def _sendable(v, WIDE: tl.constexpr):
    """v with no element that reads as EMPTY (see the module docstring)."""
    b = _bits(v, WIDE)
    if WIDE:
        b = tl.where(b == _EMPTY32, _NEG_ZERO32, b)
    else:
        b = tl.where(b == _EMPTY16, 0, b).to(tl.int16)
    return b.to(v.dtype, bitcast=True)


@triton.jit
def _arrived(src, mask, WIDE: tl.constexpr):
    """The values at src once none of them (where mask) is EMPTY: load after load, each
    from memory (volatile), as a peer's push lands."""
    v = tl.load(src, mask=mask, other=0.0, volatile=True)
    if WIDE:
        empty = _EMPTY32
    else:
        empty = _EMPTY16
    while tl.max(((_bits(v, WIDE) == empty) & mask).to(tl.int32), axis=0) > 0:
        v = tl.load(src, mask=mask, other=0.0, volatile=True)
    return v


@triton.jit
def _oneshot_kernel(x_ptr, res_ptr, out_ptr, buf_ptrs, state_ptr, n, chunk, slot, rank,
                    programs, WORLD: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_RES: tl.constexpr, WIDE: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:  # nothing read or written before the kernel before this one has finished
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    start = pid * chunk
    end = tl.minimum(start + chunk, n)
    dtype = x_ptr.dtype.element_ty
    phase = tl.load(state_ptr)
    # 1. push: our chunk into slot `rank` of this phase on every peer.
    to_slot = (phase * WORLD + rank) * slot
    for t in range(start, end, BLOCK):
        offs = t + tl.arange(0, BLOCK)
        mask = offs < end
        v = _sendable(tl.load(x_ptr + offs, mask=mask, other=0.0), WIDE)
        for p in tl.static_range(WORLD):
            if p != rank:
                dst = tl.multiple_of(tl.load(buf_ptrs + p).to(tl.pointer_type(dtype)), 16)
                tl.store(dst + to_slot + offs, v, mask=mask)
    # 2. gather: every source's slot in our own buffer, in rank order.
    own = tl.multiple_of(tl.load(buf_ptrs + rank).to(tl.pointer_type(dtype)), 16)
    if WIDE:
        empty = tl.full([BLOCK], _EMPTY32, tl.int32).to(dtype, bitcast=True)
    else:
        empty = tl.full([BLOCK], _EMPTY16, tl.int16).to(dtype, bitcast=True)
    for t in range(start, end, BLOCK):
        offs = t + tl.arange(0, BLOCK)
        mask = offs < end
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):  # rank order, the same on every rank
            if p == rank:
                v = _sendable(tl.load(x_ptr + offs, mask=mask, other=0.0), WIDE)
            else:
                src = own + (phase * WORLD + p) * slot + offs
                v = _arrived(src, mask, WIDE)
                tl.store(src, empty, mask=mask)   # EMPTY again for this phase's next use
            acc += v.to(tl.float32)
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


def slot_bytes(buffer_bytes: int, world: int) -> int:
    """The largest message in bytes a buffer of `buffer_bytes` serves at `world` ranks:
    one of its PHASES x world slots, 16-byte aligned."""
    return buffer_bytes // (PHASES * world) // 16 * 16


def buffer_bytes_for(message_bytes: int, world: int) -> int:
    """The buffer that serves messages of up to `message_bytes` (slot_bytes' inverse)."""
    return PHASES * world * (-(-message_bytes // 16) * 16)


def clear(buffer: Tensor) -> Tensor:
    """Fill a (new) buffer with EMPTY: every slot unused. Every rank must have cleared its
    buffer before any rank's first call (the peers push into it)."""
    buffer[:buffer.numel() // 2 * 2].view(torch.int16).fill_(EMPTY16)
    return buffer


def new_state(device: torch.device | str) -> Tensor:
    """A rank's phase and finished-program count for `all_reduce`: zeros, int32 [2]."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def launch_plan(numel: int, element_size: int) -> tuple[int, int, int]:
    """(programs, chunk elements, BLOCK) for a message: the same on every rank (program b
    of every rank pushes and reads chunk b). Chunks are multiples of 16 elements, so every
    program's start is 16-byte aligned and its accesses can be 16-byte vectors."""
    programs = max(1, min(MAX_PROGRAMS, triton.cdiv(numel * element_size, BYTES_PER_PROGRAM)))
    chunk = triton.cdiv(triton.cdiv(numel, programs), 16) * 16
    programs = triton.cdiv(numel, chunk)
    # A tile is the chunk (one pass) up to 4096 elements, at least one vector per thread.
    smallest = VECTOR_BYTES // element_size * 32 * NUM_WARPS
    block = min(max(triton.next_power_of_2(chunk), smallest), max(4096, smallest))
    return programs, chunk, block


def check_args(x: Tensor, out: Tensor, buffer: Tensor, buffer_ptrs: Tensor, rank: int,
               world: int, residual: Tensor | None, state: Tensor) -> None:
    """ValueError naming what is wrong with a call's arguments (nothing is launched)."""
    if x.dtype not in DTYPES:
        raise ValueError(f"one-shot all-reduce: dtype {x.dtype} is not one of "
                         f"{', '.join(str(d).removeprefix('torch.') for d in DTYPES)}")
    if not 2 <= world <= MAX_WORLD:
        raise ValueError(f"one-shot all-reduce: world size {world} is not in 2..{MAX_WORLD}")
    if not 0 <= rank < world:
        raise ValueError(f"one-shot all-reduce: rank {rank} is not in 0..{world - 1}")
    for name, t in (("out", out), ("residual", residual)):
        if t is None:
            continue
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"one-shot all-reduce: {name} is {t.dtype} {tuple(t.shape)}, "
                             f"x is {x.dtype} {tuple(x.shape)}: they must match")
    for name, t in (("x", x), ("out", out), ("residual", residual)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"one-shot all-reduce: {name} must be contiguous")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"one-shot all-reduce: the symmetric buffer must be a 1-D uint8 "
                         f"tensor, got {buffer.dtype} {tuple(buffer.shape)}")
    nbytes, room = x.numel() * x.element_size(), slot_bytes(buffer.numel(), world)
    if room < nbytes:
        raise ValueError(f"one-shot all-reduce: {nbytes} bytes of x exceed the {room}-byte "
                         f"slot of the {buffer.numel()}-byte symmetric buffer "
                         f"({PHASES} phases x {world} ranks)")
    if buffer_ptrs.dtype != torch.int64 or tuple(buffer_ptrs.shape) != (world,):
        raise ValueError(f"one-shot all-reduce: buffer_ptrs must be int64 of shape "
                         f"({world},), got {buffer_ptrs.dtype} {tuple(buffer_ptrs.shape)}")
    if state.dtype != torch.int32 or tuple(state.shape) != (2,):
        raise ValueError(f"one-shot all-reduce: state must be int32 of shape (2,), got "
                         f"{state.dtype} {tuple(state.shape)}")
    for name, t in (("out", out), ("buffer", buffer), ("buffer_ptrs", buffer_ptrs),
                    ("residual", residual), ("state", state)):
        if t is not None and t.device != x.device:
            raise ValueError(f"one-shot all-reduce: {name} is on {t.device}, x on {x.device}")


def all_reduce(x: Tensor, out: Tensor, buffer: Tensor, buffer_ptrs: Tensor, rank: int,
               world: int, state: Tensor, residual: Tensor | None = None,
               pdl: bool = False) -> Tensor:
    """out = (residual +) the sum of x over `world` ranks; returns out. Collective: every
    rank calls it with the same shape and dtype, in the same order as its other calls.

    x: this rank's partial sum (contiguous); buffer: this rank's symmetric buffer (uint8,
    `clear`ed before the first call, each slot >= x's bytes: `buffer_bytes_for`);
    buffer_ptrs: int64 [world], every rank's buffer address on this device
    (buffer_ptrs[rank] is `buffer`); state: this rank's `new_state`, kept for every call on
    this buffer. pdl: launch with programmatic dependent launch (sm_90+ only; see the
    module docstring).
    """
    check_args(x, out, buffer, buffer_ptrs, rank, world, residual, state)
    n = x.numel()
    if n == 0:
        return out
    programs, chunk, block = launch_plan(n, x.element_size())
    launch(
        _oneshot_kernel, (programs,),
        x, residual if residual is not None else x, out, buffer_ptrs, state, n, chunk,
        slot_bytes(buffer.numel(), world) // x.element_size(), rank, programs,
        WORLD=world, BLOCK=block, HAS_RES=residual is not None,
        WIDE=x.element_size() == 4, USE_PDL=pdl, num_warps=NUM_WARPS,
        **({"launch_pdl": True} if pdl else {}))
    return out


def reference(parts: list[Tensor], residual: Tensor | None = None) -> Tensor:
    """What every rank's `all_reduce` returns, in PyTorch: the float32 sum in rank order,
    rounded to the dtype, then residual + it in the dtype (for parts with no element that
    reads as EMPTY; a float32 0x80008000 is summed as -0.0)."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for p in parts:
        acc += p.float()
    total = acc.to(parts[0].dtype)
    return total if residual is None else residual + total
