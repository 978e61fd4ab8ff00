"""The two step functions and the static buffers they read and write.

A step reads only `StepBuffers` and writes its result back into them, so the very same
function runs eagerly or is captured once and replayed: the buffers' addresses never
change. Sizes are fixed once for (max_batch, max_seq); a step on batch bucket b uses
rows [:b].

Two buffers let rows be chosen at run time (continuous batching), with no new graphs:
`rows` names the cache rows a prefill writes, and `active` masks decode rows, 0 holding
a row's position still so a free or finished row inside a bucket never walks past the
cache. Both are device tensors with a host mirror, so setting them to what they already
hold (always, for a lone request) costs no copy and no launch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from hybridgraph.kernels import triton_import_error
from hybridgraph.model.llama import Block, Transformer
from hybridgraph.runtime.dynamic import Sampler, fit_to_bucket, lazy_compile

if TYPE_CHECKING:
    from hybridgraph.model.fast_decode import TritonDecode
    from hybridgraph.model.kernel_plan import KernelPlan

log = logging.getLogger(__name__)

KERNELS = ("inductor", "triton")
SamplingRow = tuple[float, int, float, int]   # temperature, top_k, top_p, seed
GREEDY: SamplingRow = (0.0, 0, 1.0, 0)        # argmax: the other three are never read
# The token ring: the token at position p of row r lands in slot p % TOKEN_SLOTS. A row's
# tokens launched but not yet read by the host must stay fewer than this (the engine and
# the scheduler keep one or two).
TOKEN_SLOTS = 8


class StepBuffers:
    def __init__(self, max_batch: int, max_seq: int, device: torch.device) -> None:
        i64 = dict(dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.prompt_ids = torch.zeros(max_batch, max_seq, **i64)
        self.last_idx = torch.zeros(max_batch, **i64)    # last real prompt index per row
        self.ids = torch.zeros(max_batch, **i64)         # the newest token of each row
        self.pos = torch.zeros(max_batch, **i64)         # its position
        self.temperature = torch.zeros(max_batch, **f32)
        self.top_k = torch.zeros(max_batch, **i64)
        self.top_p = torch.ones(max_batch, **f32)
        self.seed = torch.zeros(max_batch, **i64)
        self.rows = torch.arange(max_batch, **i64)       # cache row of each prefill row
        self.active = torch.ones(max_batch, **i64)       # 1: decodes; 0: position held
        self.max_batch, self.device = max_batch, device
        self.first_row, self._active = 0, [1] * max_batch  # host mirrors of the two above
        self._sampling = [GREEDY] * max_batch              # ... and of the four above those
        # Each step's tokens for the host (`publish`). On CUDA: page-locked host memory the
        # step's own kernel writes from inside its graph (kernels/publish.py: no copy after
        # the graph); where Triton cannot run, a device ring the reader copies after each
        # step; on the CPU the host ring itself.
        self.kernel_ring = device.type == "cuda" and triton_import_error() is None
        self.ring = torch.zeros(TOKEN_SLOTS, max_batch, dtype=torch.int64,
                                device="cpu" if self.kernel_ring else device,
                                pin_memory=self.kernel_ring)
        # A prefill's prompt and last indices are staged on the host (page-locked on CUDA)
        # and copied in one asynchronous copy each (`load_prompts`); `_staged` marks the
        # last copy out of the staging, which must run before it is refilled.
        pin = device.type == "cuda"
        self._stage_ids = torch.zeros(max_batch * max_seq, dtype=torch.int64, pin_memory=pin)
        self._stage_last = torch.zeros(max_batch, dtype=torch.int64, pin_memory=pin)
        self._staged = torch.cuda.Event() if pin else None

    def publish(self, ids: Tensor, pos: Tensor, first: int, active: Tensor | None = None,
                ) -> None:
        """Row first + j's new token ids[j], at position pos[j], into the token ring (only
        rows with active[j] != 0 where active is given: a masked row's slot still holds its
        last token, unread). Part of the step: inside its graph where it has one."""
        if self.kernel_ring:
            from hybridgraph.kernels.publish import publish
            publish(ids, pos, self.ring, first, active)
            return
        slot = pos % TOKEN_SLOTS
        cols = torch.arange(first, first + ids.shape[0], device=ids.device)
        if active is not None:
            ids = torch.where(active != 0, ids, self.ring[slot, cols])
        self.ring[slot, cols] = ids

    def load_prompts(self, prompts: Sequence[Sequence[int]], rows: int, cols: int,
                     pad_id: int) -> list[int]:
        """Prompts fitted to [rows, cols] (dynamic.fit_to_bucket) into prompt_ids[:rows,
        :cols], their last indices into last_idx[:rows]; returns the last indices. Filled
        in place in the host staging and copied without waiting for the GPU: one set of
        page-locked tensors for the buffers' life instead of two made per prefill (host
        time from _prefill to the graph's launch 145 -> 71-141 µs on an H100 machine, whose
        host speed moves ~2x between processes; scripts/ttft_probe.py --stamps). Waits
        only for the previous copy out of the staging (long done, unless still queued)."""
        if rows > self.max_batch or cols > self.prompt_ids.shape[1]:
            raise ValueError(f"[{rows}, {cols}] prompts exceed the buffers' "
                             f"[{self.max_batch}, {self.prompt_ids.shape[1]}]")
        if self._staged is not None:
            self._staged.synchronize()
        ids = self._stage_ids[:rows * cols].view(rows, cols)
        last = fit_to_bucket(prompts, ids.numpy(), self._stage_last.numpy(), pad_id)
        cuda = self._staged is not None
        self.prompt_ids[:rows, :cols].copy_(ids, non_blocking=cuda)
        self.last_idx[:rows].copy_(self._stage_last[:rows], non_blocking=cuda)
        if self._staged is not None:
            self._staged.record()
        return last

    def set_sampling(self, first: int, params: Sequence[SamplingRow]) -> None:
        """(temperature, top_k, top_p, seed) of rows first.. (a greedy row: GREEDY). Copied
        only where they differ from what the rows hold, page-locked and asynchronous on
        CUDA: a repeat greedy request copies nothing, so its prefill graph launches sooner
        (four blocking copies cost ~210 µs of host time per request on an H100 machine)."""
        at = slice(first, first + len(params))
        if self._sampling[at] == list(params):
            return
        cuda = self.device.type == "cuda"
        temperature, top_k, top_p, seed = zip(*params, strict=True)
        for buf, vals in ((self.temperature, temperature), (self.top_k, top_k),
                          (self.top_p, top_p), (self.seed, seed)):
            buf[at].copy_(torch.tensor(vals, dtype=buf.dtype, pin_memory=cuda),
                          non_blocking=cuda)
        self._sampling[at] = list(params)

    def set_prefill_rows(self, first: int) -> None:
        """Prefill row i writes cache row first + i (rows past the end wrap; a prefill of
        b prompts must have first + b <= max_batch)."""
        if not 0 <= first < self.max_batch:
            raise ValueError(f"first row {first} outside [0, {self.max_batch})")
        if first != self.first_row:
            rows = (torch.arange(self.max_batch) + first) % self.max_batch
            self.rows.copy_(rows.to(self.device, non_blocking=True))
            self.first_row = first

    def set_active(self, mask: list[int]) -> None:
        """mask[r] in {0, 1} for every row r < max_batch."""
        if len(mask) != self.max_batch:
            raise ValueError(f"active mask of {len(mask)} rows; the buffers hold {self.max_batch}")
        if mask != self._active:
            self.active.copy_(torch.tensor(mask, dtype=torch.int64).to(self.device,
                                                                        non_blocking=True))
            self._active = list(mask)

    def snapshot(self) -> tuple[Tensor, ...]:
        return self.ids.clone(), self.pos.clone(), self.last_idx.clone()

    def restore(self, snap: tuple[Tensor, ...]) -> None:
        self.ids.copy_(snap[0])
        self.pos.copy_(snap[1])
        self.last_idx.copy_(snap[2])


_COMPILED_BLOCKS: dict[str, Callable[..., Tensor]] = {}


def compiled_blocks() -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    """Block.prefill and Block.decode under torch.compile, built once per process.

    Compiling one block rather than the whole model: every layer has the same code and
    shapes, so all of them share one compilation and start-up doesn't grow with depth.
    Inductor fuses each block's norms, RoPE, SwiGLU and attention glue into a few kernels;
    captured in a graph, that is most of the gap to the bandwidth floor. dynamic=True:
    one compilation serves every bucket shape.
    """
    if not _COMPILED_BLOCKS:
        # No duck sizing: a batch equal to max_batch would otherwise be tied to the size of
        # the step buffer it is a view of (`pos`), and compile once more. The blocks are
        # this process's only dynamic compiles (the samplers are static), so this is theirs.
        fx_config.use_duck_shape = False
        # Built at the first call (lazy_compile): not imported where kernels serve all.
        _COMPILED_BLOCKS["prefill"] = lazy_compile(Block.prefill, dynamic=True, fullgraph=True)
        _COMPILED_BLOCKS["decode"] = lazy_compile(Block.decode, dynamic=True, fullgraph=True)
    return _COMPILED_BLOCKS["prefill"], _COMPILED_BLOCKS["decode"]


class Steps:
    """Forward and finish halves of prefill and decode over one model and its buffers.

    `forward_*` is the static part (the transformer); `finish_*` samples and advances the
    state (the dynamic part). Modes differ only in which halves are graph-captured, and
    whether the forward's blocks are compiled.

    kernels="triton" runs the decode blocks on the Triton kernels (model/fast_decode.py)
    when they pass their self-check on this device, and the prefills on them too
    (`forward_prefill`), else falls back to the blocks above and logs why; `self.kernels`
    is what runs, `self.kernels_reason` why. `plan` (a KernelPlan) picks projections, PDL
    and the prefill paths; None takes the default.
    """

    def __init__(self, model: Transformer, bufs: StepBuffers, compile_forward: bool = False,
                 kernels: str = "inductor", plan: KernelPlan | None = None,
                 check: bool = True) -> None:
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
        self.model, self.bufs = model, bufs
        self.prefill_block, self.decode_block = (
            compiled_blocks() if compile_forward else (Block.prefill, Block.decode))
        self.kernels, self.kernels_reason = "inductor", "asked for"
        self.fast: TritonDecode | None = None  # the kernel decode in use, if any
        if kernels == "triton":
            from hybridgraph.model.fast_decode import triton_decode

            fast, reason = triton_decode(model, bufs.ids.shape[0], plan, check)
            self.kernels_reason = reason
            if fast is None:
                self._refuse(reason)
            else:
                self.fast, self.kernels = fast, "triton"
                if fast.rows < bufs.ids.shape[0]:
                    self.kernels_reason += (f"; batches of more than {fast.rows} rows decode "
                                            "on the " + ("compiled" if compile_forward else
                                                         "eager") + " blocks")
                log.info("decoding with the Triton kernels: %s", reason)

    def confirm_kernels(self) -> bool:
        """For Steps built with check=False: wait for the kernels' self-check; where it
        failed, drop them (the blocks serve every step) and say why. True while the
        kernels serve."""
        if self.fast is None:
            return False
        ok, reason = self.fast.check()
        if not ok:
            self.fast, self.kernels, self.kernels_reason = None, "inductor", reason
            self._refuse(reason)
        return ok

    def _refuse(self, reason: str) -> None:
        log.warning("Triton decode kernels not used, decoding with the %s blocks: %s",
                    "eager" if self.decode_block is Block.decode else "compiled", reason)

    def forward_prefill(self, b: int, t: int) -> Tensor:
        """Logits [b, V] of each prompt's last token. Where the Triton kernels are in use,
        one prompt of at most KernelPlan.prefill_rows tokens runs on the decode kernels (it
        is weight-bound like a decode step) and any other prefill on cuBLAS + glue +
        FlashAttention (KernelPlan.glue_prefill: no torch.compile); else on the model's
        prefill blocks."""
        s = self.bufs
        fast = self.fast
        if fast is not None and b == 1 and t <= fast.prefill_rows:
            return fast.prefill(s.prompt_ids[0, :t], s.rows[:1], s.last_idx[:1])
        if fast is not None and fast.plan.glue_prefill:
            from hybridgraph.model.fast_prefill import glue_prefill
            return glue_prefill(fast, s.prompt_ids[:b, :t], s.rows[:b], s.last_idx[:b])
        return self.model.prefill(s.prompt_ids[:b, :t], s.last_idx[:b],
                                  block=self.prefill_block, rows=s.rows[:b])

    def forward_decode(self, b: int, window: int) -> Tensor:
        if self.fast is not None and b <= self.fast.rows:
            return self.fast.forward(self.bufs.ids[:b], self.bufs.pos[:b], window)
        return self.model.decode(self.bufs.ids[:b], self.bufs.pos[:b], window,
                                 block=self.decode_block)

    def finish_prefill(self, logits: Tensor, b: int, sampler: Sampler) -> None:
        """Sample token 0 of prefill rows [:b] into the rows the prefill wrote (from
        `set_prefill_rows`, a host int: plain slices, no gathers), with their parameters.
        Besides the sampler's, two launches: the positions, written first (they are the
        sampler's counter), and the publish for the host; the sampler writes the tokens into
        the buffer itself. Greedy on the kernels: all of it in the argmax's one launch."""
        s = self.bufs
        if self._greedy_kernel(sampler):
            from hybridgraph.kernels.publish import Finish
            assert self.fast is not None
            self.fast.greedy_finish(logits, s.ids, Finish(s.last_idx[:b], s.pos, s.ring,
                                                          s.first_row))
            return
        rows = slice(s.first_row, s.first_row + b)
        new_pos = torch.add(s.last_idx[:b], 1, out=s.pos[rows])
        tok = sampler(logits, s.temperature[rows], s.top_k[rows], s.top_p[rows], s.seed[rows],
                      new_pos, out=s.ids[rows])
        s.publish(tok, new_pos, s.first_row)

    def finish_decode(self, logits: Tensor, b: int, sampler: Sampler) -> None:
        # `pos + active` rather than `pos + 1`: the same one kernel, and a masked row's
        # position stays put. Its newest-token slot is scratch (overwritten) until a
        # prefill sets it again, right before the row turns active. Advanced in place
        # first: the new position is the sampler's counter (a request's draws depend on its
        # seed and where it is, never on which mode or graph computed them).
        s = self.bufs
        if self._greedy_kernel(sampler):  # the same three steps in the argmax's launch
            from hybridgraph.kernels.publish import Finish
            assert self.fast is not None
            self.fast.greedy_finish(logits, s.ids, Finish(s.pos[:b], s.pos, s.ring, 0,
                                                          s.active[:b]))
            return
        new_pos = s.pos[:b].add_(s.active[:b])
        tok = sampler(logits, s.temperature[:b], s.top_k[:b], s.top_p[:b], s.seed[:b],
                      new_pos, out=s.ids[:b])
        s.publish(tok, new_pos, 0, s.active[:b])

    def _greedy_kernel(self, sampler: Sampler) -> bool:
        """True where `sampler` is the kernels' argmax (the Engine installs it under the
        compile backend) and the ring is the kernels' to write: then the finish is the
        argmax's one launch (`TritonDecode.greedy_finish`), where it is otherwise three."""
        fast = self.fast
        return fast is not None and self.bufs.kernel_ring and sampler == fast.greedy


