"""Tensor parallelism on 2 and 4 GPUs of one host (NCCL): tokens equal one GPU's on the
same float32 weights, with every decode step replayed from a CUDA graph that holds the
step's all-reduces. Skipped unless at least 2 GPUs are visible.

Not yet run on GPUs (written on a CPU-only machine; the same code path is checked on the
CPU over gloo in tests/test_parallel.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hybridgraph.engine import Engine
from hybridgraph.model.loader import load_model
from hybridgraph.parallel.launch import launch
from tests.conftest import TINY, make_hf_checkpoint
from tests.gpu.tp_worker import engine_config, generate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs >= 2 GPUs")]

ROOT = Path(__file__).resolve().parents[2]
# 8 query heads over 4 KV heads, ffn 512: divides by 2 and by 4.
CONFIG = replace(TINY, vocab_size=512, hidden_size=256, intermediate_size=512, num_heads=8,
                 num_kv_heads=4, max_position_embeddings=4096, name="tp-small")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tp-small")
    make_hf_checkpoint(CONFIG, directory, seed=4)
    return directory


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _one_gpu(checkpoint: Path, mode: str) -> list[list[int]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, tok = load_model(str(checkpoint), "cuda:0", torch.float32)
    engine = Engine(model, tok, engine_config(mode, 1))
    tokens = generate(engine)
    del engine, model
    torch.cuda.empty_cache()
    return tokens


@pytest.mark.parametrize("mode", ["graph", "hybrid"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_tokens_equal_one_gpu_with_graphs(tp: int, mode: str, checkpoint: Path,
                                            tmp_path: Path) -> None:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    want = _one_gpu(checkpoint, mode)
    assert launch(tp, ["-m", "tests.gpu.tp_worker", str(tmp_path), str(checkpoint), mode],
                  env=_env()) == 0
    got = json.loads((tmp_path / f"{mode}.json").read_text())
    assert got["tokens"] == want
    graphs = got["graphs"]
    # Decode replayed captured graphs (their all-reduces inside), never fell back to eager.
    assert graphs["captures"] > 0 and graphs["hits"] > 0
    assert graphs["capture_failures"] == 0 and graphs["fallbacks"] == 0


def test_bench_tp_records_nccl_and_symmetric_memory(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridgraph.bench.report import read_csv
    from hybridgraph.cli import main

    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    assert main(["bench", "tp", "--tp", "2", "--model", "tinyllama-1.1b", "--runs", "3",
                 "--out", str(tmp_path)]) == 0
    _, rows = read_csv(tmp_path / "tp_allreduce.csv")
    methods = {r["method"] for r in rows}
    assert methods == {"nccl", "symm_mem_one_shot"}
    nccl = [r for r in rows if r["method"] == "nccl"]
    assert all(float(r["graph_us"]) > 0 for r in nccl), nccl
