"""The profile suite on a real GPU: kernels are traced inside graph replays and counted."""

import pytest

from hybridgraph.bench.config import BenchConfig
from hybridgraph.bench.engines import Engines
from hybridgraph.bench.profile import profile_suite

from .conftest import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_profile_counts_decode_kernels_inside_graphs() -> None:
    cfg = BenchConfig(model="tiny", device="cuda", dtype="float16", max_seq_len=256,
                      modes=["eager", "jit", "graph", "hybrid"], profile_tokens=8)
    engines = Engines(cfg)
    try:
        fams, top = profile_suite(cfg, engines, floor_ms=0.01)
    finally:
        engines.close()
    rows = {r["family"]: r for r in fams.records()}
    total = rows["all kernels"]
    # A tiny model still runs a few kernels per layer per token, all from graph replays.
    assert total["kernels_per_token"] >= 2 * 2 and total["us_per_token"] > 0
    assert sum(r["us_per_token"] for f, r in rows.items() if f != "all kernels") \
        == pytest.approx(total["us_per_token"])
    assert 1 <= len(top.rows) <= 10
