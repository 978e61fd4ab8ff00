"""The tp bench suite on the CPU: `bench tp --quick --tp 2` runs two gloo ranks end to end
and records N, per-rank bytes and floor, all-reduce times and the interconnect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridgraph.bench.config import from_args
from hybridgraph.bench.report import read_csv
from hybridgraph.bench.tp import engine_config
from hybridgraph.cli import build_parser, main
from hybridgraph.model.config import preset
from hybridgraph.parallel.shard import shard_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tp_quick_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert main(["bench", "tp", "--quick", "--tp", "2", "--allreduce", "nccl",
                 "--out", str(tmp_path)]) == 0
    meta, rows = read_csv(tmp_path / "tp.csv")
    assert meta["tp"] == "2"
    (row,) = rows
    tiny = preset("tiny")
    # Each rank holds half of every split matrix and all of the embedding and head.
    assert int(row["rank_weight_bytes"]) == shard_config(tiny, 2, 0).num_params() * 4
    assert int(row["rank_weight_bytes"]) < tiny.num_params() * 4
    assert int(row["allreduce_calls_per_token"]) == 2 * tiny.num_layers
    assert float(row["decode_ms"]) > 0 and float(row["rank_floor_ms"]) > 0
    # The engine's own all-reduce, and its measured per-call time.
    assert row["allreduce"] == "gloo" and float(row["allreduce_us"]) > 0
    # --allreduce reached every rank's engine: the reason names what was asked for.
    assert "nccl: CPU ranks sum over gloo" in (tmp_path / "tp.csv").read_text()
    _, ar = read_csv(tmp_path / "tp_allreduce.csv")
    assert [r["method"] for r in ar] == ["gloo"] * 3 and all(float(r["eager_us"]) > 0 for r in ar)
    assert (tmp_path / "tp_topology.csv").is_file()


def test_other_suites_refuse_tp(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "ttft", "--quick", "--tp", "2"]) == 2
    assert "only the tp suite runs" in capsys.readouterr().err


def _bench(*argv: str):
    return from_args(build_parser().parse_args(["bench", "tp", "--quick", *argv]))


def test_allreduce_option_reaches_the_engine_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--allreduce` flows through BenchConfig into the engine every rank builds (rank 0's
    and the followers' alike: both parse the same command line); the old environment
    variable no longer decides."""
    monkeypatch.setenv("HG_TP_ALLREDUCE", "nccl")
    assert _bench("--tp", "2").allreduce == "auto"
    assert engine_config(_bench("--tp", "2")).allreduce == "auto"
    for method in ("nccl", "symm_mem", "auto"):
        cfg = _bench("--tp", "2", "--allreduce", method)
        assert cfg.allreduce == method
        assert (engine_config(cfg).allreduce, engine_config(cfg).tp) == (method, 2)


def test_bad_allreduce_option_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "tp", "--allreduce", "mpi"])
    assert "--allreduce" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "tp", "--quick"])
    args.allreduce = "mpi"  # a namespace built elsewhere, not by the parser
    with pytest.raises(ValueError, match="--allreduce 'mpi': choose from auto, nccl, symm_mem"):
        from_args(args)
