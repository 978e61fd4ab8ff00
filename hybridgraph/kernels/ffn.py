"""A decode layer's feed-forward in one launch: down's splits start as their inputs land.

The feed-forward of one row is two GEMVs (kernels/gemv.py): gate/up (RMSNorm in,
h = silu(gate) * up out, width I) and down (h in, + residual out; on a tensor-parallel
rank, whose partial sum is all-reduced before the add, plain out). Launched one after the
other, down may start only when the whole of gate/up has finished (PDL's wait is
grid-wide), so gate/up's last wave, the release and down's ramp run with HBM part idle.

Here one grid holds both. Programs [0, T1) are gate/up's tiles (each writes HALF1 rows of
h), programs [T1, T1 + T2 * S) down's (tile, split) items, split 0 first. Down's split s
reads only h[s * K_SPLIT2, (s + 1) * K_SPLIT2), so once a gate/up tile has stored its rows
it bumps ready[s] for its split (release), and down's items of split s wait for ready[s]
to count every tile of their slice (acquire) before they read h. While they wait they
have already asked the L2 for their own weights. Split 0's inputs are the first tiles
gate/up finishes, so down's first items stream while gate/up's last wave still runs.

Why the waits cannot deadlock: the GPU hands out a grid's programs in order, so by the
time a down item runs, every gate/up tile has been handed an SM (running or done), and
none of them waits on anything. The next kernel (PDL) launches only after every program
here has passed its main loop, so it cannot take an SM a gate/up tile still needs.
The last down item to finish sets ready[] and its own counter back to zero, as every
split kernel leaves its counters (workspace.py).

One row only, on the register GEMV with gate/up unsplit over K (every preset's rule);
`fusable` says when, and the caller launches the two GEMVs otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.gemv import _item, _pdl_prologue
from hybridgraph.kernels.gemv_config import (
    EPI_PLAIN,
    EPI_RESID,
    EPI_SILU,
    GemvConfig,
    k_splits,
    n_tiles,
    workspace_floats,
)
from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace

_SILU: tl.constexpr = tl.constexpr(EPI_SILU)


@triton.jit
def ffn_kernel(x_ptr, w13_ptr, normw_ptr, h_ptr, w2_ptr, res_ptr, out_ptr, ws_ptr, cnt_ptr,
               INTER, H, eps, TILES1, TILES2, K_SPLIT2,
               HALF1: tl.constexpr, BLOCK_K1: tl.constexpr, PREFETCH1: tl.constexpr,
               HALF2: tl.constexpr, BLOCK_K2: tl.constexpr, PREFETCH2: tl.constexpr,
               SPLIT2: tl.constexpr, USE_PDL: tl.constexpr, EPI2: tl.constexpr):
    pid = tl.program_id(0)
    ready = cnt_ptr + TILES2  # down's split-K tile counters come first, then ready[SPLIT2]
    done = ready + SPLIT2     # then the count of down items finished
    if pid < TILES1:  # gate/up tile pid: h[pid * HALF1 : (pid + 1) * HALF1]
        _pdl_prologue(pid, w13_ptr, INTER, H, H, TILES1, 1, 1, _SILU, HALF1, PREFETCH1,
                      USE_PDL)
        _item(pid, x_ptr, w13_ptr, normw_ptr, h_ptr, h_ptr, h_ptr, h_ptr, cnt_ptr, h_ptr,
              h_ptr, ws_ptr, cnt_ptr, 1, INTER, H, H, TILES1, eps, H, INTER, 0, 1, 1, 1, 1, cnt_ptr,
              0, True, _SILU, 1, 1, HALF1, BLOCK_K1, USE_PDL, False, False, False)
        tl.debug_barrier()  # every thread's rows of h are stored before ready[] moves
        tl.atomic_add(ready + (pid * HALF1) // K_SPLIT2, 1, sem="release")
    else:
        item = pid - TILES1
        s = item // TILES2
        _pdl_prologue(item, w2_ptr, H, INTER, K_SPLIT2, TILES2, SPLIT2, 1, EPI2, HALF2,
                      PREFETCH2, USE_PDL)
        # The gate/up tiles writing this split's slice of h (K_SPLIT2 % HALF1 == 0).
        need = tl.minimum(tl.cdiv((s + 1) * K_SPLIT2, HALF1), TILES1) - s * K_SPLIT2 // HALF1
        while tl.atomic_add(ready + s, 0, sem="acquire") < need:
            pass
        _item(item, h_ptr, w2_ptr, w2_ptr, out_ptr, res_ptr, out_ptr, out_ptr, cnt_ptr,
              out_ptr, out_ptr, ws_ptr, cnt_ptr, 1, H, INTER, K_SPLIT2, TILES2, eps, INTER, H, H,
              1, 1, 1, 1, cnt_ptr, 0, False, EPI2, SPLIT2, 1, HALF2, BLOCK_K2, USE_PDL,
              False, False, False)
        tl.debug_barrier()
        if tl.atomic_add(done, 1, sem="acq_rel") == TILES2 * SPLIT2 - 1:
            for j in tl.static_range(SPLIT2):  # every down item has passed its wait
                tl.store(ready + j, 0)
            tl.store(done, 0)


def fusable(hidden: int, inter: int, cfg13: GemvConfig, cfg2: GemvConfig) -> bool:
    """Whether `ffn` serves these configs: both on the register path (one row), gate/up
    unsplit over K, and down's splits holding whole gate/up tiles."""
    k_split2, _ = k_splits(inter, cfg2)
    return (not cfg13.dot and not cfg2.dot and k_splits(hidden, cfg13)[1] == 1
            and k_split2 % cfg13.half == 0 and cfg13.programs == 0 and cfg2.programs == 0
            and cfg13.num_warps == cfg2.num_warps)


