"""The profile suite's arithmetic (the suite itself needs CUDA: tests/gpu/test_bench_gpu.py)."""

from __future__ import annotations

import pytest

from hybridgraph.bench.profile import (
    by_projection,
    families,
    family,
    per_token,
    prefill_flops,
    projection_bytes,
    projection_table,
)
from hybridgraph.model.config import ModelConfig
from hybridgraph.model.llama import Transformer


def test_kernel_names_fall_into_families() -> None:
    assert family("gemv_kernel") == "triton gemv"
    assert family("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "cublas gemm"
    assert family("void cublasLt::splitKreduce_kernel<32, 16, int>") == "cublas gemm"
    assert family("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT") == "cublas gemm"
    assert family("triton_poi_fused_add_mul_0") == "inductor fused"
    assert family("add_rmsnorm_kernel") == "triton glue"
    assert family("decode_attention_kernel") == "triton attention"
    assert family("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "flash attention"
    assert family("Memcpy DtoD (Device -> Device)") == "copy/set"
    assert family("void at::native::vectorized_elementwise_kernel<4>") == "other aten"


def test_per_token_is_the_difference_of_two_runs() -> None:
    short = {"a": (10, 100.0), "b": (4, 40.0)}
    long = {"a": (30, 300.0), "b": (4, 40.0), "c": (8, 16.0)}
    steps = per_token(long, short, tokens=4)
    assert steps == {"a": (5.0, 50.0), "c": (2.0, 4.0)}   # b ran only in the shared part


def test_families_sum_launches_and_time() -> None:
    fams = families({"gemv_kernel": (3, 30.0), "nvjet_hsh_64x8": (2, 50.0),
                     "gemv_kernel_2": (1, 5.0)})
    assert dict(fams) == {"triton gemv": [4.0, 35.0], "cublas gemm": [2.0, 50.0]}


def test_prefill_flops_count_every_projection_per_token_and_the_head_once() -> None:
    cfg = ModelConfig(name="t", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2)
    d, kv = 32, 2 * 8                       # hidden; k and v widths (2 kv heads of 8)
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * 48
    model = Transformer(cfg)
    assert prefill_flops(model, 10) == pytest.approx(2 * (2 * per_layer * 10 + 64 * d))


def test_gemv_launches_are_named_by_their_place_in_each_step() -> None:
    order = ["qkv", "wo", "qkv", "wo", "head"]        # two layers, then the head
    launches = [1.0, 2.0, 3.0, 4.0, 9.0, 1.5, 2.5, 3.5, 4.5, 8.0]  # two decode steps
    assert by_projection(order, launches, tokens=2) == {
        "qkv": [1.0, 3.0, 1.5, 3.5], "wo": [2.0, 4.0, 2.5, 4.5], "head": [9.0, 8.0]}
    assert by_projection(order, launches[:-1], tokens=2) is None  # a launch missing
    assert by_projection([], [], tokens=2) is None                 # no Triton decode


def test_projection_table_gives_bandwidth_per_projection() -> None:
    order = ["qkv", "wo", "head"]
    nbytes = {"qkv": 3_000_000, "wo": 1_000_000, "head": 6_000_000}
    t = projection_table(order, nbytes, [3.0, 2.0, 4.0, 3.0, 2.0, 2.0], tokens=2)
    rows = {r["projection"]: r for r in t.records()}
    assert rows["qkv"]["us_per_token"] == pytest.approx(3.0)
    assert rows["qkv"]["gbs"] == pytest.approx(1000.0)      # 3 MB in 3 µs
    assert rows["head"]["us_per_launch_median"] == pytest.approx(3.0)
    assert rows["head"]["gbs"] == pytest.approx(6e6 / 3e3)  # mean of 4 and 2 µs
    assert rows["all"]["us_per_token"] == pytest.approx(8.0)
    assert rows["all"]["gbs"] == pytest.approx(10e6 / 8e3)
    assert sum(r["share"] for p, r in rows.items() if p != "all") == pytest.approx(1.0)
    empty = projection_table(order, nbytes, [1.0], tokens=2)
    assert empty.rows == [] and "Not named" in empty.notes[0]


def test_projection_bytes_are_one_launch_of_each_weight() -> None:
    cfg = ModelConfig(name="t", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2)
    got = projection_bytes(Transformer(cfg))                  # float32: 4 bytes a weight
    assert got == {"qkv": 4 * 32 * (32 + 2 * 16), "wo": 4 * 32 * 32, "w13": 4 * 2 * 48 * 32,
                   "w2": 4 * 48 * 32, "head": 4 * 64 * 32,
                   "w13+w2": 4 * 3 * 48 * 32}  # the fused feed-forward's one launch
