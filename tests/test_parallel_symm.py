"""The all-reduce choice (EngineConfig.allreduce, group.choose_allreduce) and the
symmetric-memory op's routing (parallel/symm.py), on the CPU.

The one-shot kernel itself needs GPUs (tests/gpu/test_parallel.py); here its staging is
a stand-in whose `reduce` doubles x (two ranks holding the same x), so what is checked is
which path each message takes, the refusals, and that torch.compile keeps the op opaque.
"""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch.distributed as dist

from hybridgraph.engine_config import ALLREDUCE_CHOICES, EngineConfig
from hybridgraph.parallel import symm
from hybridgraph.parallel.group import TPGroup, choose_allreduce

NAME = "test-symm-group"


class FakeStaging(symm.Staging):
    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return x * 2


def staging(numel: int = 64, dtypes=(torch.float16,)) -> FakeStaging:
    buffers = {symm.staging_dtype(d): torch.zeros(numel, dtype=symm.staging_dtype(d))
               for d in dtypes}
    return FakeStaging(None, NAME, numel, buffers, True)  # type: ignore[arg-type]


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
    method, why, st = choose_allreduce(asked, "cpu", _never)
    assert (method, st) == ("gloo", None) and "gloo" in why


def test_nccl_asked_never_sets_up_symmetric_memory() -> None:
    assert choose_allreduce("nccl", "cuda", _never) == ("nccl", "asked for", None)


@pytest.mark.parametrize("asked", ["auto", "symm_mem"])
def test_symmetric_memory_where_it_starts(asked: str) -> None:
    st = staging(4096, (torch.float16,))
    method, why, got = choose_allreduce(asked, "cuda", lambda: st)
    assert (method, got) == ("symm_mem", st)
    assert "float32 staging" in why and "4096 elements" in why


def test_auto_takes_nccl_for_staged_messages_symm_mem_still_serves_them() -> None:
    """float16 would be summed via float32: auto takes NCCL (measured faster) without
    setting symmetric memory up; asked for by name, symm_mem still stages them."""
    assert choose_allreduce("auto", "cuda", _never, staged=True)[0] == "nccl"
    assert "float32" in choose_allreduce("auto", "cuda", _never, staged=True)[1]
    st = staging(4096, (torch.float16,))
    assert choose_allreduce("symm_mem", "cuda", lambda: st, staged=True)[0] == "symm_mem"


@pytest.mark.parametrize("asked", ["auto", "symm_mem"])
def test_nccl_where_symmetric_memory_fails(asked: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hybridgraph.parallel.group"):
        method, why, st = choose_allreduce(asked, "cuda", _fails)
    assert (method, st) == ("nccl", None)
    assert why.startswith(f"{asked}: symmetric memory unavailable") and "no P2P" in why
    # Asked for by name, the fallback is worth a warning; auto just records it.
    assert ("not symm_mem" in caplog.text) == (asked == "symm_mem")


def test_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown allreduce 'ring'"):
        choose_allreduce("ring", "cuda", _never)


def test_cpu_group_keeps_gloo() -> None:
    g = TPGroup(0, 2, torch.device("cpu"), None, None, "gloo")  # type: ignore[arg-type]
    g.use_allreduce("symm_mem", 64, 4, [torch.float32])
    assert (g.allreduce, g.staging) == ("gloo", None)
    assert "CPU ranks" in g.allreduce_reason


# ---------------------------------------------------------------- the staging


def test_staging_dtypes() -> None:
    assert symm.staging_dtype(torch.float16) == torch.float32   # no fp16 kernel in torch
    assert symm.staging_dtype(torch.bfloat16) == torch.bfloat16
    assert symm.staging_dtype(torch.float32) == torch.float32
    assert symm.staging_dtype(torch.int32) is None


def test_refusals() -> None:
    st = staging(64, (torch.float16,))                # one float32 buffer
    assert st.refusal(torch.zeros(4, 16, dtype=torch.float16)) == ""
    assert st.refusal(torch.zeros(64, dtype=torch.float32)) == ""  # shares the float32 buffer
    assert "exceed the 64-element" in st.refusal(torch.zeros(65, dtype=torch.float16))
    assert "bfloat16 is not staged" in st.refusal(torch.zeros(8, dtype=torch.bfloat16))
    assert "int32 is not staged" in st.refusal(torch.zeros(8, dtype=torch.int32))
    bf = staging(64, (torch.bfloat16,))
    assert "multiple of 4 bytes" in bf.refusal(torch.zeros(3, dtype=torch.bfloat16))
    assert bf.refusal(torch.zeros(2, dtype=torch.bfloat16)) == ""


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


def test_compile_keeps_the_op_opaque(registered: FakeStaging, nccl_calls: list) -> None:
    """fullgraph, dynamic: the op is one node of the traced graph (Dynamo does not trace
    into it, Inductor does not lower it), with shapes from its fake implementation."""
    graphs = []

    def backend(gm: torch.fx.GraphModule, inputs):
        graphs.append(gm)
        return gm.forward

    group = _symm_group(registered)

    def block(x: torch.Tensor) -> torch.Tensor:
        return x + group.all_reduce(x * 3)

    compiled = torch.compile(block, backend=backend, fullgraph=True, dynamic=True)
    x = torch.ones(2, 8, dtype=torch.float16)
    assert torch.equal(compiled(x), torch.full((2, 8), 7.0, dtype=torch.float16))
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    op = torch.ops.hybridgraph.symm_all_reduce
    assert op in targets or op.default in targets, targets
    assert registered.calls == 1 and not nccl_calls
    # Bigger than the staging, the same compiled code: the op falls back inside.
    big = torch.ones(10, 8, dtype=torch.float16)
    assert torch.equal(compiled(big), torch.full((10, 8), 7.0, dtype=torch.float16))
    assert len(nccl_calls) == 1 and len(graphs) == 1


def test_the_fake_implementation_gives_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = torch.ops.hybridgraph.symm_all_reduce(torch.empty(3, 5, dtype=torch.float16),
                                                    NAME)
    assert out.shape == (3, 5) and out.dtype == torch.float16 and out.is_contiguous()
