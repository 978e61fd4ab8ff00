"""The symmetric-memory all-reduce: our one-shot Triton kernel over one symmetric buffer.

`kernels/oneshot.py` sums a message in one launch: every rank pushes its partial sum into
its slot of every peer's symmetric buffer (plain NVLink stores), then reads every source's
slot from its own buffer as the pushes land (the data are the flag: unused slots hold a
pattern no pushed value has), sums in float32 in rank order (bit-identical on every rank),
with an optional residual add fused in. It serves float16, bfloat16 and float32 alike:
nothing is staged through another dtype (torch's `one_shot_all_reduce`, used here before,
has no float16 kernel, which cost a cast in and out around it).

Each group owns ONE symmetric byte buffer (`Staging`), allocated by torch's symmetric
allocator, cleared to that pattern and exchanged once ("rendezvous"): two phases x world
slots, each sized for the largest message in the widest dtype served, shared by every
dtype; beside it an int64 tensor of every rank's buffer address (the kernel turns them
into pointers) and the phase saying which slots are next. We build the addresses from the
handle's `buffer_ptrs` plus our tensor's offset in its block (the symmetric pool may place
it past the block's start; torch's own `*_ptrs_dev` tables hold the block starts only).

`symm_all_reduce` and `symm_all_reduce_add` (residual + the sum) are torch.library custom
ops: opaque to Dynamo (a compiled block calls each as one node, with a fake implementation
for shapes), replayable inside CUDA graphs. A message the buffer refuses (too big, another
dtype or device) goes to NCCL, per call. NVLink multicast stays off (group.SAFE_ENV): the
kernel reads peers through plain peer mappings, never multicast. On sm_90+ the kernel
launches with programmatic dependent launch wherever it runs (kernels/oneshot.py says why
that is safe): after a kernel that never lets it start early it simply starts in order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Buffer rows: decode batches up to max(max_batch, this) and prefills of up to this many
# tokens (the 10-token TTFT target's, with room) take the one-shot path; bigger messages
# are bandwidth-bound, where NCCL's ring is no worse, and go to NCCL. torch's own
# intra-node all-reduce switches away from one-shot at 256 KB; 64 rows of a 4096-wide
# float32 activation are 1 MB, of an 8192-wide (70B) one 2 MB: small next to the weights.
STAGING_ROWS = 64
# The dtypes the kernel sums (kernels/oneshot.DTYPES; repeated so that importing this
# module never imports Triton).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WORLD = 8
# What the kernel needs of a rendezvous handle.
HANDLE_ATTRS = ("buffer_ptrs", "rank", "world_size")
OP = "hybridgraph::symm_all_reduce"
OP_ADD = "hybridgraph::symm_all_reduce_add"


def handle_missing(handle: object) -> str:
    """Why a rendezvous handle (or its class) cannot feed the kernel ("" when it can)."""
    if handle is None:
        return f"torch {torch.__version__} has no _SymmetricMemory"
    lacking = [a for a in HANDLE_ATTRS if not hasattr(handle, a)]
    if lacking:
        return (f"torch {torch.__version__}'s symmetric-memory handle lacks "
                f"{', '.join(lacking)}")
    return ""


def missing() -> str:
    """Why the one-shot kernel cannot run here ("" when it can): no CUDA, no Triton, or a
    torch without symmetric memory or the handle attributes the kernel reads."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from hybridgraph.kernels import triton_import_error

    err = triton_import_error()
    if err is not None:
        return err
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"torch.distributed._symmetric_memory: {e}"
    return handle_missing(getattr(torch._C._distributed_c10d, "_SymmetricMemory", None))


def enable(group_name: str) -> None:
    """Symmetric memory for the group: needed before torch 2.9's implicit enablement,
    deprecated (a FutureWarning) since."""
    import torch.distributed._symmetric_memory as symm_mem

    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group_name)


