"""Sharding and per-rank loading in one process: each rank's slices are exactly the
whole model's, cut along the right dimension, and bad --tp values are refused clearly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridgraph.engine import Engine
from hybridgraph.model.config import preset
from hybridgraph.model.loader import LoadError, load_model, random_model
from hybridgraph.parallel.group import check_tp
from hybridgraph.parallel.load import checkpoint_shard, random_shard
from hybridgraph.parallel.shard import full_config, row_parts, shard_config, shard_tensor
from tests.conftest import TINY

CPU = torch.device("cpu")


def test_shard_config_keeps_head_dim_and_splits_the_counts() -> None:
    cfg = preset("llama-2-70b")
    local = shard_config(cfg, 8, 3)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (8, 1, 3584)
    assert local.head_dim == cfg.head_dim == 128
    assert full_config(local) == cfg
    # 8 ranks hold the split weights once and the embedding and head 8 times.
    replicated = 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size * (1 + 2 * cfg.num_layers)
    assert 8 * local.num_params() == cfg.num_params() + 7 * replicated


def _check_rank(local: torch.nn.Module, whole: torch.nn.Module, tp: int, rank: int) -> None:
    parts = row_parts(whole.config)
    full = dict(whole.named_parameters())
    for name, p in local.named_parameters():
        assert torch.equal(p, shard_tensor(name, full[name], tp, rank, parts)), name


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_ranks_hold_the_whole_models_slices(gqa_checkpoint, tp: int) -> None:
    directory, _ = gqa_checkpoint
    whole, _ = load_model(str(directory))
    ranks = [checkpoint_shard(directory, TINY, tp, r, CPU, torch.float32) for r in range(tp)]
    for r, local in enumerate(ranks):
        _check_rank(local, whole, tp, r)
    # Together they are the whole: O split by input columns, q/k/v by whole heads.
    wo = torch.cat([m.layers[0].attention.wo.weight for m in ranks], dim=1)
    assert torch.equal(wo, whole.layers[0].attention.wo.weight)
    d, nkv = TINY.head_dim, TINY.num_kv_heads // tp
    k_rows = [m.layers[1].attention.wqkv.weight[-2 * nkv * d:-nkv * d] for m in ranks]
    nh, nkv_all = TINY.num_heads, TINY.num_kv_heads
    assert torch.equal(torch.cat(k_rows), whole.layers[1].attention.wqkv.weight[
        nh * d:(nh + nkv_all) * d])


class _CountingFile:
    """A safe_open handle that counts the values each read takes out of the file."""

    def __init__(self, f, read: list[int]) -> None:
        self.f, self.read = f, read

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name: str) -> torch.Tensor:
        t = self.f.get_tensor(name)
        self.read.append(t.numel())
        return t

    def get_slice(self, name: str):
        sl, read = self.f.get_slice(name), self.read

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def __getitem__(self, index) -> torch.Tensor:
                t = sl[index]
                read.append(t.numel())
                return t
        return Slice()


def test_a_rank_reads_only_its_own_slices(gqa_checkpoint, monkeypatch) -> None:
    """Per-rank loading never materializes the whole model: what a rank takes out of the
    file is exactly what it holds."""
    import contextlib

    import hybridgraph.model.loader as loader

    directory, _ = gqa_checkpoint
    read: list[int] = []
    real = loader.safe_open

    @contextlib.contextmanager
    def counting(*args, **kwargs):
        with real(*args, **kwargs) as f:
            yield _CountingFile(f, read)

    monkeypatch.setattr(loader, "safe_open", counting)
    local = checkpoint_shard(directory, TINY, 2, 1, CPU, torch.float32)
    held = sum(p.numel() for p in local.parameters())
    assert sum(read) == held < TINY.num_params()


def test_random_ranks_hold_the_one_rank_models_slices() -> None:
    cfg = preset("tiny")
    whole = random_model(cfg, CPU, torch.float32, seed=5)
    for r in range(2):
        _check_rank(random_shard(cfg, 2, r, CPU, torch.float32, seed=5), whole, 2, r)


def test_a_wrong_shape_in_the_checkpoint_is_named(gqa_checkpoint, tmp_path) -> None:
    directory, _ = gqa_checkpoint
    tensors = load_file(str(directory / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 16, tensors[name].shape[1])
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=name.replace(".", r"\.")):
        checkpoint_shard(tmp_path, TINY, 2, 1, CPU, torch.float32)


@pytest.mark.parametrize(("tp", "message"), [
    (0, "tp must be an integer >= 1, got 0"),
    (True, "tp must be an integer >= 1, got True"),
    (4, "tp 4 does not divide test-tiny's num_kv_heads (2)"),
    (3, "tp 3 does not divide test-tiny's num_heads (4)"),
])
def test_bad_tp_is_refused(tp: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_tp(tp, TINY, "cpu")


def test_intermediate_size_must_divide_too() -> None:
    with pytest.raises(ValueError, match="intermediate_size"):
        check_tp(2, replace(TINY, intermediate_size=97), "cpu")


def test_more_ranks_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tp 2 needs 2 GPUs, one per rank; 1 visible"):
        check_tp(2, TINY, "cuda")
    assert check_tp(2, TINY, "cpu") == 2    # CPU ranks are processes, not devices


def test_engine_load_refuses_tp() -> None:
    with pytest.raises(ValueError, match="parallel.load_engine"):
        Engine.load("tiny", tp=2)


def test_auto_kernels_put_a_rank_on_the_triton_decode(monkeypatch: pytest.MonkeyPatch,
                                                      ) -> None:
    """Where auto picks the Triton decode (hybrid on sm_90+), a rank of tp > 1 asks for it
    too (it honours the all-reduce hook); without a GPU its self-check refuses it, and the
    reason says that, not tp."""
    import hybridgraph.engine as engine_module
    import hybridgraph.engine_config as config_module

    monkeypatch.setattr(config_module, "auto_kernels", lambda *_: "triton")
    asked = []
    real = engine_module.Steps
    monkeypatch.setattr(engine_module, "Steps",
                        lambda *a, **kw: asked.append(kw["kernels"]) or real(*a, **kw))
    model = random_shard(preset("tiny"), 2, 0, CPU, torch.float32)
    from hybridgraph.model.tokenizer import ByteTokenizer

    stats = Engine(model, ByteTokenizer(), mode="eager", tp=2).stats()
    assert asked == ["triton"]
    assert stats["kernels"] == "inductor" and "CUDA" in stats["kernels_reason"]


def test_a_gguf_file_is_refused_by_name(tmp_path) -> None:
    from hybridgraph.parallel.load import model_config

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(LoadError, match="not GGUF files yet"):
        model_config(str(gguf))