def workspace_need(hidden: int, cfg2: GemvConfig, inter: int) -> tuple[int, int]:
    """(partial floats, counters) one `ffn` launch uses."""
    _, split2 = k_splits(inter, cfg2)
    tiles2 = n_tiles(EPI_RESID, hidden, cfg2.half, 1)
    return workspace_floats(tiles2, split2, cfg2.half, 1), tiles2 + split2 + 1


def ffn(x: Tensor, w13: Tensor, norm_w: Tensor, w2: Tensor, residual: Tensor | None,
        h: Tensor, out: Tensor, ws: Workspace, cfg13: GemvConfig, cfg2: GemvConfig, *,
        eps: float = 1e-5, pdl: int = 0) -> Tensor:
    """out = residual + w2 @ (silu(g) * u), [g; u] = w13 @ rmsnorm(x) (norm_w, eps), for
    ONE row: x, residual, out [1, H]; w13 [2I, H]; w2 [H, I]; h [1, I] receives
    silu(g) * u. Computes what gemv(EPI_SILU) then gemv(EPI_RESID) compute, in one launch;
    residual None: out = w2 @ h, as gemv(EPI_PLAIN). pdl as gemv's."""
    hidden, inter = x.shape[1], w2.shape[1]
    if x.shape[0] != 1 or w13.shape != (2 * inter, hidden) or w2.shape[0] != hidden:
        raise ValueError(f"ffn: one row of x {tuple(x.shape)} against w13 "
                         f"{tuple(w13.shape)} and w2 {tuple(w2.shape)}")
    if not fusable(hidden, inter, cfg13, cfg2):
        raise ValueError(f"ffn: configs {cfg13} / {cfg2} cannot share a launch")
    for t in (x, w13, w2, residual, h, out):
        if t is not None and not t.is_contiguous():
            raise ValueError("ffn: every tensor must be contiguous")
    k_split2, split2 = k_splits(inter, cfg2)
    tiles1 = n_tiles(EPI_SILU, inter, cfg13.half, 1)
    tiles2 = n_tiles(EPI_RESID, hidden, cfg2.half, 1)
    floats, counters = workspace_need(hidden, cfg2, inter)
    ws.check(floats, counters, "ffn")
    extra = {"launch_pdl": True} if pdl else {}
    launch(ffn_kernel, (tiles1 + tiles2 * split2,),
           x, w13, norm_w, h, w2, out if residual is None else residual, out, ws.partials,
           ws.counters,
           inter, hidden, eps, tiles1, tiles2, k_split2,
           HALF1=cfg13.half, BLOCK_K1=cfg13.block_k, PREFETCH1=cfg13.prefetch,
           HALF2=cfg2.half, BLOCK_K2=cfg2.block_k, PREFETCH2=cfg2.prefetch,
           SPLIT2=split2, USE_PDL=int(pdl), EPI2=EPI_RESID if residual is not None else EPI_PLAIN,
           num_warps=cfg13.num_warps,
           num_stages=cfg13.num_stages, **extra)
    return out
