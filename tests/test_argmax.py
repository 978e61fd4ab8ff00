"""The split argmax kernel (kernels/argmax.py) in Triton's interpreter, on the CPU, against
torch.argmax; and compiled for sm_90 by Triton's real compiler (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import needs_interpreter


@pytest.fixture
def ws():
    from hybridgraph.kernels.workspace import Workspace
    return Workspace(1 << 14, 64, "cpu")


def _argmax(x: torch.Tensor, ws) -> torch.Tensor:
    from hybridgraph.kernels.argmax import argmax
    out = torch.full((x.shape[0],), -1, dtype=torch.int64)
    argmax(x, out, ws)
    assert int(ws.counters.abs().sum()) == 0  # every launch leaves the counters at zero
    return out


@needs_interpreter
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 100), (2, 2049), (1, 32000), (4, 9000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_argmax_equals_torch(ws, rows: int, vocab: int, dtype: torch.dtype) -> None:
    """Random rows, then ties: the largest value placed at several indices, the first wins,
    also where the ties fall in different slices of the split."""
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(rows, vocab, generator=gen).to(dtype)
    assert torch.equal(_argmax(x, ws), torch.argmax(x, dim=-1))
    for r in range(rows):
        spots = torch.randint(0, vocab, (3,), generator=gen)
        x[r, spots] = 100.0
    assert torch.equal(_argmax(x, ws), torch.argmax(x, dim=-1))


@needs_interpreter
def test_argmax_edge_values(ws) -> None:
    """-inf everywhere (index 0), NaN (the first NaN wins, as torch), a strided row view."""
    vocab = 5000
    x = torch.full((3, vocab), float("-inf"))
    x[1, 4000] = x[1, 7] = float("nan")
    x[2, 2500] = float("inf")
    x[2, 300] = float("nan")
    assert _argmax(x, ws).tolist() == [0, 7, 300]
    assert torch.equal(_argmax(x, ws), torch.argmax(x, dim=-1))
    wide = torch.randn(2, vocab + 64).half()
    view = wide[:, 32:32 + vocab]
    assert view.stride(0) == vocab + 64
    assert torch.equal(_argmax(view, ws), torch.argmax(view, dim=-1))


@needs_interpreter
@pytest.mark.parametrize("vocab", [100, 9000])  # one program a row; split, settled by the last
def test_argmax_finish_advances_positions_and_publishes(ws, vocab: int) -> None:
    """With a Finish the launch is a step's whole greedy finish: a decode (rows from 0,
    active masks rows: no advance, no publish) and a prefill (rows from `first`, positions
    from last_idx + 1, every row published), against torch on the same inputs."""
    from hybridgraph.kernels.argmax import argmax
    from hybridgraph.kernels.publish import Finish
    gen = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=gen)
    want = torch.argmax(x, dim=-1)
    ids, pos = torch.full((6,), -1), torch.tensor([5, 8, 13, 100, 7, 7])
    ring = torch.full((8, 6), -1)
    active = torch.tensor([1, 0, 1, 1])
    argmax(x, ids, ws, finish=Finish(pos[:4], pos, ring, 0, active))
    assert int(ws.counters.abs().sum()) == 0
    assert ids[:4].tolist() == want.tolist() and ids[4:].tolist() == [-1, -1]
    assert pos.tolist() == [6, 8, 14, 101, 7, 7]
    expect = torch.full((8, 6), -1)
    for j in (0, 2, 3):
        expect[int(pos[j]) % 8, j] = int(want[j])
    assert torch.equal(ring, expect)  # row 1 (masked) and rows 4-5 (not in the launch) kept
    last_idx = torch.tensor([2, 9, 0])  # a prefill of three prompts landing on rows 3-5
    argmax(x[:3], ids, ws, finish=Finish(last_idx, pos, ring, 3))
    assert ids.tolist() == want[:3].tolist() * 2  # rows 0-2 from the decode, 3-5 prefilled
    assert pos.tolist() == [6, 8, 14, 3, 10, 1]
    for j in range(3):
        expect[int(last_idx[j] + 1) % 8, 3 + j] = int(want[j])
    assert torch.equal(ring, expect)


def test_argmax_refuses_what_it_cannot_do(ws) -> None:
    from hybridgraph.kernels.argmax import argmax
    from hybridgraph.kernels.workspace import WorkspaceError
    out = torch.empty(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous rows"):
        argmax(torch.randn(100, 4).t(), out, ws)
    with pytest.raises(ValueError, match="vocabulary of 0"):
        argmax(torch.randn(4, 0), out, ws)
    with pytest.raises(WorkspaceError, match="argmax needs"):
        argmax(torch.empty(128, 300_000), torch.empty(128, dtype=torch.int64), ws)
    from hybridgraph.kernels.publish import Finish
    pos, ring = torch.zeros(4, dtype=torch.int64), torch.zeros(8, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="outside the ring"):
        argmax(torch.randn(2, 10), out, ws, finish=Finish(pos[:2], pos, ring, 3))
    with pytest.raises(ValueError, match="pos_in of 3 rows for 2"):
        argmax(torch.randn(2, 10), out, ws, finish=Finish(pos[:3], pos, ring, 0))


def test_splits_cover_the_vocabulary() -> None:
    from hybridgraph.kernels.argmax import SPLITS_MAX, splits_for
    assert splits_for(1) == 1 and splits_for(2048) == 1
    assert splits_for(32000) == 16 and splits_for(128256) == 64
    assert splits_for(10_000_000) == SPLITS_MAX


@needs_interpreter
def test_argmax_compiles_for_hopper() -> None:
    from tests.triton_interpreter import compile_for_hopper
    variants = [({"x_ptr": f"*{t}", "out_ptr": "*i64", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                  "V": "i32", "stride_x": "i32", "CHUNK": "i32", "first": "i32",
                  "pos_in_ptr": "*i64", "pos_out_ptr": "*i64", "act_ptr": "*i64",
                  "ring_ptr": "*i64", "slots": "i32", "width": "i32"},
                 {"SPLITS": splits, "BLOCK": 1024, "USE_PDL": pdl, "FINISH": fin,
                  "HAS_ACTIVE": act}, {})
                for t, splits, pdl, fin, act in (
                    ("fp16", 1, False, False, False), ("bf16", 64, True, True, True),
                    ("fp32", 16, False, True, False), ("fp32", 1, True, True, True))]
    err, _ = compile_for_hopper("hybridgraph.kernels.argmax", "_argmax_kernel", variants)
    assert err == "", err