class TokenReader:
    """Reads the tokens a launch published (StepBuffers.publish) once the launch is done:
    `push` marks launch i as enqueued, `read` waits for it and picks each row's token by
    its position. Launch numbers index a ring of `slots` events, so at most `slots`
    launches may be in flight unread."""

    def __init__(self, bufs: StepBuffers, slots: int = 4) -> None:
        self.bufs, self.slots = bufs, slots
        self.cuda = bufs.device.type == "cuda"
        self.events = [torch.cuda.Event() for _ in range(slots)] if self.cuda else []
        ring = bufs.ring
        # Where the ring is on the GPU (no Triton), a page-locked copy of it, refreshed
        # after each launch.
        self.host = ring if ring.device.type == "cpu" else torch.zeros(
            ring.shape, dtype=ring.dtype, pin_memory=True)
        self._np = self.host.numpy()  # reads of single tokens without tensor indexing

    def push(self, i: int) -> None:
        """Launch i (a prefill or decode step) has been enqueued."""
        if self.host is not self.bufs.ring:
            self.host.copy_(self.bufs.ring, non_blocking=True)
        if self.cuda:
            self.events[i % self.slots].record()

    def read(self, i: int, rows: Sequence[int], positions: Sequence[int]) -> list[int]:
        """The tokens launch i produced for `rows`, at `positions` (one each)."""
        if self.cuda:
            self.events[i % self.slots].synchronize()
        return [int(self._np[p % TOKEN_SLOTS, r]) for r, p in zip(rows, positions, strict=True)]
