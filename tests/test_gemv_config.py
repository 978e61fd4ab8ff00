"""The GEMV's tile rules (kernels/gemv_config.py): pure arithmetic, no GPU."""

import pytest

from hybridgraph.kernels.gemv_config import (
    EPI_PLAIN,
    EPI_RESID,
    EPI_ROPE,
    EPI_SILU,
    default_config,
    ffn_down_config,
    idle_prefetch,
    n_tiles,
    rope_half,
    workspace_floats,
)

# (n, k, epi, norm) of llama-2-7b's five projections (n: output width; SiLU: intermediate)
SEVEN_B = {"qkv": (12288, 4096, EPI_ROPE, True), "wo": (4096, 4096, EPI_RESID, False),
           "w13": (11008, 4096, EPI_SILU, True), "w2": (4096, 11008, EPI_RESID, False),
           "head": (32000, 4096, 0, True)}


@pytest.mark.parametrize("proj", sorted(SEVEN_B))
def test_one_row_takes_the_register_path_with_enough_programs(proj):
    n, k, epi, norm = SEVEN_B[proj]
    c = default_config(n, k, 132, epi, norm=norm, d_half=64)
    assert not c.dot and c.num_warps == 4
    # Gate/up streams 16 rows a program, 1024 of K a step; the rest 256 (KERNELS.md run 25).
    assert (c.block_k, c.half) == (1024, 8) if epi == EPI_SILU else c.block_k == 256
    half = rope_half(64, c.half) if epi == EPI_ROPE else c.half
    programs = n_tiles(epi, n, half, 64) * c.split_k
    assert programs >= 2.5 * 132 or k // c.split_k < 1024  # split until busy, or K runs out


@pytest.mark.parametrize("proj", sorted(SEVEN_B))
@pytest.mark.parametrize("rows", [2, 10, 16])
def test_batched_rows_take_the_tensor_core_rule(proj, rows):
    n, k, epi, norm = SEVEN_B[proj]
    c = default_config(n, k, 132, epi, norm=norm, d_half=64, rows=rows)
    assert c.dot
    # norm'd projections: swapped (the weights on the warpgroup MMA's M side), unsplit;
    # O and down: unswapped, split 4
    want = (True, 128, 64, 1, 4) if norm else (False, 32, 128, 4, 3)
    assert (c.swap, c.half, c.block_k, c.split_k, c.num_stages) == want


def test_batched_norm_rule_splits_narrow_projections_then_fills_one_wave():
    # llama-3.2-1b's QKV (48 tiles of 64 rows, 32-row RoPE sets) is under 0.4 programs per
    # SM unsplit: split in two. Its gate/up (64 tiles, 1024 of K a split) and 7B's QKV (96)
    # and gate/up (86) stay whole.
    assert default_config(3072, 2048, 132, EPI_ROPE, norm=True, d_half=32, rows=10).split_k == 2
    assert default_config(8192, 2048, 132, EPI_SILU, norm=True, d_half=32, rows=10).split_k == 1
    assert default_config(12288, 4096, 132, EPI_ROPE, norm=True, d_half=64, rows=10).split_k == 1
    assert default_config(11008, 4096, 132, EPI_SILU, norm=True, d_half=64, rows=10).split_k == 1
    # llama-2-7b at TP=2: QKV 48 tiles (2: a third split would need a second wave),
    # gate/up 43 tiles (3: 129 programs, 1408 of K a split)
    assert default_config(6144, 4096, 132, EPI_ROPE, norm=True, d_half=64, rows=10).split_k == 2
    assert default_config(5504, 4096, 132, EPI_SILU, norm=True, d_half=64, rows=10).split_k == 3
    # llama-2-70b at TP=4 (per rank: 20 heads of 128 rows, gate/up 7168 wide): 6 and 2
    assert default_config(2560, 8192, 132, EPI_ROPE, norm=True, d_half=64, rows=10).split_k == 6
    assert default_config(7168, 8192, 132, EPI_SILU, norm=True, d_half=64, rows=10).split_k == 2
    # no second wave: 67 tiles stay whole on 132 SMs, 66 split in two
    assert default_config(67 * 128, 4096, 132, EPI_SILU, norm=True, rows=10).split_k == 1
    assert default_config(66 * 128, 4096, 132, EPI_SILU, norm=True, rows=10).split_k == 2
    # a split never leaves a program under 512 of K
    assert default_config(256, 1024, 132, EPI_PLAIN, norm=True, rows=4).split_k == 2
    assert default_config(256, 1000, 132, EPI_PLAIN, norm=True, rows=4).split_k == 1


