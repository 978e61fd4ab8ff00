"""The tp bench suite on the CPU: `bench tp --quick --tp 2` runs two gloo ranks end to end
and records N, per-rank bytes and floor, all-reduce times and the interconnect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hybridgraph.bench.report import read_csv
from hybridgraph.cli import main
from hybridgraph.model.config import preset
from hybridgraph.parallel.shard import shard_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tp_quick_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert main(["bench", "tp", "--quick", "--tp", "2", "--out", str(tmp_path)]) == 0
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
    _, ar = read_csv(tmp_path / "tp_allreduce.csv")
    assert [r["method"] for r in ar] == ["gloo"] * 3 and all(float(r["eager_us"]) > 0 for r in ar)
    assert (tmp_path / "tp_topology.csv").is_file()


def test_other_suites_refuse_tp(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "ttft", "--quick", "--tp", "2"]) == 2
    assert "only the tp suite runs" in capsys.readouterr().err
