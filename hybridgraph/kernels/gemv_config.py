"""The GEMV's launch configuration and the rules that pick it (kernels/gemv.py runs it).

One owner for the tiling arithmetic the launcher, the decode blocks (sizing their split-K
workspace) and the benches share: what a config is, which config a projection gets for one
row and for a batch of rows, and how many tiles and workspace floats a config makes.
"""

from __future__ import annotations

from typing import NamedTuple

import triton

EPI_PLAIN, EPI_RESID, EPI_SILU, EPI_ROPE = 0, 1, 2, 3


class GemvConfig(NamedTuple):
    half: int = 32         # rows per row set (a program owns 2 * half rows)
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: int = 4      # 128-byte lines per weight row prefetched before the PDL wait
    programs: int = 0      # grid size; 0: one program per (tile, split), else persistent
    dot: bool = True       # False: one-row launches multiply in registers, not on tensor cores
    swap: bool = False     # tensor cores: W @ x^T (weights on the MMA's M side), not x @ W^T


def default_config(n: int, k: int, sms: int = 132, epi: int = EPI_PLAIN,
                   norm: bool = False, d_half: int = 64, rows: int = 1) -> GemvConfig:
    """The config that measured best for `rows` rows of an [n, k] projection on an H100.
    n is the output width (for EPI_SILU: the intermediate size).

    One row (docs/KERNELS.md run 6: llama-2-7b, llama-3.2-1b): every projection streams
    fastest on the register path with small tiles: 4 warps, 256 of K a step, 16 rows a
    program (32 where the projection has tiles enough to keep >= 4.5 programs per SM busy,
    and always for QKV, whose RoPE pairs want them), split over K until there are >= 2.5
    programs per SM (each split keeping >= 512 of K). Except gate/up (EPI_SILU): 16 rows
    and 1024 of K a step (run 21 took it to 512: llama-3.2-1b 1.116 -> 1.098 ms; run 25,
    once each thread summed its own 8 products and the registers that held a whole tile
    of products were free: 1024, llama-2-7b ~4.96 -> 4.88 ms, llama-3.2-1b 1.065 -> 1.047,
    tinyllama 1.036 -> 1.009, one H100, whole forward).

    2-16 rows run on the tensor cores (KERNELS.md runs 7 and 13, sweeps at 10 rows).
    Projections with the RMSNorm prologue (QKV, gate/up, LM head) swap the product's sides
    (W @ x^T: the weight tile is the MMA's M side, so Hopper's warpgroup MMA takes it):
    128 rows a set, 64 of K a step, pipelined 4 deep, split over K (`batched_split`:
    llama-3.2-1b's QKV, 48 tiles, 20.8 -> 12.6 us at 10 rows split in two; llama-2-7b's,
    96 tiles, never split; a tensor-parallel rank's narrower ones as far as one wave
    allows). Those without (O and down)
    keep x @ W^T on 32-row sets, 128 of K a step, 3 deep, split 4 over K (keeping >= 512
    of K a split): swapped they tied.
    """
    if rows > 1:
        if norm:
            split = batched_split(config_tiles(epi, n, 128, d_half), k, sms)
            return GemvConfig(half=128, block_k=64, split_k=split, num_warps=4,
                              num_stages=4, swap=True)
        split = 4
        while split > 1 and k // split < 512:
            split //= 2
        return GemvConfig(half=32, block_k=128, split_k=split, num_warps=4, num_stages=3)
    half = 16 if epi == EPI_ROPE else 8
    if epi not in (EPI_ROPE, EPI_SILU) and n_tiles(epi, n, 16, d_half) >= 4.5 * sms:
        half = 16
    tiles, split = config_tiles(epi, n, half, d_half), 1
    while tiles * split < 2.5 * sms and k // (split * 2) >= 512:
        split *= 2
    return GemvConfig(half=half, block_k=1024 if epi == EPI_SILU else 256, split_k=split,
                      num_warps=4, num_stages=1, dot=False)


