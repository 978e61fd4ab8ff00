"""The profile suite on a real GPU: kernels are traced inside graph replays and counted."""

import pytest

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.profile import profile_suite

from .conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_profile_counts_decode_kernels_inside_graphs() -> None:
    cfg = BenchConfig(model="tiny", device="cuda", dtype="float16", max_seq_len=256,
                      modes=["eager", "jit", "graph", "hybrid"], profile_tokens=8,
                      profile_prefill_lengths=[10, 300])
    engines = Engines(cfg)
    try:
        fams, top, proj, prefill, prefill_top = profile_suite(cfg, engines, floor_ms=0.01,
                                                              matmul_tflops=100.0)
    finally:
        engines.close()
    rows = {r["family"]: r for r in fams.records()}
    total = rows["all kernels"]
    # A tiny model still runs a few kernels per layer per token, all from graph replays.
    assert total["kernels_per_token"] >= 2 * 2 and total["us_per_token"] > 0
    assert sum(r["us_per_token"] for f, r in rows.items() if f != "all kernels") \
        == pytest.approx(total["us_per_token"])
    assert 1 <= len(top.rows) <= 10
    # The GEMV launches named by projection, when the tiny model decodes on the kernels.
    gemv = rows.get("triton gemv")
    if gemv is not None:
        named = {r["projection"]: r for r in proj.records()}
        assert named, proj.notes
        assert named["all"]["launches_per_token"] == pytest.approx(gemv["kernels_per_token"])
        assert named["all"]["us_per_token"] == pytest.approx(gemv["us_per_token"], rel=0.2)
        assert all(r["gbs"] > 0 for r in named.values())
    # The prefill profile: one block of rows per length (300 is capped to the cache), the
    # families summing to the whole, the matmuls' rate a positive number.
    by_len: dict[int, dict[str, dict]] = {}
    for r in prefill.records():
        by_len.setdefault(r["prompt_len"], {})[r["family"]] = r
    assert sorted(by_len) == [10, 255]
    for rows in by_len.values():
        total = rows["all kernels"]
        parts = [r["us"] for f, r in rows.items() if f not in ("all kernels", "weight matmuls")]
        assert sum(parts) == pytest.approx(total["us"]) and total["us"] > 0
        assert rows["weight matmuls"]["tflops"] > 0
    assert 1 <= len(prefill_top.rows) <= 10
