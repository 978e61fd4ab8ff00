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
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.launch import launch


@triton.jit(do_not_specialize=["first"])
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
    if not (0 <= first and first + b <= ring.shape[1]) or ring.stride(1) != 1:
        raise ValueError(f"publish: rows {first}..{first + b} outside the ring's "
                         f"{ring.shape[1]} columns")
    launch(_publish_kernel, (1,), ids, pos, active if active is not None else pos, ring, b,
           first, ring.shape[0], ring.stride(0), HAS_ACTIVE=active is not None,
           BLOCK=max(16, triton.next_power_of_2(b)), num_warps=1)
