"""Which decode kernels run, as data: KernelPlan, and the plan as it runs on a device.

One owner for the plan (model/fast_decode.py runs it; the engine, Steps and the benches
build it): which projections ride the Triton GEMV, PDL, the attention's tiling, the fused
feed-forward, and how many rows and prefill tokens the kernels serve. `plan_on` is the one
place the PDL rule lives (it needs sm_90); `check_soon` starts the kernels' self-check
early.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

PROJECTIONS = ("qkv", "wo", "w13", "w2", "head")
MAX_ROWS = 16  # rows one GEMV launch serves (kernels/gemv.py)


@dataclass(frozen=True)
class KernelPlan:
    """Which projections run on the Triton GEMV (the rest on cuBLAS), and whether the
    kernels use programmatic dependent launch (dropped where the GPU lacks it).

    The default is the fastest plan measured on an H100 (docs/KERNELS.md run 6): one row:
    all five projections on the GEMV (its small register tiles beat cuBLAS + the fused
    glue at every llama-2-7b and llama-3.2-1b shape), PDL on with the late trigger; 2-16
    rows: the same, on the tensor-core GEMV (run 13: with QKV and gate/up swapped onto
    Hopper's warpgroup MMA, all five beat QKV and gate/up on cuBLAS + glue at 2, 4 and 16
    rows and in a 10-token prefill).
    """

    gemv: tuple[str, ...] = PROJECTIONS
    gemv_batched: tuple[str, ...] | None = None  # the projections on the GEMV for batches
    #                                         of 2+ rows (tensor-core GEMV); None: as `gemv`
    pdl: bool = True
    pdl_late: bool = True                   # GEMV/attention let the next kernel launch only
    #                                         after their main loop, not at once
    block_t: int = 64                       # keys per attention tile
    attn_warps: int = 4                     # warps per attention program
    attn_splits: int | None = None          # attention splits over keys (None: the rule
    #                                         of kernels/attention.attention_splits)
    prefetch: int | None = None             # L2 lines per weight row each GEMV program
    #                                         prefetches before its PDL wait (None: config's)
    attn_early: bool = True                 # one row: attention lets the O GEMV launch at
    #                                         once (PDL), so O's prefetch overlaps attention
    early_kv: bool | None = None            # decode attention reads earlier steps' keys
    #                                         before its PDL wait, one tile a split (None:
    #                                         attention.early_kv_pays's rule)
    wo_prefetch: int | None = None          # L2 lines per row the one-row O GEMV prefetches
    #                                         (None: gemv_config.idle_prefetch's rule)
    max_rows: int = 16                      # decode batches of up to this many rows run on
    #                                         the kernels; larger ones on the model's blocks
    prefill_rows: int = 16                  # one-prompt prefills of up to this many tokens
    #                                         run on the kernels (`prefill`); 0: none do
    fuse_ffn: bool = True                   # one row: gate/up and down as one launch
    #                                         (kernels/ffn.py), where their configs allow
    glue_prefill: bool = True               # every other prefill on cuBLAS + glue + SDPA
    #                                         (model/fast_prefill.py), not Inductor's block
    prefill_split_k: int = 2048             # there, O and down split over K while each part
    #                                         keeps >= this much of K (fast_prefill.gemm_parts);
    #                                         0: never
    configs: dict[str, object] = field(default_factory=dict)  # projection -> GemvConfig

    def __post_init__(self) -> None:
        unknown = (set(self.gemv) | set(self.gemv_batched or ())) - set(PROJECTIONS)
        if unknown:
            raise ValueError(f"KernelPlan.gemv: unknown projections {sorted(unknown)}; "
                             f"known: {', '.join(PROJECTIONS)}")
        if not 0 <= self.prefill_rows <= MAX_ROWS:  # the GEMV serves at most 16 rows
            raise ValueError(f"KernelPlan.prefill_rows {self.prefill_rows}: must be in "
                             f"[0, {MAX_ROWS}]")

    def uses(self, rows: int) -> tuple[str, ...]:
        """The projections on the GEMV for a batch of `rows` (the rest on cuBLAS)."""
        return self.gemv_batched if rows > 1 and self.gemv_batched is not None else self.gemv


def plan_on(device: torch.device, plan: KernelPlan | None = None) -> KernelPlan:
    """The plan as it runs on `device`: without PDL where the GPU lacks it (it needs sm_90
    or newer). The one place that rule lives: TritonDecode, its self-check and
    triton_decode's reason all take the plan from here."""
    from hybridgraph.kernels.selfcheck import pdl_supported
    plan = plan or KernelPlan()
    return replace(plan, pdl=False) if plan.pdl and not pdl_supported(device) else plan


def check_soon(device: torch.device, dtype: torch.dtype, plan: KernelPlan | None = None,
               ) -> None:
    """Start the self-check `triton_decode` will ask for, on a thread, before the model
    exists (kernels/selfcheck.check_kernels_soon): Engine.load overlaps it with loading."""
    from hybridgraph.kernels.selfcheck import check_kernels_soon
    check_kernels_soon(device, dtype, plan_on(device, plan).pdl)