def batched_split(tiles: int, k: int, sms: int, max_split: int = 8) -> int:
    """The batched swapped GEMV's split over K. One program fits an SM (128 KB of shared
    memory), so:
    - a narrow projection (under 0.4 programs per SM) splits in two, and again while still
      under, each split keeping >= 512 of K (llama-3.2-1b's and tinyllama's QKV and
      gate/up: KERNELS.md runs 14 and 30);
    - a projection split that way or not splits further while the programs still run in
      ONE wave and each split keeps >= 1280 of K. Only tensor-parallel ranks' shapes take
      this: llama-2-7b's gate/up at TP=2 (43 tiles) 2 -> 3 splits, its 10-token TTFT 3.94 /
      3.71 -> 3.74 / 3.53 ms on 2x H200 (alternating processes; the spread between
      processes is as large, so a lead, not a settled gain); splitting 1B's 64 gate/up
      tiles in two (1024 of K a split) lost 3% (run 34).
    """
    split = 1
    while tiles * split < 0.4 * sms and k // (2 * split) >= 512:
        split *= 2
    while (split < max_split and tiles * (split + 1) <= sms
           and k // (split + 1) >= 1280):
        split += 1
    return split


def ffn_down_config(n: int, k: int, sms: int = 132) -> GemvConfig:
    """Down's one-row config inside the fused feed-forward (kernels/ffn.py). There it runs
    at gate/up's register budget (one launch, one allocation: in run 24 ~184 registers a
    thread, 2 programs an SM, where down alone took ~113 and 4), so it takes 32-row
    programs (half 16), split over K until the items reach 3.5 per SM (still the best
    measured after run 25 cut the registers: 512-wide steps tied or lost). Measured in the whole
    forward on one H100 (KERNELS.md run 24): llama-2-7b split 4 (512 items), 4.99 ->
    4.94 ms; llama-3.2-1b split 8 (512 items), 1.10 -> 1.07 ms; split 2 or 16, or 64-row
    programs, were slower; down alone on these tiles was no faster than its own rule."""
    tiles, split = n_tiles(EPI_RESID, n, 16, 1), 1
    while tiles * split < 3.5 * sms and k // (split * 2) >= 512:
        split *= 2
    return GemvConfig(half=16, block_k=256, split_k=split, num_warps=4, num_stages=1,
                      dot=False)


def k_splits(k: int, cfg: GemvConfig) -> tuple[int, int]:
    """(K per split, splits) of a config over K, as a launch takes them: each split a
    whole number of BLOCK_K steps, the last one possibly shorter."""
    k_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_split, triton.cdiv(k, k_split)


def idle_prefetch(k: int, cfg: GemvConfig, itemsize: int = 2) -> int:
    """L2 lines per weight row for a one-row GEMV that follows a kernel which barely uses
    HBM (the O projection after attention): half of each program's K slice, at least the
    config's own. Launched early (PDL), it fetches that much while attention runs. Half
    measured best on llama-2-7b (16 of 32 lines) and llama-3.2-1b (4 of 8); the whole slice
    and more were slower (KERNELS.md run 10)."""
    lines = max(1, k_splits(k, cfg)[0] * itemsize // 128 // 2)
    return max(cfg.prefetch, 1 << (lines.bit_length() - 1))  # a power of two (tl.arange)


def n_tiles(epi: int, n: int, half: int, d_half: int) -> int:
    if epi == EPI_SILU:
        return triton.cdiv(n, half)
    if epi == EPI_ROPE:
        return (n // (2 * d_half)) * (d_half // half)
    return triton.cdiv(n, 2 * half)


def config_tiles(epi: int, n: int, half: int, d_half: int) -> int:
    """Tiles of a config with `half`-row sets (a RoPE epilogue's sets divide D/2)."""
    return n_tiles(epi, n, rope_half(d_half, half) if epi == EPI_ROPE else half, d_half)


def workspace_floats(tiles: int, split: int, half: int, block_b: int = 16) -> int:
    """Partial floats a split launch needs: per (tile, split) two accumulators and the
    rows' sums of squares."""
    return tiles * split * (2 * block_b * half + block_b) if split > 1 else 0


def rope_half(d_half: int, half: int) -> int:
    """The row-set size for a RoPE epilogue: a power of two dividing D/2, <= half."""
    return min(half, d_half & -d_half)
