"""The all-reduce choice (EngineConfig.allreduce, group.choose_allreduce) and the
symmetric-memory ops' routing (parallel/symm.py), on the CPU.

Most tests use a stand-in staging whose `reduce` doubles x (two ranks holding the same x),
so what is checked is which path each message takes, the refusals, and that torch.compile
keeps the ops opaque. The last ones run the real path (op -> Staging.reduce -> the kernel
in Triton's interpreter) as one rank of two, its peer played by a thread
(tests/triton_interpreter.HostRanks); GPUs: tests/gpu/test_oneshot.py.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from hybridgraph.engine_config import ALLREDUCE_CHOICES, EngineConfig
from hybridgraph.parallel import symm
from hybridgraph.parallel.group import TPGroup, choose_allreduce
from tests.triton_interpreter import HostRanks, needs_interpreter

NAME = "test-symm-group"


class FakeStaging(symm.Staging):
    def reduce(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return x * 2 if residual is None else residual + x * 2


def staging(nbytes: int = 128) -> FakeStaging:
    """A stand-in for rank 0 of 2 taking messages of nbytes (64 float16 elements by
    default): its buffer holds a slot of that per rank and phase."""
    from hybridgraph.kernels.oneshot import buffer_bytes_for
    buf = torch.zeros(buffer_bytes_for(nbytes, 2), dtype=torch.uint8)
    return FakeStaging(None, NAME, buf, torch.zeros(2, dtype=torch.int64), 0, 2)  # type: ignore[arg-type]


@pytest.fixture
def nccl_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """dist.all_reduce replaced by a two-rank sum of equal inputs (x doubled in place)."""
    calls: list[torch.Tensor] = []

    def fake(x: torch.Tensor, group=None) -> None:
        calls.append(x)
        x.mul_(2)
    monkeypatch.setattr(dist, "all_reduce", fake)
    return calls


@pytest.fixture
def registered():
    st = staging()
    symm.register(st)
    yield st
    symm.drop(NAME)


# ---------------------------------------------------------------- config and CLI


def test_config_default_and_refusal() -> None:
    assert EngineConfig().allreduce == "auto"
    assert ALLREDUCE_CHOICES == ("auto", "nccl", "symm_mem")
    with pytest.raises(ValueError, match="unknown allreduce 'mpi'"):
        EngineConfig(allreduce="mpi")


@pytest.mark.parametrize("choice", ALLREDUCE_CHOICES)
def test_cli_flag_reaches_the_config(choice: str) -> None:
    p = argparse.ArgumentParser()
    EngineConfig.add_args(p)
    assert EngineConfig.from_args(p.parse_args(["--allreduce", choice])).allreduce == choice
    assert EngineConfig.from_args(p.parse_args([])).allreduce == "auto"


def test_cli_flag_refuses_other_methods(capsys: pytest.CaptureFixture) -> None:
    p = argparse.ArgumentParser()
    EngineConfig.add_args(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--allreduce", "ring"])
    assert "--allreduce" in capsys.readouterr().err


# ---------------------------------------------------------------- the choice


def _never() -> symm.Staging:
    raise AssertionError("symmetric memory set up where it must not be")


def _fails() -> symm.Staging:
    raise RuntimeError("CUDASymmetricMemory: no P2P")


@pytest.mark.parametrize("asked", ALLREDUCE_CHOICES)
def test_cpu_ranks_always_use_gloo(asked: str) -> None:
    method, why, st = choose_allreduce(asked, "cpu", _never, 2)
    assert (method, st) == ("gloo", None) and "gloo" in why


def test_nccl_asked_never_sets_up_symmetric_memory() -> None:
    assert choose_allreduce("nccl", "cuda", _never, 2) == ("nccl", "asked for", None)


@pytest.mark.parametrize("asked", ["auto", "symm_mem"])
def test_symmetric_memory_where_it_starts(asked: str) -> None:
    """Every dtype: the kernel sums float16 too, so auto no longer sends it to NCCL."""
    st = staging(8192)
    method, why, got = choose_allreduce(asked, "cuda", lambda: st, 2)
    assert (method, got) == ("symm_mem", st)
    assert "one-shot Triton kernel" in why and "8192 bytes" in why


@pytest.mark.parametrize("asked", ["auto", "symm_mem"])
def test_nccl_where_symmetric_memory_fails(asked: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hybridgraph.parallel.group"):
        method, why, st = choose_allreduce(asked, "cuda", _fails, 2)
    assert (method, st) == ("nccl", None)
    assert why.startswith(f"{asked}: symmetric memory unavailable") and "no P2P" in why
    # Asked for by name, the fallback is worth a warning; auto just records it.
    assert ("not symm_mem" in caplog.text) == (asked == "symm_mem")


def test_auto_keeps_nccl_beyond_four_ranks_and_symm_mem_still_forces_the_kernel() -> None:
    method, why, st = choose_allreduce("auto", "cuda", _never, 8)   # never set up
    assert (method, st) == ("nccl", None) and "NCCL at 8 ranks" in why
    st = staging(8192)
    assert choose_allreduce("symm_mem", "cuda", lambda: st, 8)[0] == "symm_mem"
    assert choose_allreduce("auto", "cuda", lambda: st, 2)[0] == "symm_mem"
    assert choose_allreduce("auto", "cuda", lambda: st, 4)[0] == "symm_mem"


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown allreduce 'ring'"):
        choose_allreduce("ring", "cuda", _never, 2)


def test_cpu_group_keeps_gloo() -> None:
    g = TPGroup(0, 2, torch.device("cpu"), None, None, "gloo")  # type: ignore[arg-type]
    g.use_allreduce("symm_mem", 64, 4, [torch.float32])
    assert (g.allreduce, g.staging) == ("gloo", None)
    assert "CPU ranks" in g.allreduce_reason


# ---------------------------------------------------------------- the staging


def test_buffer_bytes_fit_the_widest_dtype() -> None:
    assert symm.buffer_bytes(64, [torch.float16]) == 128
    assert symm.buffer_bytes(64, [torch.float16, torch.float32]) == 256
    assert symm.buffer_bytes(64, [torch.int32, torch.bfloat16]) == 128  # int32: NCCL
    with pytest.raises(ValueError, match="no dtype of .* has a one-shot kernel"):
        symm.buffer_bytes(64, [torch.int64])


def test_refusals() -> None:
    st = staging(128)                               # one byte buffer for every dtype
    for dtype in (torch.float16, torch.bfloat16):
        assert st.refusal(torch.zeros(4, 16, dtype=dtype)) == ""
        assert st.refusal(torch.zeros(3, dtype=dtype)) == ""       # odd sizes too
    assert st.refusal(torch.zeros(32, dtype=torch.float32)) == ""  # the same 128 bytes
    assert "132 bytes exceed the 128-byte" in st.refusal(torch.zeros(66, dtype=torch.float16))
    assert "132 bytes exceed" in st.refusal(torch.zeros(33, dtype=torch.float32))
    assert "int32 has no one-shot kernel" in st.refusal(torch.zeros(8, dtype=torch.int32))
    assert "x is on meta" in st.refusal(torch.zeros(8, dtype=torch.float16, device="meta"))
    x = torch.zeros(8, dtype=torch.float16)
    assert "residual is on meta" in st.refusal(x, torch.zeros(8, dtype=torch.float16,
                                                               device="meta"))


def test_missing_names_what_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each reason choose_allreduce falls back to NCCL with: no CUDA, no Triton, a handle
    without the attributes the kernel reads."""
    assert symm.missing() == "no CUDA device"          # this machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import hybridgraph.kernels as kernels

    monkeypatch.setattr(kernels, "triton_import_error", lambda: "triton does not import: x")
    assert symm.missing() == "triton does not import: x"
    monkeypatch.setattr(kernels, "triton_import_error", lambda: None)
    assert symm.missing() == ""                          # torch 2.13's handle has them all
    assert "has no _SymmetricMemory" in symm.handle_missing(None)

    class Old:
        rank, world_size = 0, 2
    assert symm.handle_missing(Old).endswith("lacks buffer_ptrs")


