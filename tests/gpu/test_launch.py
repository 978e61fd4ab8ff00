"""compile_ahead on a GPU (kernels/launch.py): a dry launch compiles and writes nothing, the
real launch after it compiles nothing more; and the engine's dry pass compiles every
kernel specialisation its graphs launch, so capturing them compiles none."""

from __future__ import annotations

import pytest
import torch

from hybridgraph.kernels import reference as ref
from hybridgraph.kernels.selfcheck import TOLERANCE

from .conftest import needs_cuda, small_model

pytestmark = [pytest.mark.gpu, needs_cuda]


def _kernels() -> list:
    from hybridgraph.kernels import attention, gemv, glue
    return [gemv.gemv_kernel, attention.decode_attention_kernel, glue._add_rmsnorm_kernel,
            glue._rope_kv_kernel, glue._silu_mul_kernel]


def _compiled() -> int:
    """Kernel specialisations compiled so far in this process, over our kernels."""
    dev = torch.cuda.current_device()
    return sum(len(k.device_caches[dev][0]) for k in _kernels())


def test_a_dry_launch_compiles_and_writes_nothing() -> None:
    from hybridgraph.kernels import gemv
    from hybridgraph.kernels.launch import compile_ahead
    from hybridgraph.kernels.workspace import Workspace
    dt = torch.float16
    # a config (2 warps, 2 stages) no other test compiles, so the dry launch must compile it
    x, w = torch.randn(3, 328, device="cuda").to(dt), (torch.randn(200, 328, device="cuda")
                                                        * 0.05).to(dt)
    out = torch.full((3, 200), float("nan"), device="cuda", dtype=dt)
    cfg = gemv.GemvConfig(half=16, block_k=64, split_k=1, num_warps=2, num_stages=2)  # unique
    ws = Workspace(1 << 20, 1024, "cuda")
    before = _compiled()
    with compile_ahead() as ahead:
        assert ahead
        gemv.gemv(x, w, out, ws, cfg)
    torch.cuda.synchronize()
    assert out.isnan().all()
    assert _compiled() == before + 1
    gemv.gemv(x, w, out, ws, cfg)
    assert _compiled() == before + 1  # the real launch reused the dry launch's compile
    assert ref.rel_err(out, ref.gemv_ref(x, w)) < TOLERANCE[dt]


def test_engine_dry_pass_leaves_nothing_for_the_captures_to_compile(tokenizer) -> None:
    from hybridgraph.engine import Engine
    e = Engine(small_model(torch.float16), tokenizer, mode="hybrid", kernels="triton",
               capture="none", max_batch=2, max_seq_len=512, coverage="pow2")
    assert e.steps.kernels == "triton", e.steps.kernels_reason
    keys = e.runner.keys()
    assert e.runner.compile_ahead(keys)
    compiled = _compiled()
    for key in keys:
        assert e.runner.capture(key) is not None, key
    assert _compiled() == compiled
    ids = list(range(1, 30))
    ref_engine = Engine(small_model(torch.float16), tokenizer, mode="eager", max_seq_len=512)
    assert e.generate(ids, 6, stop_ids=[]).tokens[:4] == \
        ref_engine.generate(ids, 6, stop_ids=[]).tokens[:4]
