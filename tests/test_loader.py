"""Loading HF checkpoints written by save_pretrained, random presets, and load errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridgraph.model.config import PRESETS, ConfigError, preset
from hybridgraph.model.llama import Transformer
from hybridgraph.model.loader import LoadError, load_model, random_model
from hybridgraph.model.tokenizer import ByteTokenizer, HFTokenizer

from .conftest import VARIANTS, make_hf_checkpoint, rel_max_diff


@torch.inference_mode()
def _assert_same_logits(model: Transformer, hf: torch.nn.Module) -> None:
    model.setup_caches(2, 32)
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert rel_max_diff(model.prefill(ids), hf(ids).logits) <= 1e-4


def test_single_file_checkpoint_loads(gqa_checkpoint) -> None:
    directory, hf = gqa_checkpoint
    assert (directory / "model.safetensors").is_file()
    model, tok = load_model(str(directory))
    assert model.config.num_kv_heads == 2 and model.config.name == directory.name
    assert next(model.parameters()).dtype == torch.float32
    assert isinstance(tok, HFTokenizer)  # the directory's tokenizer.json
    _assert_same_logits(model, hf)


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_sharded_checkpoint_loads(tmp_path: Path, variant: str) -> None:
    hf = make_hf_checkpoint(VARIANTS[variant], tmp_path, seed=3, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2, "the checkpoint should really be sharded"
    assert not (tmp_path / "model.safetensors").exists()
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_model(str(tmp_path))
    _assert_same_logits(model, hf)


def test_load_to_bfloat16(gqa_checkpoint) -> None:
    directory, _ = gqa_checkpoint
    model, _ = load_model(str(directory), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = load_file(str(directory / "model.safetensors"))["model.norm.weight"]
    assert torch.equal(model.norm.weight, want.to(torch.bfloat16))


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def ckpt_copy(gqa_checkpoint, tmp_path: Path) -> Path:
    """A private copy of the GQA checkpoint that a test may damage."""
    directory, _ = gqa_checkpoint
    return Path(shutil.copytree(directory, tmp_path / "model"))


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="neither a model name .* a GGUF file nor a model directory") as info:
        load_model(str(tmp_path / "nowhere"))
    assert "nowhere" in str(info.value)


def test_missing_config(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(LoadError, match="no config.json"):
        load_model(str(ckpt_copy))


def test_malformed_config(ckpt_copy: Path) -> None:
    (ckpt_copy / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(LoadError, match="malformed config.json"):
        load_model(str(ckpt_copy))


def test_config_missing_a_field(ckpt_copy: Path) -> None:
    d = json.loads((ckpt_copy / "config.json").read_text())
    del d["intermediate_size"]
    (ckpt_copy / "config.json").write_text(json.dumps(d))
    with pytest.raises(LoadError, match="intermediate_size"):
        load_model(str(ckpt_copy))


def test_unsupported_architecture(ckpt_copy: Path) -> None:
    _edit_config(ckpt_copy, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    with pytest.raises((LoadError, ConfigError), match="unsupported architecture.*GPTNeoX"):
        load_model(str(ckpt_copy))


def test_missing_weights(ckpt_copy: Path) -> None:
    (ckpt_copy / "model.safetensors").unlink()
    # A pickled checkpoint must never be a fallback.
    torch.save({}, ckpt_copy / "pytorch_model.bin")
    with pytest.raises(LoadError, match="no model.safetensors"):
        load_model(str(ckpt_copy))


def test_sharded_index_naming_a_missing_shard(tmp_path: Path) -> None:
    make_hf_checkpoint(VARIANTS["gqa"], tmp_path, seed=3, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(LoadError, match=victim.name):
        load_model(str(tmp_path))


def test_malformed_index(tmp_path: Path) -> None:
    make_hf_checkpoint(VARIANTS["gqa"], tmp_path, seed=3, max_shard_size="40KB")
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(LoadError, match="malformed .*index.json"):
        load_model(str(tmp_path))


def test_shape_mismatch_names_the_tensor(ckpt_copy: Path) -> None:
    _edit_config(ckpt_copy, intermediate_size=128)
    with pytest.raises(LoadError, match=r"mlp\.\w+_proj\.weight has shape .*config.json implies"):
        load_model(str(ckpt_copy))


def test_vocab_mismatch_names_the_tensor(ckpt_copy: Path) -> None:
    _edit_config(ckpt_copy, vocab_size=100)
    with pytest.raises(LoadError, match=r"\(97, 64\), config.json implies \(100, 64\)"):
        load_model(str(ckpt_copy))


def test_missing_tensor_is_named(ckpt_copy: Path) -> None:
    path = ckpt_copy / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"lacks model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(ckpt_copy))


def test_unexpected_tensor_is_named(ckpt_copy: Path) -> None:
    # What an attention_bias=True checkpoint carries: weights this decoder has no slot for.
    path = ckpt_copy / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(str(ckpt_copy))


# ---------------------------------------------------------------------------- presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_module_has_the_exact_shapes(name: str) -> None:
    # On the meta device: the real sizes, no memory.
    cfg = preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert model.layers[0].attention.wqkv.weight.shape == (
        (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size)
    assert model.output.weight.shape == (cfg.vocab_size, cfg.hidden_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_preset_builds_with_random_weights(dtype: torch.dtype) -> None:
    model, tok = load_model("tiny", dtype=dtype, seed=3)
    assert isinstance(tok, ByteTokenizer)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert torch.equal(params["norm.weight"], torch.ones_like(params["norm.weight"]))
    w = params["layers.0.attention.wqkv.weight"].detach().float()
    assert 0.015 < w.std() < 0.025 and abs(float(w.mean())) < 0.005
    again, _ = load_model("tiny", dtype=dtype, seed=3)
    other, _ = load_model("tiny", dtype=dtype, seed=4)
    assert torch.equal(again.output.weight, model.output.weight)  # seeded
    assert not torch.equal(other.output.weight, model.output.weight)


def test_random_tied_model_keeps_the_tie() -> None:
    model = random_model(VARIANTS["tied"], torch.device("cpu"), torch.float32)
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


# ----------------------------------------------------------- dtype and cache defaults

def test_auto_dtype_follows_the_checkpoint(gqa_checkpoint, tmp_path: Path) -> None:
    from hybridgraph.model.loader import auto_dtype, stored_dtype

    directory, _ = gqa_checkpoint
    model_dir = Path(shutil.copytree(directory, tmp_path / "m"))
    _edit_config(model_dir, torch_dtype="bfloat16")
    assert stored_dtype(str(model_dir)) == torch.bfloat16
    assert auto_dtype(str(model_dir), "cpu") == torch.float32  # no fast half matmuls on a CPU
    _edit_config(model_dir, torch_dtype="float16")
    assert stored_dtype(str(model_dir)) == torch.float16
    assert stored_dtype("tiny") is None
    assert stored_dtype("smollm2-135m") is None  # Q4_1: quantized, no float type of its own


def test_kv_cache_defaults_to_the_context_limit_capped_by_memory(monkeypatch, caplog) -> None:
    from hybridgraph.engine import Engine
    from hybridgraph.model import kv_budget

    model, tok = load_model("tiny")
    assert Engine(model, tok).max_seq_len == model.config.max_position_embeddings
    per_pos = kv_budget.kv_bytes_per_position(model.config, 1, torch.float32)
    monkeypatch.setattr(kv_budget, "free_memory", lambda device: 2 * 300 * per_pos)
    with caplog.at_level("WARNING"):
        assert Engine(model, tok).max_seq_len == 256
    assert "using max_seq_len 256" in caplog.text
