"""kernels/ffn.py on the CPU through Triton's interpreter: gate/up and down in one launch
give what the two GEMVs give, leave the counters at zero, refuse configs they cannot
serve; and the kernel compiles for sm_90 (the GPU run: tests/gpu/test_kernels.py)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import F16, TOL, nan, needs_interpreter, rnd


@pytest.fixture
def ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 18, 1024, "cpu")


def _configs(half1: int, block_k1: int, half2: int, block_k2: int, split2: int):
    from hybridgraph.kernels.gemv_config import GemvConfig
    return (GemvConfig(half=half1, block_k=block_k1, dot=False),
            GemvConfig(half=half2, block_k=block_k2, split_k=split2, dot=False))


@needs_interpreter
@pytest.mark.parametrize("hidden,inter,cfgs", [
    (128, 96, (8, 64, 8, 32, 2)),     # down split in two: half the gate/up tiles each
    (64, 160, (16, 32, 4, 32, 3)),    # three uneven splits (160 = 64 + 64 + 32)
    (96, 72, (8, 32, 8, 64, 1)),      # down unsplit: every tile feeds one split
    (100, 48, (8, 64, 16, 16, 4)),    # hidden not a multiple of down's tile
])
def test_ffn_equals_gate_up_then_down(ws, hidden, inter, cfgs) -> None:
    from hybridgraph.kernels import ffn, gemv
    from hybridgraph.kernels import reference as ref
    cfg13, cfg2 = _configs(*cfgs)
    x, res, nw = rnd(1, hidden), rnd(1, hidden), 1 + rnd(hidden, scale=0.2)
    w13, w2 = rnd(2 * inter, hidden, scale=0.1), rnd(hidden, inter, scale=0.1)
    h = nan(1, inter)
    out = ffn.ffn(x, w13, nw, w2, res, h, nan(1, hidden), ws, cfg13, cfg2, eps=1e-5)
    # What the two launches give, each within rounding of the float32 reference.
    h2 = gemv.gemv(x, w13, nan(1, inter), ws, cfg13, epi=gemv.EPI_SILU, norm_w=nw)
    two = gemv.gemv(h2, w2, nan(1, hidden), ws, cfg2, epi=gemv.EPI_RESID, residual=res)
    assert torch.equal(h, h2)  # gate/up's half runs gemv's own code
    assert torch.equal(out, two)
    assert ref.rel_err(out, ref.gemv_ref(ref.swiglu_ref(x, w13, nw), w2, residual=res)) < TOL
    assert int(ws.counters.abs().sum()) == 0  # tile counters, ready[] and done all reset
    again = ffn.ffn(x, w13, nw, w2, res, nan(1, inter), nan(1, hidden), ws, cfg13, cfg2)
    assert torch.equal(again, out)  # a second launch (a graph replay) starts clean


@needs_interpreter
def test_ffn_without_residual_gives_down_plain(ws) -> None:
    """A tensor-parallel rank's feed-forward (residual None): down's output is its partial
    sum as gemv(EPI_PLAIN) gives it, summed over the ranks before the add; the counters
    reset as with the add."""
    from hybridgraph.kernels import ffn, gemv
    cfg13, cfg2 = _configs(8, 64, 8, 32, 2)
    x, nw = rnd(1, 128), 1 + rnd(128, scale=0.2)
    w13, w2 = rnd(2 * 96, 128, scale=0.1), rnd(128, 96, scale=0.1)
    h = nan(1, 96)
    out = ffn.ffn(x, w13, nw, w2, None, h, nan(1, 128), ws, cfg13, cfg2)
    plain = gemv.gemv(h, w2, nan(1, 128), ws, cfg2, epi=gemv.EPI_PLAIN)
    assert torch.equal(out, plain)
    assert int(ws.counters.abs().sum()) == 0
    with_res = ffn.ffn(x, w13, nw, w2, rnd(1, 128), nan(1, 96), nan(1, 128), ws, cfg13, cfg2)
    assert not torch.equal(with_res, out)  # the residual path still adds


def test_fusable_says_which_configs_share_a_launch() -> None:
    from hybridgraph.kernels.ffn import fusable
    from hybridgraph.kernels.gemv_config import GemvConfig
    one, down = _configs(8, 64, 8, 32, 2)
    assert fusable(128, 96, one, down)
    assert not fusable(128, 96, one._replace(split_k=2), down)         # gate/up split over K
    assert not fusable(128, 96, GemvConfig(half=16), down)              # tensor-core batches
    assert not fusable(128, 96, one._replace(half=64), down._replace(split_k=3))  # 64-row
    #                                   tiles, 32-wide splits: a tile would feed three
    assert not fusable(128, 96, one, down._replace(num_warps=8))        # one launch, one width
    assert not fusable(128, 96, one, down._replace(programs=4))         # no persistent grid


def test_ffn_refuses_what_it_cannot_serve(ws) -> None:
    from hybridgraph.kernels.ffn import ffn
    one, down = _configs(8, 64, 8, 32, 2)
    x, w13, w2 = torch.zeros(2, 128, dtype=F16), torch.zeros(192, 128, dtype=F16), \
        torch.zeros(128, 96, dtype=F16)
    h, out = torch.zeros(2, 96, dtype=F16), torch.zeros(2, 128, dtype=F16)
    with pytest.raises(ValueError, match="one row"):
        ffn(x, w13, x[0], w2, x, h, out, ws, one, down)
    with pytest.raises(ValueError, match="cannot share a launch"):
        ffn(x[:1], w13, x[0], w2, x[:1], h[:1], out[:1], ws, one._replace(split_k=2), down)


@needs_interpreter
def test_ffn_compiles_for_hopper() -> None:
    """The real compiler, for sm_90 (the interpreter accepts what it refuses): the spin
    wait, the release and acquire atomics, both halves' register paths, PDL both ways,
    down with the residual add and plain."""
    from tests.triton_interpreter import compile_for_hopper
    sig = {n: "*fp16" for n in ("x_ptr", "w13_ptr", "normw_ptr", "h_ptr", "w2_ptr",
                                "res_ptr", "out_ptr")}
    sig.update({"ws_ptr": "*fp32", "cnt_ptr": "*i32", "INTER": "i32", "H": "i32",
                "eps": "fp32", "TILES1": "i32", "TILES2": "i32", "K_SPLIT2": "i32"})
    variants = [(sig, dict(HALF1=8, BLOCK_K1=512, PREFETCH1=4, HALF2=8, BLOCK_K2=256,
                           PREFETCH2=pf, SPLIT2=split, USE_PDL=pdl, EPI2=epi2),
                 {"num_stages": 1})
                for split, pdl, pf, epi2 in ((2, 2, 4, 1), (4, 1, 16, 1), (1, 0, 0, 1),
                                             (4, 2, 16, 0))]
    err, mmas = compile_for_hopper("hybridgraph.kernels.ffn", "ffn_kernel", variants)
    assert err == "", err
    assert all(m == (0, 0) for m in mmas)  # registers, no tensor cores
