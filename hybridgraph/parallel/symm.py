"""The symmetric-memory all-reduce: PyTorch's one-shot kernel behind a staging buffer.

`torch.ops.symm_mem.one_shot_all_reduce` has every rank read every peer's buffer over
NVLink once: one kernel, no ring steps, about half NCCL's time per decode-sized message
inside a CUDA graph (docs/DESIGN.md, parallel). Its input must live in symmetric memory
(allocated by torch's allocator and exchanged once, "rendezvous"), so each group keeps one
preallocated staging buffer per staging dtype and every call copies its message in.
torch's kernels dispatch float32 and bfloat16 only: float16 messages are staged through a
float32 buffer (cast in, summed in float32, cast back), which rounds the same as NCCL's
float16 sum of two ranks and never worse.

`symm_all_reduce` is a torch.library custom op: opaque to Dynamo (a compiled block calls
it as one node, with a fake implementation for shapes), replayable inside CUDA graphs.
A message the staging cannot take (too big, a dtype or size the kernel cannot serve)
goes to NCCL, per call. NVLink multicast stays off (group.SAFE_ENV): the one-shot kernel
reads peers through plain peer mappings, never multicast.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Staging rows: decode batches up to max(max_batch, this) and prefills of up to this many
# tokens (the 10-token TTFT target's, with room) take the one-shot path; bigger messages
# are bandwidth-bound, where NCCL's ring is no worse, and go to NCCL. torch's own
# intra-node all-reduce switches away from one-shot at 256 KB; 64 rows of a 4096-wide
# float32 activation are 1 MB, of an 8192-wide (70B) one 2 MB: small next to the weights.
STAGING_ROWS = 64
# The kernel's vector loads need the message to be a multiple of 4 bytes.
MIN_ALIGN = 4
OP = "hybridgraph::symm_all_reduce"


def staging_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a message of `dtype` is summed in (None: the kernel cannot serve it)."""
    return {torch.float16: torch.float32, torch.bfloat16: torch.bfloat16,
            torch.float32: torch.float32}.get(dtype)


def missing() -> str:
    """Why this torch cannot run the one-shot all-reduce here ("" when it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce"
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError as e:
        return f"torch.distributed._symmetric_memory: {e}"
    return ""


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
    """One group's symmetric buffers, each `numel` elements, keyed by staging dtype."""
    group: dist.ProcessGroup
    name: str                             # the group's name, as the symm_mem ops take it
    numel: int
    buffers: dict[torch.dtype, Tensor]
    fused_copy: bool                      # torch has one_shot_all_reduce_copy

    def refusal(self, x: Tensor) -> str:
        """Why x goes to NCCL instead ("" when the one-shot path takes it)."""
        staged = staging_dtype(x.dtype)
        if staged is None or staged not in self.buffers:
            return f"{x.dtype} is not staged"
        if x.numel() > self.numel:
            return f"{x.numel()} elements exceed the {self.numel}-element staging buffer"
        if x.numel() * self.buffers[staged].element_size() % MIN_ALIGN:
            return f"{x.numel()} {staged} elements are not a multiple of {MIN_ALIGN} bytes"
        if x.device != self.buffers[staged].device:
            return f"x is on {x.device}, the staging on {self.buffers[staged].device}"
        return ""

    def reduce(self, x: Tensor) -> Tensor:
        """The sum of x over the group through the one-shot kernel (x must pass `refusal`)."""
        n = x.numel()
        if n == 0:
            return x.new_empty(x.shape)
        buf = self.buffers[staging_dtype(x.dtype)][:n]   # at offset 0: 16-byte aligned
        # The fused copy needs x laid out like the buffer (contiguous, its start aligned as
        # the buffer's); anything else is copied (and cast) into the buffer first.
        if (self.fused_copy and buf.dtype == x.dtype and x.is_contiguous()
                and x.storage_offset() * x.element_size() % 16 == 0):
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x.view(-1), "sum", self.name)
        else:
            buf.view(x.shape).copy_(x)
            out = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", self.name)
        return out.view(x.shape).to(x.dtype)


# Group name -> its staging: the custom op takes the name (a string, which Dynamo and the
# dispatcher pass through), not the buffers.
_STAGING: dict[str, Staging] = {}


def create(group: dist.ProcessGroup, device: torch.device, numel: int,
           dtypes: Sequence[torch.dtype]) -> Staging:
    """Allocate and rendezvous the staging buffers for messages of `dtypes` up to `numel`
    elements (collective: every rank of `group` calls it with the same arguments).
    Raises where symmetric memory does not work here."""
    why = missing()
    if why:
        raise RuntimeError(why)
    import torch.distributed._symmetric_memory as symm_mem

    name = group.group_name
    enable(name)
    buffers = {}
    for staged in dict.fromkeys(staging_dtype(d) for d in dtypes):
        if staged is None:
            continue
        buf = symm_mem.empty(numel, dtype=staged, device=device)
        buf.zero_()
        symm_mem.rendezvous(buf, name)
        buffers[staged] = buf
    if not buffers:
        raise RuntimeError(f"no dtype of {list(dtypes)} has a one-shot kernel")
    staging = Staging(group, name, numel, buffers,
                      hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"))
    register(staging)
    return staging


def registered(name: str) -> Staging | None:
    return _STAGING.get(name)


def register(staging: Staging) -> None:
    _STAGING[staging.name] = staging


def drop(name: str) -> None:
    _STAGING.pop(name, None)


@torch.library.custom_op(OP, mutates_args=())
def symm_all_reduce(x: Tensor, group_name: str) -> Tensor:
    """Sum x over the group named `group_name` (its staging made by `create`); a fresh
    tensor, x untouched. A message the staging refuses goes to NCCL."""
    staging = _STAGING[group_name]
    if staging.refusal(x):
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=staging.group)
        return out
    return staging.reduce(x)


@symm_all_reduce.register_fake
def _fake(x: Tensor, group_name: str) -> Tensor:
    return x.new_empty(x.shape)   # contiguous, as both real paths return
