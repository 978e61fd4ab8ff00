"""EngineConfig: flags in one place, from_args, validation naming the field; the mode and
capture tables; the same config building engines for the CLI, the server and the bench."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import pytest

from hybridgraph.bench.config import from_args as bench_from_args
from hybridgraph.cli import build_parser
from hybridgraph.engine import Engine
from hybridgraph.engine_config import EngineConfig
from hybridgraph.model.loader import load_model
from hybridgraph.runtime.modes import CAPTURE_POLICIES, MODE_SPECS, MODES, auto_kernels, mode_spec


def test_cli_flags_become_the_config() -> None:
    args = build_parser().parse_args([
        "generate", "--mode", "jit", "--backend", "torchscript", "--max-batch", "4",
        "--max-seq-len", "128", "--coverage", "every:8", "--capture", "on-demand",
        "--max-graphs", "9", "--max-graph-bytes", "1000", "--device", "cpu",
        "--dtype", "bfloat16", "--seed", "7"])
    cfg = EngineConfig.from_args(args, progress=True)
    assert cfg == EngineConfig(mode="jit", backend="torchscript", max_batch=4, max_seq_len=128,
                               coverage="every:8", capture="on-demand", max_graphs=9,
                               max_graph_bytes=1000, device="cpu", dtype="bfloat16",
                               progress=True)
    assert cfg.weights_seed == 0   # --seed is the sampling seed, not the weights'


def test_serve_takes_the_same_flags() -> None:
    gen = build_parser().parse_args(["generate"])
    serve = build_parser().parse_args(["serve", "--socket", "/tmp/x.sock"])
    assert EngineConfig.from_args(gen) == EngineConfig.from_args(serve) == EngineConfig()


def test_a_namespace_without_some_fields_keeps_their_defaults() -> None:
    cfg = EngineConfig.from_args(argparse.Namespace(mode="eager", unrelated=1))
    assert cfg == EngineConfig(mode="eager")


@pytest.mark.parametrize(("change", "message"), [
    ({"mode": "turbo"}, "unknown mode 'turbo'"),
    ({"backend": "tvm"}, "unknown dynamic backend 'tvm'"),
    ({"capture": "later"}, "unknown capture mode 'later'"),
    ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1, got 0"),
    ({"max_batch": True}, "max_batch must be an integer"),
    ({"max_seq_len": 1}, "max_seq_len must be an integer >= 2, got 1"),
    ({"max_graphs": 0}, "max_graphs must be an integer >= 1"),
    ({"max_graph_bytes": -5}, "max_graph_bytes must be an integer >= 1"),
    ({"max_graph_bytes": 1.5}, "max_graph_bytes must be an integer"),
])
def test_bad_values_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineConfig(**change)
    with pytest.raises(ValueError, match=message):
        replace(EngineConfig(), **change)   # a copy is validated too


def test_mode_table() -> None:
    assert MODES == ("eager", "jit", "graph", "hybrid")
    assert [m for m in MODES if mode_spec(m).uses_graphs] == ["graph", "hybrid"]
    assert [m for m in MODES if mode_spec(m).jit_ops] == ["jit", "hybrid"]
    assert [m for m in MODES if mode_spec(m).sampling_in_graph] == ["hybrid"]
    assert all(s.needs_cuda == s.uses_graphs for s in MODE_SPECS.values())
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        mode_spec("x")


def test_capture_table() -> None:
    assert [c for c, p in CAPTURE_POLICIES.items() if p.ahead] == ["ahead"]
    assert {c: p.on_miss for c, p in CAPTURE_POLICIES.items()} == {
        "ahead": "eager", "on-demand": "capture", "background": "defer", "none": "eager"}


def test_engine_takes_a_config_or_its_fields() -> None:
    model, tok = load_model("tiny", "cpu", seed=0)
    cfg = EngineConfig(mode="jit", backend="eager", max_seq_len=64)
    a = Engine(model, tok, cfg)
    assert (a.mode, a.ops.backend, a.max_seq_len) == ("jit", "eager", 64)
    assert a.engine_config == cfg
    b = Engine(model, tok, cfg, max_batch=2)   # keywords override the config's fields
    assert (b.mode, b.max_batch) == ("jit", 2)
    c = Engine(model, tok, max_seq_len=64)     # auto mode resolves by device, and is recorded
    assert c.mode == c.engine_config.mode == "eager"


def test_load_takes_a_config() -> None:
    engine = Engine.load("tiny", config=EngineConfig(device="cpu", max_seq_len=32))
    assert (str(engine.device), engine.max_seq_len) == ("cpu", 32)
    assert engine.engine_config.dtype == "auto"
    assert str(engine.dtype) == "torch.float32"


def test_bench_builds_engines_from_the_config() -> None:
    cfg = bench_from_args(argparse.Namespace(quick=True, runs=None, device="auto",
                                             model="tiny", dtype="float32"))
    assert cfg.modes == ["eager", "jit"]   # no CUDA here: no graph modes
    ec = cfg.engine_config("jit", coverage="8")
    assert ec == EngineConfig(mode="jit", device="cpu", dtype="float32",
                              max_seq_len=cfg.max_seq_len, coverage="8", progress=True)


def test_kernels_choice_is_validated_and_parsed() -> None:
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        EngineConfig(kernels="cuda")
    p = argparse.ArgumentParser()
    EngineConfig.add_args(p)
    cfg = EngineConfig.from_args(p.parse_args(["--kernels", "triton", "--no-pdl"]))
    assert (cfg.kernels, cfg.pdl) == ("triton", False)
    assert EngineConfig.from_args(p.parse_args([])).kernels == "auto"


def test_auto_kernels_picks_triton_only_for_hybrid_on_hopper() -> None:
    hybrid, graph = mode_spec("hybrid"), mode_spec("graph")
    assert auto_kernels(hybrid, "cuda", (9, 0)) == "triton"
    assert auto_kernels(hybrid, "cuda", (8, 0)) == "inductor"
    assert auto_kernels(hybrid, "cpu", None) == "inductor"
    assert auto_kernels(graph, "cuda", (9, 0)) == "inductor"


def test_cpu_engine_says_which_kernels_run_and_why() -> None:
    auto = Engine.load("tiny", device="cpu").stats()
    assert auto["kernels"] == "inductor" and "sm_90" in auto["kernels_reason"]
    # Asked for Triton without a GPU: the same engine runs, on the fallback, and says why.
    asked = Engine.load("tiny", device="cpu", kernels="triton")
    assert asked.stats()["kernels"] == "inductor"
    assert "CUDA" in asked.stats()["kernels_reason"]
    assert len(asked.generate([1, 2, 3], 4).tokens) == 4


def test_tp_is_checked_and_takes_the_triton_decode() -> None:
    with pytest.raises(ValueError, match="tp must be an integer >= 1, got 0"):
        EngineConfig(tp=0)
    # The Triton decode honours the all-reduce hook (model/fast_decode.py), so tp > 1 runs it.
    assert EngineConfig(tp=2, kernels="triton").kernels == "triton"
    assert EngineConfig(tp=2, kernels="auto").tp == 2


@pytest.mark.parametrize("asked, mode, capability, checked", [
    ("auto", "hybrid", (9, 0), [True]),       # auto picks the kernels on Hopper
    ("auto", "auto", (9, 0), [True]),         # mode auto is hybrid on CUDA
    ("auto", "hybrid", (8, 0), []),           # ...and not below sm_90
    ("auto", "graph", (9, 0), []),            # nor outside hybrid
    ("inductor", "hybrid", (9, 0), []),
    ("triton", "hybrid", (9, 0), [True]),
    ("triton", "hybrid", (8, 6), [False]),    # asked for; PDL only from sm_90
])
def test_the_kernel_check_starts_before_the_load_where_an_engine_will_ask_for_it(
        monkeypatch: pytest.MonkeyPatch, asked: str, mode: str,
        capability: tuple[int, int], checked: list[bool]) -> None:
    """EngineConfig.start_kernel_check (Engine.load calls it before loading the weights) starts
    the self-check exactly where the engine's own choice of kernels will be Triton, with
    the PDL the check will be asked for; on a CPU, never."""
    import torch

    from hybridgraph.kernels import selfcheck
    started: list[bool] = []
    monkeypatch.setattr(selfcheck, "check_kernels_soon",
                        lambda device, dtype, pdl=False: started.append(pdl))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    cfg = EngineConfig(mode=mode, kernels=asked)
    cfg.start_kernel_check(torch.device("cuda", 0), torch.float16)
    assert started == checked
    cfg.start_kernel_check(torch.device("cpu"), torch.float16)
    assert started == checked