class _Handle:
    """A rendezvous handle's fields, for `tables`."""

    def __init__(self, rank: int, bases: list[int], size: int) -> None:
        self.rank, self.world_size = rank, len(bases)
        self.buffer_ptrs, self.buffer_size = bases, size


def test_tables_add_the_buffers_offset_in_its_block() -> None:
    blocks = [torch.zeros(4096, dtype=torch.uint8) for _ in range(2)]
    buf = blocks[1][512:1536]                  # rank 1's buffer, 512 bytes into its block
    handle = _Handle(1, [b.data_ptr() for b in blocks], 4096)
    ptrs, offset = symm.tables(handle, buf)
    assert offset == 512 and ptrs.dtype == torch.int64
    assert ptrs.tolist() == [blocks[0].data_ptr() + 512, buf.data_ptr()]
    small = _Handle(1, handle.buffer_ptrs, 1024)
    with pytest.raises(RuntimeError, match="not inside its symmetric block"):
        symm.tables(small, buf)                 # 512 + 1024 bytes run past a 1 KB block
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        symm.tables(handle, blocks[1][520:1000])
    with pytest.raises(RuntimeError, match="serves 2..8 ranks, not 1"):
        symm.tables(_Handle(0, [blocks[0].data_ptr()], 4096), buf)
    with pytest.raises(RuntimeError, match="lacks"):
        symm.tables(object(), buf)


