"""The one-shot all-reduce kernel (kernels/oneshot.py) on 2 GPUs, through the engine's
custom ops (parallel/symm.py): float16, bfloat16 and float32; [rows, 4096] for rows 1, 3,
16, 64 and an odd size; with and without the fused residual; 50 calls in one CUDA graph
replayed 20 times with fresh inputs (tests/gpu/oneshot_worker.py). Every result must be
the float32 rank-order sum bit for bit (`oneshot.reference`), the same on every rank, and
within one rounding of the dtype of a float64 sum. Every test runs at 2 ranks and again at
4; each world is skipped unless that many GPUs are visible.

Run on 2 and 4 H200s in its barrier form; the push form (no barrier) is not yet run on
GPUs (the CPU check is tests/test_oneshot.py, the kernel in Triton's interpreter). A call
that never completes ends the ranks through the worker's watchdog within ~150 s of the
stuck case, and the launcher turns that into a failure here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hybridgraph.parallel.launch import launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")]

ROOT = Path(__file__).resolve().parents[2]
# Against float64: one rounding of the float32 sum to the dtype (half an ulp, 2^-11 and
# 2^-8 of the largest value) and one of the residual add; float32: a few ulps of 2^-24.
TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def cases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    world = request.param
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    out = tmp_path_factory.mktemp(f"oneshot{world}")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HG_TP_TIMEOUT_S", "120")   # NCCL waits bounded too
    assert launch(world, ["-m", "tests.gpu.oneshot_worker", str(out)], env=env) == 0
    return json.loads((out / "oneshot.json").read_text())


def _assert_right(key: str, case: dict) -> None:
    dtype = key.split("/")[0]
    assert case["ref_equal"], (key, case)         # the rank-order float32 sum, bit for bit
    assert case["same_on_ranks"], (key, case)     # every rank the same bits
    assert case["rel_err"] <= TOL[dtype], (key, case)


def test_eager_sums_every_dtype_and_size(cases: dict) -> None:
    eager = {k: v for k, v in cases.items() if "/eager/" in k}
    # 3 dtypes x (4 row counts + the odd size) x (sum, sum + residual)
    assert len(eager) == 3 * 5 * 2, sorted(eager)
    for key, case in eager.items():
        _assert_right(key, case)


def test_graph_replays_stay_right(cases: dict) -> None:
    """50 calls in one graph, replayed 20 times with new inputs: a protocol that let a rank
    read a peer's buffer too early or overwrite its own too soon gives wrong values in some
    replay; one that never completes ends the ranks (the worker's watchdog)."""
    graph = {k: v for k, v in cases.items() if "/graph/" in k}
    assert len(graph) == 3 * 20, sorted(graph)
    for key, case in graph.items():
        _assert_right(key, case)
