"""A decode layer's attention and O projection in one launch: O starts as attention lands.

Launched one after the other, the O GEMV (kernels/gemv.py, EPI_RESID) may pass its PDL
wait only once the whole attention grid has finished and its completion has reached the
waiting programs. Here one grid holds both, as kernels/ffn.py holds gate/up and down.
Programs [0, A) are attention's (row x kv head, split) programs (kernels/attention.py
`attend_item`); each one that stores a (row, kv head)'s output counts it in `ready`
(release). Programs [A, A + T * S) are O's (tile, split) items: each asks the L2 for its
weights, then waits for `ready` to count every (row, kv head) (acquire), then streams its
weights against the attention output and adds the residual.

Why the wait cannot deadlock: the GPU hands out a grid's programs in order, so by the time
an O item waits, every attention program has been handed an SM, and none of them waits on
an O item. The next kernel (PDL) launches only after every program has passed its main
loop. The last O item to finish sets `ready` and its own counter back to zero.

Scratch: attention's partials and combine counters, then O's split partials and tile
counters, share the workspace from its start. They never overlap in time: a combine has
read its partials and reset its counter before it counts its output ready, and O's items
touch the workspace only after every output is ready.

One row only, on O's one-row register config (`fusable`); the caller launches the two
kernels otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from hybridgraph.kernels.attention import attend_item, attention_launch
from hybridgraph.kernels.gemv import _item, _pdl_prologue
from hybridgraph.kernels.gemv_config import EPI_RESID, GemvConfig, n_tiles, workspace_floats
from hybridgraph.kernels.launch import launch
from hybridgraph.kernels.workspace import Workspace

_RESID: tl.constexpr = tl.constexpr(EPI_RESID)
ATTENTION_WARPS = 4  # decode_attention's num_warps: the fused grid's, so O's config's too


@triton.jit
def attn_o_kernel(q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, ws_ptr, cnt_ptr, crow_ptr,
                  stride_crow, scale, WINDOW, KV_HEADS, MAX_SEQ, CHUNK,
                  wo_ptr, res_ptr, out_ptr, N_ATTN, HIDDEN, HD, TILES, K_SPLIT, READY_AT,
                  REP: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, SPLITS: tl.constexpr,
                  USE_PDL: tl.constexpr, HAS_CROW: tl.constexpr, EARLY_KV: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
                  SPLIT_O: tl.constexpr):
    pid = tl.program_id(0)
    ready = cnt_ptr + READY_AT  # past both parts' own counters
    done = ready + 1
    if pid < N_ATTN:
        attend_item(pid // SPLITS, pid % SPLITS, q_ptr, kc_ptr, vc_ptr, pos_ptr, o_ptr, ws_ptr,
                    cnt_ptr, crow_ptr, stride_crow, scale, WINDOW, KV_HEADS, MAX_SEQ, CHUNK,
                    REP, D, D_PAD, BLOCK_R, BLOCK_T, SPLITS, USE_PDL, HAS_CROW, EARLY_KV,
                    ready, True)
    else:
        item = pid - N_ATTN
        _pdl_prologue(item, wo_ptr, HIDDEN, HD, K_SPLIT, TILES, SPLIT_O, 1, _RESID, HALF,
                      PREFETCH, USE_PDL)
        while tl.atomic_add(ready, 0, sem="acquire") < KV_HEADS:
            pass
        _item(item, o_ptr, wo_ptr, wo_ptr, out_ptr, res_ptr, out_ptr, out_ptr, cnt_ptr,
              out_ptr, out_ptr, ws_ptr, cnt_ptr, 1, HIDDEN, HD, K_SPLIT, TILES, 0.0, HD,
              HIDDEN, HIDDEN, 1, 1, 1, 1, cnt_ptr, 0, False, _RESID, SPLIT_O, 1, HALF,
              BLOCK_K, USE_PDL, False, False, False)
        tl.debug_barrier()
        if tl.atomic_add(done, 1, sem="acq_rel") == TILES * SPLIT_O - 1:
            tl.store(ready, 0)  # every O item has passed its wait
            tl.store(done, 0)


def _splits(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K per split, splits) of a config over K, as gemv() computes them."""
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_split, triton.cdiv(k, k_split)


def fusable(cfg: GemvConfig) -> bool:
    """Whether `attention_o` serves O's config: the one-row register path, a program an
    item, attention's warps."""
    return not cfg.dot and cfg.programs == 0 and cfg.num_warps == ATTENTION_WARPS


def workspace_need(hidden: int, heads_d: int, kv_heads: int, cfg: GemvConfig,
                   ) -> tuple[int, int]:
    """(partial floats, counters) one `attention_o` launch uses beyond attention's own."""
    _, split = _splits(heads_d, cfg)
    tiles = n_tiles(EPI_RESID, hidden, cfg.half, 1)
    return workspace_floats(tiles, split, cfg.half, 1), max(tiles, kv_heads) + 2


def attention_o(q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, window: int,
                o: Tensor, wo: Tensor, residual: Tensor, out: Tensor, ws: Workspace,
                cfg: GemvConfig, *, block_t: int = 64, splits: int | None = None,
                pdl: int = 0, cache_rows: Tensor | None = None, early_kv: bool = False,
                ) -> Tensor:
    """out = residual + wo @ attention(q, caches) for ONE row, as decode_attention (into
    o, [1, H*D]) then gemv(EPI_RESID) compute it, in one launch. wo [hidden, H*D];
    residual, out [1, hidden]. The attention arguments and pdl as decode_attention's."""
    hidden, heads_d = wo.shape
    if q.shape != (1, heads_d) or residual.shape != (1, hidden) or out.shape != (1, hidden):
        raise ValueError(f"attention_o: one row of q {tuple(q.shape)} against wo "
                         f"{tuple(wo.shape)}, residual {tuple(residual.shape)} and out "
                         f"{tuple(out.shape)}")
    if not fusable(cfg):
        raise ValueError(f"attention_o: O's config {cfg} cannot share attention's launch")
    for t in (q, o, wo, residual, out):
        if not t.is_contiguous():
            raise ValueError("attention_o: every tensor must be contiguous")
    grid, args, meta = attention_launch(q, k_cache, v_cache, pos, window, o, ws,
                                        block_t=block_t, splits=splits, pdl=pdl,
                                        cache_rows=cache_rows, early_kv=early_kv)
    k_split, split = _splits(heads_d, cfg)
    tiles = n_tiles(EPI_RESID, hidden, cfg.half, 1)
    floats, counters = workspace_need(hidden, heads_d, k_cache.shape[1], cfg)
    ws.check(floats, counters, "attention_o")
    n_attn = grid[0] * grid[1]
    extra = {"launch_pdl": True} if pdl else {}
    launch(attn_o_kernel, (n_attn + tiles * split,), *args, wo, residual, out, n_attn,
           hidden, heads_d, tiles, k_split, counters - 2, **meta, HALF=cfg.half,
           BLOCK_K=cfg.block_k, PREFETCH=cfg.prefetch, SPLIT_O=split,
           num_warps=ATTENTION_WARPS, num_stages=cfg.num_stages, **extra)
    return out
