"""The profile suite's arithmetic (the suite itself needs CUDA: tests/gpu/test_bench_gpu.py)."""

from __future__ import annotations

import pytest

from hybridgraph.bench.profile import families, family, per_token, prefill_flops
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
