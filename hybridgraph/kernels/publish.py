"""A step's tokens to the host from inside its CUDA graph: one store into page-locked memory.

The host reads each step's tokens. Copied out after the graph (a device-to-host memcpy on
the stream), they cost a one-row tinyllama step 13 µs between its last kernel and the next
step's first (the copy waits for the graph to finish, then the next graph for the copy),
against 1.8 µs between graphs replayed with no copy: 1009 against 994 µs a token on one
H100 (scripts/step_probe.py). Here the step's last launch stores the tokens itself into
page-locked host memory, which the GPU addresses directly (unified addressing), so the next
graph follows at once and the host waits on the step's event as before.

Token j of the launch, at position pos[j], goes to ring[pos[j] % SLOTS, first + j]: the
host knows every row's positions, so it knows where each token lands without a counter on
the device (runtime/step.py StepBuffers.publish, TokenReader.read).

Two ways in: `publish`, a launch of its own after any sampler; and `Finish`, which the
greedy argmax (kernels/argmax.py) carries out in the program that settles each row's token
(`finish_row`), advancing the row's position and publishing it there: a greedy step then
ends in one launch where it took three (`pos + active`, argmax, publish).
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.launch import launch


class Finish(NamedTuple):
    """What a greedy launch does with row j's token t besides writing it (kernels/argmax.py):
    pos_out[first + j] = pos_in[j] + step, where step is active[j] (None: 1), then, where
    step != 0, ring[pos_out[first + j] % slots, first + j] = t. pos_out and the token
    buffer are the step's whole buffers, indexed from `first` inside the kernel, so a
    prefill landing on any row launches the one compiled kernel (a sliced pointer would
    compile another for its alignment, mid-serving)."""

    pos_in: Tensor            # [B] int64: the position before the step
    pos_out: Tensor           # [width] int64
    ring: Tensor              # [slots, width] int64, where the GPU can store
    first: int
    active: Tensor | None = None  # [B] int64: 0 holds the row (no advance, no publish)


def check_ring(ring: Tensor, first: int, rows: int) -> None:
    if not (0 <= first and first + rows <= ring.shape[1]) or ring.stride(1) != 1:
        raise ValueError(f"publish: rows {first}..{first + rows} outside the ring's "
                         f"{ring.shape[1]} columns")


@triton.jit
def finish_row(row, tok, first, pos_in_ptr, pos_out_ptr, act_ptr, ring_ptr, slots, width,
               HAS_ACTIVE: tl.constexpr):
    """Finish (above) for one row: a scalar token, called by the one program owning it."""
    p = tl.load(pos_in_ptr + row)
    if HAS_ACTIVE:
        step = tl.load(act_ptr + row)
        p = p + step
        tl.store(pos_out_ptr + first + row, p)
        tl.store(ring_ptr + (p % slots) * width + first + row, tok, mask=step != 0)
    else:
        p = p + 1
        tl.store(pos_out_ptr + first + row, p)
        tl.store(ring_ptr + (p % slots) * width + first + row, tok)


# ids, pos and active are a prefill's rows of the step buffers, starting anywhere: not
# specialized on their alignment (nor `first` on its value), so no row compiles anew.
@triton.jit(do_not_specialize=["first", "ids_ptr", "pos_ptr", "act_ptr"])
def _publish_kernel(ids_ptr, pos_ptr, act_ptr, ring_ptr, b, first, slots, width,
                    HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    live = r < b
    if HAS_ACTIVE:  # a masked row's position stays put: its slot holds a token still unread
        live = live & (tl.load(act_ptr + r, mask=live, other=0) != 0)
    p = tl.load(pos_ptr + r, mask=live, other=0)
    t = tl.load(ids_ptr + r, mask=live, other=0)
    tl.store(ring_ptr + (p % slots) * width + first + r, t, mask=live)


def publish(ids: Tensor, pos: Tensor, ring: Tensor, first: int,
            active: Tensor | None = None) -> None:
    """ring[pos[j] % ring.shape[0], first + j] = ids[j] for each row j (where active[j] != 0
    if active is given). ids, pos, active: [B] int64 on the GPU; ring: [slots, width] int64,
    page-locked host memory (or any memory the GPU can address)."""
    b = ids.shape[0]
    check_ring(ring, first, b)
    launch(_publish_kernel, (1,), ids, pos, active if active is not None else pos, ring, b,
           first, ring.shape[0], ring.stride(0), HAS_ACTIVE=active is not None,
           BLOCK=max(16, triton.next_power_of_2(b)), num_warps=1)