def test_batched_split_keeps_512_of_k():
    assert default_config(2048, 1024, rows=4).split_k == 2      # 4 would leave 256
    assert default_config(2048, 600, rows=4).split_k == 1


def test_tiles_and_workspace():
    assert n_tiles(EPI_SILU, 11008, 16, 64) == 688          # gate rows, paired with up rows
    assert n_tiles(EPI_ROPE, 12288, 16, 64) == 96 * 4       # whole heads, 4 chunks of D/2
    assert n_tiles(0, 32000, 16, 64) == 1000                # two row sets of 16
    assert workspace_floats(10, 1, 16) == 0                 # unsplit needs none
    assert workspace_floats(10, 2, 16, 1) == 10 * 2 * (2 * 16 + 1)
    assert rope_half(64, 128) == 64 and rope_half(48, 64) == 16


@pytest.mark.parametrize(("n", "k", "lines"), [
    (4096, 4096, 16),   # llama-2-7b O: split 2, 2048 of K a program = 32 lines, half of them
    (2048, 2048, 4),    # llama-3.2-1b O: split 4, 512 of K = 8 lines
    (8192, 2048, 16),   # llama-2-70b O on a TP=4 rank: unsplit, 32 lines
])
def test_o_projection_prefetches_half_its_slice(n, k, lines):
    c = default_config(n, k, 132, EPI_RESID)
    assert idle_prefetch(k, c) == lines
    assert idle_prefetch(k, c._replace(prefetch=64)) == 64  # never below the config's own


def test_idle_prefetch_is_a_power_of_two():
    for k in (256, 768, 1000, 3072, 5120, 11008):
        p = idle_prefetch(k, default_config(4096, k, 132, EPI_RESID))
        assert p >= 4 and p & (p - 1) == 0


@pytest.mark.parametrize("hidden,inter,split", [(4096, 11008, 4), (2048, 8192, 8),
                                               (2048, 5632, 8), (8192, 28672, 2)])
def test_fused_down_takes_32_row_programs_split_to_3_5_items_an_sm(hidden, inter, split):
    """Inside the fused feed-forward down runs at gate/up's register budget: 32-row
    programs, split over K to >= 3.5 items an SM (KERNELS.md run 24), gate/up unsplit, and
    its splits hold whole gate/up tiles (kernels/ffn.fusable) at every preset's shape."""
    from hybridgraph.kernels.ffn import fusable
    c = ffn_down_config(hidden, inter, 132)
    assert (c.half, c.block_k, c.split_k, c.dot) == (16, 256, split, False)
    assert n_tiles(EPI_RESID, hidden, 16, 1) * split >= 3.5 * 132
    up = default_config(inter, hidden, 132, EPI_SILU, norm=True)
    assert fusable(hidden, inter, up, c)


def test_k_splits_are_whole_steps_with_a_shorter_last() -> None:
    """One owner for a launch's split arithmetic (gemv, ffn and idle_prefetch take it)."""
    from hybridgraph.kernels.gemv_config import GemvConfig, k_splits
    assert k_splits(2048, GemvConfig(block_k=256, split_k=4)) == (512, 4)
    assert k_splits(160, GemvConfig(block_k=32, split_k=3)) == (64, 3)   # 64 + 64 + 32
    assert k_splits(100, GemvConfig(block_k=64, split_k=4)) == (64, 2)   # asked 4, 2 fit
    assert k_splits(4096, GemvConfig(block_k=256)) == (4096, 1)