@dataclass
class Staging:
    """One group's symmetric buffer and the address table the kernel reads."""
    group: dist.ProcessGroup
    name: str                  # the group's name, as the custom ops take it
    buffer: Tensor             # this rank's symmetric buffer, uint8, oneshot.clear'ed
    buffer_ptrs: Tensor        # int64 [world]: every rank's buffer address, on the device
    rank: int
    world: int
    offset: int = 0            # the buffer's byte offset in its symmetric block
    handle: object = None      # the rendezvous handle, kept alive with the buffer
    state: Tensor | None = None  # the kernel's phase and program count (int32 [2], this
    #                              rank's device; oneshot.new_state), made if not given
    pdl: bool = False          # launch with programmatic dependent launch (create: sm_90+)

    def __post_init__(self) -> None:
        if self.state is None:
            from hybridgraph.kernels.oneshot import new_state
            self.state = new_state(self.buffer.device)

    @property
    def nbytes(self) -> int:
        """The largest message in bytes: one slot of the buffer (kernels/oneshot.py)."""
        from hybridgraph.kernels.oneshot import slot_bytes
        return slot_bytes(self.buffer.numel(), self.world)

    def refusal(self, x: Tensor, residual: Tensor | None = None) -> str:
        """Why x goes to NCCL instead ("" when the one-shot kernel takes it)."""
        if x.dtype not in DTYPES:
            return f"{x.dtype} has no one-shot kernel"
        nbytes = x.numel() * x.element_size()
        if nbytes > self.nbytes:
            return f"{nbytes} bytes exceed the {self.nbytes}-byte slot of the symmetric buffer"
        if x.device != self.buffer.device:
            return f"x is on {x.device}, the symmetric buffer on {self.buffer.device}"
        if residual is not None and residual.device != x.device:
            return f"the residual is on {residual.device}, x on {x.device}"
        return ""

    def reduce(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """(residual +) the sum of x over the group, a fresh contiguous tensor (x must pass
        `refusal`; a strided x or residual is copied contiguous first)."""
        from hybridgraph.kernels import oneshot

        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if x.numel() == 0:
            return out
        return oneshot.all_reduce(x.contiguous(), out, self.buffer, self.buffer_ptrs,
                                  self.rank, self.world, self.state,
                                  None if residual is None else residual.contiguous(),
                                  pdl=self.pdl)


def buffer_bytes(numel: int, dtypes: Sequence[torch.dtype]) -> int:
    """Bytes for messages of `numel` elements in the widest of `dtypes` the kernel serves;
    ValueError when it serves none of them."""
    served = [d for d in dtypes if d in DTYPES]
    if not served:
        raise ValueError(f"no dtype of {list(dtypes)} has a one-shot kernel")
    return numel * max(d.itemsize for d in served)


def tables(handle: object, buffer: Tensor) -> tuple[Tensor, int]:
    """(buffer_ptrs, offset) of a rendezvous handle: an int64 address table on the
    buffer's device. The buffer's offset in its block is the same on every rank (the
    ranks allocate alike; `TPGroup._staging` checks it), so every peer's address is its
    block's plus that offset. Raises where the addresses cannot be right."""
    why = handle_missing(handle)
    if why:
        raise RuntimeError(why)
    rank, world = int(handle.rank), int(handle.world_size)
    if not 2 <= world <= MAX_WORLD:
        raise RuntimeError(f"the one-shot kernel serves 2..{MAX_WORLD} ranks, not {world}")
    bases = [int(p) for p in handle.buffer_ptrs]
    if len(bases) != world:
        raise RuntimeError(f"the handle lists {len(bases)} buffers for {world} ranks")
    offset = buffer.data_ptr() - bases[rank]
    size = getattr(handle, "buffer_size", None)
    if offset < 0 or (size is not None and offset + buffer.numel() > int(size)):
        raise RuntimeError(f"the buffer (at {buffer.data_ptr():#x}, {buffer.numel()} bytes) "
                           f"is not inside its symmetric block (at {bases[rank]:#x})")
    ptrs = [b + offset for b in bases]
    if any(p % 16 for p in ptrs):
        raise RuntimeError("symmetric buffers must be 16-byte aligned")
    return torch.tensor(ptrs, dtype=torch.int64, device=buffer.device), offset


# Group name -> its staging: the custom ops take the name (a string, which Dynamo and the
# dispatcher pass through), not the buffers.
_STAGING: dict[str, Staging] = {}


def create(group: dist.ProcessGroup, device: torch.device, numel: int,
           dtypes: Sequence[torch.dtype]) -> Staging:
    """Allocate and rendezvous the symmetric buffer for messages of `dtypes` up to `numel`
    elements (collective: every rank of `group` calls it with the same arguments).
    Raises where symmetric memory or the kernel does not work here. Every rank clears its
    buffer and synchronises its device before the rendezvous, a collective: so no rank's
    first call pushes into a peer's buffer before that peer has cleared it."""
    why = missing()
    if why:
        raise RuntimeError(why)
    import torch.distributed._symmetric_memory as symm_mem

    from hybridgraph.kernels import oneshot
    from hybridgraph.kernels.selfcheck import pdl_supported

    name = group.group_name
    enable(name)
    nbytes = oneshot.buffer_bytes_for(buffer_bytes(numel, dtypes), group.size())
    buf = oneshot.clear(symm_mem.empty(nbytes, dtype=torch.uint8, device=device))
    torch.cuda.synchronize(device)
    handle = symm_mem.rendezvous(buf, name)
    ptrs, offset = tables(handle, buf)
    staging = Staging(group, name, buf, ptrs, int(handle.rank), int(handle.world_size),
                      offset, handle, pdl=pdl_supported(buf.device))
    register(staging)
    return staging


def registered(name: str) -> Staging | None:
    return _STAGING.get(name)


def register(staging: Staging) -> None:
    _STAGING[staging.name] = staging


def drop(name: str) -> None:
    _STAGING.pop(name, None)


def _nccl(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _check_residual(x: Tensor, residual: Tensor) -> None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"symm_all_reduce_add: residual is {residual.dtype} "
                         f"{tuple(residual.shape)}, x {x.dtype} {tuple(x.shape)}: they must match")


@torch.library.custom_op(OP, mutates_args=())
def symm_all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum x over the group named `group_name` (its staging made by `create`); a fresh
    tensor, x untouched. A message the staging refuses goes to NCCL."""
    staging = _STAGING[group_name]
    if staging.refusal(x):
        return _nccl(x, staging.group)
    return staging.reduce(x)


@symm_all_reduce.register_fake
def _fake(x: Tensor, group_name: str) -> Tensor:
    return x.new_empty(x.shape)   # contiguous, as both real paths return


@torch.library.custom_op(OP_ADD, mutates_args=())
def symm_all_reduce_add(x: Tensor, residual: Tensor, group_name: str) -> Tensor:
    """residual + the sum of x over the group, in one kernel (rounded as `residual + sum`
    is: the same bits as symm_all_reduce and then the add); a fresh tensor. A message the
    staging refuses goes to NCCL, then the add."""
    _check_residual(x, residual)
    staging = _STAGING[group_name]
    if staging.refusal(x, residual):
        return _nccl(x, staging.group).add_(residual)   # contiguous, as the fake says
    return staging.reduce(x, residual)


@symm_all_reduce_add.register_fake
def _fake_add(x: Tensor, residual: Tensor, group_name: str) -> Tensor:
    _check_residual(x, residual)
    return x.new_empty(x.shape)
