"""The profile suite's arithmetic (the suite itself needs CUDA: tests/gpu/test_bench_gpu.py)."""

from __future__ import annotations

from hybridgraph.bench.profile import family, per_token


def test_kernel_names_fall_into_families() -> None:
    assert family("gemv_kernel") == "triton gemv"
    assert family("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "cublas gemm"
    assert family("void cublasLt::splitKreduce_kernel<32, 16, int>") == "cublas gemm"
    assert family("nvjet_hsh_64x8_64x16_2x1_v_bz_splitK_TNT") == "cublas gemm"
    assert family("triton_poi_fused_add_mul_0") == "inductor fused"
    assert family("add_rmsnorm_kernel") == "triton glue"
    assert family("decode_attention_kernel") == "triton attention"
    assert family("Memcpy DtoD (Device -> Device)") == "copy/set"
    assert family("void at::native::vectorized_elementwise_kernel<4>") == "other aten"


def test_per_token_is_the_difference_of_two_runs() -> None:
    short = {"a": (10, 100.0), "b": (4, 40.0)}
    long = {"a": (30, 300.0), "b": (4, 40.0), "c": (8, 16.0)}
    steps = per_token(long, short, tokens=4)
    assert steps == {"a": (5.0, 50.0), "c": (2.0, 4.0)}   # b ran only in the shared part