# ---------------------------------------------------------------- routing


def _symm_group(st: symm.Staging) -> TPGroup:
    return TPGroup(0, 2, torch.device("cpu"), None, None, "symm_mem",  # type: ignore[arg-type]
                   "test", st)


def test_a_message_that_fits_takes_the_op(registered: FakeStaging, nccl_calls: list) -> None:
    x = torch.ones(2, 8, dtype=torch.float16)
    out = _symm_group(registered).all_reduce(x)
    assert registered.calls == 1 and not nccl_calls
    assert torch.equal(out, torch.full((2, 8), 2.0, dtype=torch.float16))
    assert torch.equal(x, torch.ones(2, 8, dtype=torch.float16))   # out of place


def test_a_message_too_big_goes_to_nccl_in_place(registered: FakeStaging,
                                                  nccl_calls: list) -> None:
    x = torch.ones(5, 16, dtype=torch.float16)     # 80 elements > 64
    out = _symm_group(registered).all_reduce(x)
    assert out is x and nccl_calls == [x] and getattr(registered, "calls", 0) == 0
    assert torch.equal(x, torch.full((5, 16), 2.0, dtype=torch.float16))


def test_the_op_falls_back_to_nccl_out_of_place(registered: FakeStaging,
                                                 nccl_calls: list) -> None:
    """Compiled, the group cannot branch on the size: the op itself takes NCCL, on a copy
    (a custom op must not change its input)."""
    x = torch.ones(80, dtype=torch.float16)
    out = torch.ops.hybridgraph.symm_all_reduce(x, NAME)
    assert len(nccl_calls) == 1 and nccl_calls[0] is not x
    assert torch.equal(out, torch.full((80,), 2.0, dtype=torch.float16))
    assert torch.equal(x, torch.ones(80, dtype=torch.float16))


def _compile_traced(fn):
    """fn compiled fullgraph and dynamic through a backend that keeps each traced graph;
    returns (compiled, graphs)."""
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, inputs):
        graphs.append(gm)
        return gm.forward

    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=True), graphs


def _calls_op(gm: torch.fx.GraphModule, op) -> bool:
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    return op in targets or op.default in targets


def test_compile_keeps_the_op_opaque(registered: FakeStaging, nccl_calls: list) -> None:
    """fullgraph, dynamic: the op is one node of the traced graph (Dynamo does not trace
    into it, Inductor does not lower it), with shapes from its fake implementation."""
    group = _symm_group(registered)
    compiled, graphs = _compile_traced(lambda x: x + group.all_reduce(x * 3))
    x = torch.ones(2, 8, dtype=torch.float16)
    assert torch.equal(compiled(x), torch.full((2, 8), 7.0, dtype=torch.float16))
    (gm,) = graphs
    assert _calls_op(gm, torch.ops.hybridgraph.symm_all_reduce), gm.graph
    assert registered.calls == 1 and not nccl_calls
    # Bigger than the staging, the same compiled code: the op falls back inside.
    big = torch.ones(10, 8, dtype=torch.float16)
    assert torch.equal(compiled(big), torch.full((10, 8), 7.0, dtype=torch.float16))
    assert len(nccl_calls) == 1 and len(graphs) == 1


def test_the_fake_implementation_gives_shapes() -> None:
    with FakeTensorMode():
        out = torch.ops.hybridgraph.symm_all_reduce(torch.empty(3, 5, dtype=torch.float16),
                                                    NAME)
    assert out.shape == (3, 5) and out.dtype == torch.float16 and out.is_contiguous()


# ---------------------------------------------------------------- the fused residual add


def test_the_add_takes_the_fused_op(registered: FakeStaging, nccl_calls: list) -> None:
    x, r = torch.ones(2, 8, dtype=torch.float16), torch.full((2, 8), 3.0, dtype=torch.float16)
    out = _symm_group(registered).all_reduce_add(x, r)
    assert registered.calls == 1 and not nccl_calls
    assert torch.equal(out, torch.full((2, 8), 5.0, dtype=torch.float16))
    assert torch.equal(x, torch.ones(2, 8, dtype=torch.float16))


def test_the_add_too_big_reduces_over_nccl_then_adds(registered: FakeStaging,
                                                     nccl_calls: list) -> None:
    x, r = torch.ones(5, 16, dtype=torch.float16), torch.ones(5, 16, dtype=torch.float16)
    out = _symm_group(registered).all_reduce_add(x, r)
    assert nccl_calls == [x] and getattr(registered, "calls", 0) == 0
    assert torch.equal(out, torch.full((5, 16), 3.0, dtype=torch.float16))
    # Inside the op (compiled): NCCL on a copy, then the add; the input stays.
    x = torch.ones(80, dtype=torch.float16)
    out = torch.ops.hybridgraph.symm_all_reduce_add(x, torch.ones_like(x), NAME)
    assert torch.equal(out, torch.full((80,), 3.0, dtype=torch.float16)) and out.is_contiguous()
    assert torch.equal(x, torch.ones(80, dtype=torch.float16))


