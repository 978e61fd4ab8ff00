"""Build a Transformer from a preset (random weights) or a local HF model directory.

Weights go from safetensors straight to the target device and dtype; nothing is
unpickled. Random weights are drawn on the target device, so a 7B preset takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hybridgraph.model.config import PRESETS, ConfigError, ModelConfig, preset
from hybridgraph.model.llama import Transformer
from hybridgraph.model.tokenizer import Tokenizer, load_tokenizer


class LoadError(ValueError):
    """A model directory or checkpoint that cannot be loaded (message says which and why)."""


def _empty_model(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.output.weight = model.tok_embeddings.weight
    return model


def random_model(config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Transformer:
    model = _empty_model(config, device, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def _hf_param_map(config: ModelConfig) -> dict[str, tuple[str, int, int]]:
    """HF tensor name -> (our parameter name, first row, rows) for fused weights."""
    d, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    inter = config.intermediate_size
    out: dict[str, tuple[str, int, int]] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", 0, config.vocab_size),
        "model.norm.weight": ("norm.weight", 0, config.hidden_size),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ("output.weight", 0, config.vocab_size)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "self_attn.q_proj.weight"] = (ours + "attention.wqkv.weight", 0, nh * d)
        out[hf + "self_attn.k_proj.weight"] = (ours + "attention.wqkv.weight", nh * d, nkv * d)
        out[hf + "self_attn.v_proj.weight"] = (ours + "attention.wqkv.weight", (nh + nkv) * d,
                                               nkv * d)
        out[hf + "self_attn.o_proj.weight"] = (ours + "attention.wo.weight", 0, config.hidden_size)
        out[hf + "mlp.gate_proj.weight"] = (ours + "feed_forward.w13.weight", 0, inter)
        out[hf + "mlp.up_proj.weight"] = (ours + "feed_forward.w13.weight", inter, inter)
        out[hf + "mlp.down_proj.weight"] = (ours + "feed_forward.w2.weight", 0, config.hidden_size)
        out[hf + "input_layernorm.weight"] = (ours + "attention_norm.weight", 0, config.hidden_size)
        out[hf + "post_attention_layernorm.weight"] = (ours + "ffn_norm.weight", 0,
                                                       config.hidden_size)
    return out


def _checkpoint_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"malformed {index}: {e}") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise LoadError(f"{index.name} names {f.name}, which is missing from {model_dir}")
        return files
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir} "
                    "(only safetensors checkpoints are loaded; pickled .bin files never are)")


def load_checkpoint(model_dir: Path, config: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> Transformer:
    model = _empty_model(config, device, dtype)
    params = dict(model.named_parameters())
    wanted = _hf_param_map(config)
    seen: set[str] = set()
    dev = str(device) if device.type != "cuda" or device.index is not None else "cuda:0"
    with torch.no_grad():
        for file in _checkpoint_files(model_dir):
            with safe_open(str(file), framework="pt", device=dev) as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue
                    if name not in wanted:
                        raise LoadError(f"{file.name}: unexpected tensor {name!r} "
                                        f"(not a {config.name} Llama-family weight)")
                    ours, row, rows = wanted[name]
                    tensor = f.get_tensor(name)
                    target = params[ours][row:row + rows]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise LoadError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, "
                                        f"config.json implies {tuple(target.shape)}")
                    target.copy_(tensor.to(dtype))
                    seen.add(name)
    missing = sorted(set(wanted) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"checkpoint in {model_dir} lacks {', '.join(missing[:3])}{more}")
    return model.eval()


def load_model(source: str, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, seed: int = 0,
               ) -> tuple[Transformer, Tokenizer]:
    """A preset name (random weights) or a local HF directory -> (model, tokenizer)."""
    device = torch.device(device)
    if source in PRESETS:
        config = preset(source)
        model = random_model(config, device, dtype, seed)
        return model, load_tokenizer(None, config.bos_token_id, config.eos_token_ids)
    model_dir = Path(source)
    if not model_dir.is_dir():
        raise LoadError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) "
                        "nor a model directory")
    try:
        config = ModelConfig.from_json(model_dir / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None
    model = load_checkpoint(model_dir, config, device, dtype)
    return model, load_tokenizer(model_dir, config.bos_token_id, config.eos_token_ids)