def test_gloo_and_nccl_groups_add_after_the_all_reduce(nccl_calls: list) -> None:
    g = TPGroup(0, 2, torch.device("cpu"), None, None, "gloo")  # type: ignore[arg-type]
    x = torch.ones(4, dtype=torch.float32)
    assert torch.equal(g.all_reduce_add(x, torch.ones(4)), torch.full((4,), 3.0))
    assert nccl_calls == [x]


def test_the_add_refuses_a_mismatched_residual(registered: FakeStaging) -> None:
    x = torch.ones(2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="residual is torch.float32"):
        torch.ops.hybridgraph.symm_all_reduce_add(x, torch.ones(2, 8), NAME)
    with pytest.raises(ValueError, match="residual is torch.float16 \\(8,\\)"):
        torch.ops.hybridgraph.symm_all_reduce_add(x, torch.ones(8, dtype=torch.float16), NAME)


def test_compile_keeps_the_add_op_opaque(registered: FakeStaging, nccl_calls: list) -> None:
    group = _symm_group(registered)
    compiled, graphs = _compile_traced(lambda x: group.all_reduce_add(x * 3, x))
    x = torch.ones(2, 8, dtype=torch.float16)
    assert torch.equal(compiled(x), torch.full((2, 8), 7.0, dtype=torch.float16))
    (gm,) = graphs
    op = torch.ops.hybridgraph.symm_all_reduce_add
    assert _calls_op(gm, op), gm.graph
    with FakeTensorMode():
        out = op(torch.empty(3, 5, dtype=torch.bfloat16), torch.empty(3, 5, dtype=torch.bfloat16),
                 NAME)
    assert out.shape == (3, 5) and out.dtype == torch.bfloat16 and out.is_contiguous()


# ---------------------------------------------------------------- the ranks agree


@pytest.mark.parametrize("peer_ok,peer_offset,match", [
    (1, 512, None), (0, 512, "failed on another rank"), (1, 0, "offsets 0..512")])
def test_the_ranks_agree_on_the_buffer(monkeypatch: pytest.MonkeyPatch, peer_ok: int,
                                       peer_offset: int, match: str | None) -> None:
    """TPGroup._staging: every rank's create succeeded, at one offset in its block, or
    every rank raises (none sums alone)."""
    st = staging()
    st.offset = 512
    monkeypatch.setattr(symm, "create", lambda *a: (symm.register(st), st)[1])

    def min_with_peer(t: torch.Tensor, op=None, group=None) -> None:
        t.copy_(torch.minimum(t, torch.tensor([peer_ok, peer_offset, -peer_offset])))
    monkeypatch.setattr(dist, "all_reduce", min_with_peer)
    g = TPGroup(0, 2, torch.device("cpu"), _FakePG(), None, "nccl")  # type: ignore[arg-type]
    if match is None:
        assert g._staging(64, [torch.float16]) is st
        symm.drop(NAME)
    else:
        with pytest.raises(RuntimeError, match=match):
            g._staging(64, [torch.float16])
        assert symm.registered(NAME) is None


class _FakePG:
    group_name = NAME


# ---------------------------------------------------------------- the real kernel


@needs_interpreter
@pytest.mark.parametrize("with_residual", [False, True])
def test_the_ops_run_the_kernel(with_residual: bool) -> None:
    """Rank 1 of 2: the custom ops through Staging.reduce into the one-shot kernel (a
    strided x is made contiguous first), its peer played by a thread: the reference sum
    (+ residual), bit for bit."""
    from hybridgraph.kernels import oneshot

    ranks = HostRanks(2, 8 * 64 * 2)
    parts = [torch.randn(64, 3).to(torch.float16).t() for _ in range(2)]   # strided
    residual = torch.randn(3, 64).to(torch.float16) if with_residual else None
    st = symm.Staging(None, NAME, ranks.buffers[1], ranks.buffer_ptrs,  # type: ignore[arg-type]
                      1, 2, state=ranks.states[1])
    symm.register(st)
    try:
        if with_residual:
            def launch():
                return torch.ops.hybridgraph.symm_all_reduce_add(parts[1], residual, NAME)
        else:
            def launch():
                return torch.ops.hybridgraph.symm_all_reduce(parts[1], NAME)
        got = ranks.run(1, [p.contiguous() for p in parts], launch)
    finally:
        symm.drop(NAME)
    assert torch.equal(got, oneshot.reference(parts, residual)) and ranks.all_empty()
